// Counter-based random numbers for fused dropout (CPU kernels; plain C++, no torch headers).
//
// A dropout mask element is a pure function of (seed, index): the forward and the backward
// regenerate the same mask, and nothing the size of the activations is stored.  The mixer
// is SplitMix64's finalizer (Steele et al., "Fast splittable pseudorandom number
// generators", 2014), which passes BigCrush on a counter input and vectorizes (AVX-512
// vpmullq) in a plain loop.  Index = the element's flat index in the op's output, so a
// kernel's result does not depend on how it splits the work across threads.
//
// Plain C++ usable from CUDA too: under nvcc every function is __host__ __device__, so the CUDA
// kernels (csrc/cuda/*.cu) draw bit-identical masks to the CPU ones.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTBERT_HOST_DEVICE __host__ __device__
#else
#define FASTBERT_HOST_DEVICE
#endif

namespace fastbert {

FASTBERT_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) from the top 24 bits: exact in float32.
FASTBERT_HOST_DEVICE inline float uniform01(uint64_t seed, uint64_t index) {
  uint64_t r = mix64(seed * 0x9e3779b97f4a7c15ULL + index);
  return static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
}

// Keep an element with probability 1 - p.
FASTBERT_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  return uniform01(seed, index) >= p;
}

}  // namespace fastbert
