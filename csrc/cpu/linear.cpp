// nn.Linear on the CPU: y = x @ w^T + b, x [..., K] (any leading dims), w [N, K], b [N].
// Reference: fastbert/backends/reference.py linear (F.linear).
//
// Every GEMM runs on oneDNN (csrc/cpu/onednn_gemm.h: torch's mkldnn::_linear_pointwise,
// 2-3x MKL's at::addmm / at::mm in fp32 on this class of CPU), bias fused in the forward's
// epilogue.
// Backward: dx = dy @ w, dw = dy^T x (onednn_gemm.h, 256-row chunks in fp32), db = column
// sums of dy.
#include <torch/library.h>

#include "cpu/onednn_gemm.h"

namespace fastbert {
namespace {

void check_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "linear: x must be [..., K] and weight [N, K], got x ",
              x.sizes(), ", weight ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "linear: shapes do not agree: x ", x.sizes(), ", weight ",
              w.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "linear (cpp, CPU): dtype must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(w.scalar_type() == dt, "linear: x and weight must share a dtype");
  TORCH_CHECK(!b.has_value() || !b->defined() ||
                  (b->scalar_type() == dt && b->dim() == 1 && b->size(0) == w.size(0)),
              "linear: bias must be [N] with x's dtype");
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

// x @ w^T + b.  fp32: oneDNN (2-3x MKL).  bf16: at::addmm / at::mm (itself oneDNN in bf16;
// the pointwise op measured ~20% slower on the bert.small train step's bf16 GEMMs), except
// on a CPU without oneDNN bf16 kernels, where onednn::linear runs it in fp32.
at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (x.scalar_type() != at::kBFloat16 || onednn::bf16_via_fp32(x))
    return onednn::linear(x, w, b, "none");
  return b.has_value() && b->defined() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check_linear(x, w, b);
  const auto x2 = x.reshape({-1, x.size(-1)});
  const int64_t N = w.size(0);
  at::Tensor y;
  if (x2.size(0) == 0 || x2.size(1) == 0 || N == 0) {  // degenerate: no GEMM to run
    y = at::zeros({x2.size(0), N}, x.options());
    if (b.has_value() && b->defined()) y.add_(*b);
  } else {
    y = gemm(x2, w.contiguous(), b);
  }
  return y.view(out_shape(x, N));
}

// Gradients of (x, w, b); the bias gradient is always returned (the glue drops it for None).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
    const std::optional<at::Tensor>& b) {
  check_linear(x, w, b);
  const int64_t K = x.size(-1), N = w.size(0);
  const auto x2 = x.reshape({-1, K}).contiguous();
  const auto dy = grad_y.to(x.scalar_type()).reshape({-1, N}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor dx, dw;
  if (M == 0 || K == 0 || N == 0) {
    dx = at::zeros({M, K}, x.options());
    dw = at::zeros({N, K}, x.options());
  } else {
    // fp32: oneDNN matmul on w as it is; bf16: w^T as a view (~5% faster than a copy)
    dx = x.scalar_type() == at::kFloat ? onednn::matmul(dy, w) : gemm(dy, w.t(), std::nullopt);
    dw = onednn::weight_grad(dy, x2);
  }
  auto db = dy.sum(0);  // torch's reduction accumulates bf16 in fp32
  return {dx.view(x.sizes()), dw.contiguous(), db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_backward", &linear_backward);
}

}  // namespace fastbert
