// Shared helpers of the thin CUDA bindings (csrc/cuda/*_binding.cpp; torch headers allowed
// here, never in the .cu files): tensor checks, dtype mapping, the current stream, errors.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "cuda/cuda_ops.h"

namespace fastbert::cuda {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The dropout seed: a 0-d int64 CPU tensor (read on the host; no device sync).
inline uint64_t read_seed(const std::optional<at::Tensor>& seed, double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must lie in [0, 1), got ", p);
  if (p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 && seed->scalar_type() == at::kLong &&
                  seed->device().is_cpu(),
              op, ": dropout_p > 0 needs a seed (a 0-d int64 CPU tensor)");
  return static_cast<uint64_t>(seed->item<int64_t>());
}

}  // namespace fastbert::cuda
