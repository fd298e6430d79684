// Loads and stores of one vector of a row in its accumulation type (fp32 for bf16), `n` <=
// Vec::size() lanes (a partial vector zero-fills the rest), for kernels that sweep rows of
// fp32, fp64 or bf16 with at::vec.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>

namespace fastbert::cpu {

template <typename T>
struct RowIO {  // float, double
  using Vec = at::vec::Vectorized<T>;
  static Vec load(const T* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(T* p, const Vec& v, int64_t n) { v.store(p, n); }
};
template <>
struct RowIO<at::BFloat16> {
  using Vec = at::vec::Vectorized<float>;
  static Vec load(const at::BFloat16* p, int64_t n) {
    if (n == Vec::size()) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(
        at::vec::convert_to_float<at::BFloat16>(at::vec::Vectorized<at::BFloat16>::loadu(p, n)));
  }
  static void store(at::BFloat16* p, const Vec& v, int64_t n) {
    at::vec::convert_from_float<at::BFloat16>(v, v).store(p, n);  // round to nearest even
  }
};

}  // namespace fastbert::cpu
