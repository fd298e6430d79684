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
#include <cmath>
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

// A row of the CPU kernels' dropout: keep_scale[j] = scale if dropout_keep(seed, base + j, p)
// else 0, for j < n.  The same test written as an integer compare (uniform01 >= p  <=>  the
// top 24 bits >= ceil(p * 2^24), exact since p * 2^24 is exact in fp32), so the loop
// vectorizes (AVX-512 vpmullq) where the float form does not.
template <typename T>
inline void dropout_keep_scale_row(uint64_t seed, uint64_t base, float p, T scale, int64_t n,
                                   T* keep_scale) {
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(p * 16777216.0f));
  const uint64_t key = seed * 0x9e3779b97f4a7c15ULL + base;
  for (int64_t j = 0; j < n; ++j)
    keep_scale[j] = (mix64(key + static_cast<uint64_t>(j)) >> 40) >= threshold ? scale : T(0);
}

}  // namespace fastbert
