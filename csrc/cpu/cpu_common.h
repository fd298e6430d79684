// Shared checks and helpers for the CPU kernels (csrc/cpu/*.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace fastbert::cpu {

// Floating dtypes the compute kernels take: fp32 and bf16 (the cpp backend's contract)
// plus fp64, so gradcheck can run on the kernels themselves.
inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_int32_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

// The dropout seed: a 0-d (or 1-element) int64 CPU tensor; required iff dropout_p > 0.
inline uint64_t read_seed(const std::optional<at::Tensor>& seed, double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must lie in [0, 1), got ", p);
  if (p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p = ", p,
              " > 0 needs a seed (a 0-d int64 CPU tensor)");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              op, ": seed must be a 0-d int64 CPU tensor, got ", seed->scalar_type(), " of shape ",
              seed->sizes(), " on ", seed->device());
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// FASTBERT_POISON_OUTPUTS=1 (the tests set it): every output is filled with NaN (other dtypes:
// 0xA5 bytes) before a kernel writes it, so an element a kernel forgets to write shows up.
inline at::Tensor poison_if_testing(at::Tensor t) {
  const char* env = std::getenv("FASTBERT_POISON_OUTPUTS");
  if (env != nullptr && env[0] == '1' && t.numel() > 0) {
    if (t.is_floating_point()) t.fill_(NAN);
    else std::memset(t.data_ptr(), 0xA5, t.nbytes());
  }
  return t;
}

// Rows per parallel chunk so one chunk is about GRAIN_SIZE elements.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_len));
}

}  // namespace fastbert::cpu
