// masked_softmax on the CPU: one row (n, query) at a time, parallel over rows, fp32
// accumulation for bf16 (fp64 for fp64).
//
// Reference (fastbert/backends/reference.py, d2l semantics):
//   X.masked_fill(key >= valid_len, -1e6).softmax(-1)
// so keys at or past the valid length get exactly 0 (exp underflows), and a row with valid
// length 0 is uniform over all Lk keys.  Here the masked keys are never read: the softmax
// runs over the first `len` keys and the rest are written as 0 - never NaN, X untouched.
// Backward: dX = y * (dy - sum(dy * y)) over the visible keys; 0 at masked keys and on
// valid-length-0 rows (the reference's masked_fill cuts the gradient there).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_common.h"

namespace fastbert::cpu {
namespace {

using at::vec::Vectorized;

// Visible keys of row r (= n * Lq + query): Lk without valid_lens, else valid_lens[n] (1-D)
// or valid_lens[r] (2-D).
struct RowLens {
  const int32_t* lens;  // nullptr: every key visible
  bool per_query;
  int64_t Lq, Lk;
  int64_t operator()(int64_t r) const {
    if (lens == nullptr) return Lk;
    return per_query ? lens[r] : lens[r / Lq];
  }
};

RowLens row_lens(const at::Tensor& X, const std::optional<at::Tensor>& valid_lens, const char* op) {
  const int64_t N = X.size(0), Lq = X.size(1), Lk = X.size(2);
  if (!valid_lens.has_value() || !valid_lens->defined()) return {nullptr, false, Lq, Lk};
  const at::Tensor& vl = *valid_lens;
  check_int32_cpu(vl, op, "valid_lens");
  TORCH_CHECK(vl.is_contiguous(), op, ": valid_lens must be contiguous");
  const bool per_query = vl.dim() == 2;
  TORCH_CHECK((vl.dim() == 1 && vl.size(0) == N) || (per_query && vl.size(0) == N && vl.size(1) == Lq),
              op, ": valid_lens must have shape (", N, ",) or (", N, ", ", Lq, "), got ", vl.sizes());
  const int32_t* p = vl.data_ptr<int32_t>();
  for (int64_t i = 0; i < vl.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] <= Lk, op, ": valid_lens must lie in [0, ", Lk, "], got ", p[i]);
  return {p, per_query, Lq, Lk};
}

// buf[j] = exp(buf[j] - mx) for j < len, returning the sum: one pass, ATen's exp_u20 (max
// error ~2 ulp, well inside fp32 softmax's own rounding).
template <typename acc_t>
acc_t exp_and_sum(acc_t* buf, int64_t len, acc_t mx) {
  using Vec = Vectorized<acc_t>;
  const Vec vmax(mx);
  Vec vsum(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    const Vec e = (Vec::loadu(buf + j) - vmax).exp_u20();
    e.store(buf + j);
    vsum = vsum + e;
  }
  if (j < len) {  // the tail as one partial vector (random lengths make tails common)
    const int64_t n = len - j;
    const Vec e = (Vec::loadu(buf + j, n) - vmax).exp_u20();
    e.store(buf + j, n);
    vsum = vsum + Vec::set(Vec(acc_t(0)), e, n);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, vsum);
}

template <typename scalar_t>
void softmax_rows(const scalar_t* X, scalar_t* Y, const RowLens& lens, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t Lk = lens.Lk;
  const scalar_t uniform = static_cast<scalar_t>(acc_t(1) / acc_t(Lk));
  at::parallel_for(0, rows, row_grain(Lk), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(Lk);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = X + r * Lk;
      scalar_t* y = Y + r * Lk;
      const int64_t len = lens(r);
      if (len == 0) {  // d2l: every score is -1e6, so the row is uniform
        std::fill(y, y + Lk, uniform);
        continue;
      }
      at::vec::convert(x, buf.data(), len);
      const acc_t mx = at::vec::reduce_all<acc_t>(
          [](Vec a, Vec b) { return at::vec::maximum(a, b); }, buf.data(), len);
      const acc_t inv = acc_t(1) / exp_and_sum(buf.data(), len, mx);
      at::vec::map([inv](Vec v) { return v * Vec(inv); }, buf.data(), buf.data(), len);
      at::vec::convert(buf.data(), y, len);
      std::fill(y + len, y + Lk, scalar_t(0));
    }
  });
}

template <typename scalar_t>
void softmax_backward_rows(const scalar_t* dY, const scalar_t* Y, scalar_t* dX, const RowLens& lens,
                           int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t Lk = lens.Lk;
  at::parallel_for(0, rows, row_grain(2 * Lk), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dy(Lk), y(Lk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t len = lens(r);
      scalar_t* dx = dX + r * Lk;
      if (len > 0) {
        at::vec::convert(dY + r * Lk, dy.data(), len);
        at::vec::convert(Y + r * Lk, y.data(), len);
        const acc_t dot = at::vec::map2_reduce_all<acc_t>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, dy.data(),
            y.data(), len);
        at::vec::map2([dot](Vec g, Vec p) { return p * (g - Vec(dot)); }, dy.data(), dy.data(),
                      y.data(), len);
        at::vec::convert(dy.data(), dx, len);
      }
      std::fill(dx + len, dx + Lk, scalar_t(0));
    }
  });
}

at::Tensor masked_softmax_cpu(const at::Tensor& X, const std::optional<at::Tensor>& valid_lens) {
  constexpr const char* op = "fastbert::masked_softmax";
  check_float_input(X, op, "X");
  TORCH_CHECK(X.dim() == 3, op, ": X must be [N, Lq, Lk], got shape ", X.sizes());
  const RowLens lens = row_lens(X, valid_lens, op);
  const at::Tensor Xc = X.contiguous();
  at::Tensor Y = poison_if_testing(at::empty_like(Xc));
  if (Y.numel() == 0) return Y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, X.scalar_type(), "masked_softmax_cpu", [&] {
    softmax_rows<scalar_t>(Xc.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), lens,
                           X.size(0) * X.size(1));
  });
  return Y;
}

at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                       const std::optional<at::Tensor>& valid_lens) {
  constexpr const char* op = "fastbert::masked_softmax_backward";
  check_float_input(out, op, "out");
  TORCH_CHECK(out.dim() == 3, op, ": out must be [N, Lq, Lk], got shape ", out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type() &&
                  grad_out.device() == out.device(),
              op, ": grad_out must match out (", out.sizes(), ", ", out.scalar_type(), "), got ",
              grad_out.sizes(), ", ", grad_out.scalar_type());
  const RowLens lens = row_lens(out, valid_lens, op);
  const at::Tensor dY = grad_out.contiguous(), Y = out.contiguous();
  at::Tensor dX = poison_if_testing(at::empty_like(Y));
  if (dX.numel() == 0) return dX;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "masked_softmax_backward_cpu", [&] {
    softmax_backward_rows<scalar_t>(dY.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(),
                                    dX.data_ptr<scalar_t>(), lens, out.size(0) * out.size(1));
  });
  return dX;
}

}  // namespace
}  // namespace fastbert::cpu

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("masked_softmax", &fastbert::cpu::masked_softmax_cpu);
  m.impl("masked_softmax_backward", &fastbert::cpu::masked_softmax_backward_cpu);
}
