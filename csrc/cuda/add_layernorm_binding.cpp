// CUDA binding of add_layernorm (kernels: csrc/cuda/add_layernorm.cu; semantics and CPU twin:
// csrc/cpu/add_layernorm.cpp).  Same counter RNG as the CPU, so dropout_mask (CPU) is the
// mask these kernels draw.
#include <torch/library.h>

#include <tuple>

#include "cuda/binding_common.h"

namespace fastbert::cuda {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last axis, got shape ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.device() == x.device(), op,
              ": x and y must share shape, dtype and device");
}

std::optional<at::Tensor> affine_param(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* op,
                                       const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1) && t->device() == x.device(), op, ": ", name,
              " must have shape (", x.size(-1), ",) on ", x.device());
  return t->to(at::kFloat).contiguous();
}

const float* ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_cuda(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm";
  check_pair(x, y, op);
  const DType dt = dtype_of(x, op, "x");
  const uint64_t s = read_seed(seed, dropout_p, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = affine_param(weight, x, op, "weight");
  const auto b = affine_param(bias, x, op, "bias");
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor out = at::empty_like(xc);
  at::Tensor mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  check_launch(add_layernorm_forward(dt, xc.data_ptr(), yc.data_ptr(), ptr(w), ptr(b), out.data_ptr(),
                                     mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, C, static_cast<float>(eps),
                                     static_cast<float>(dropout_p), s, current_stream()),
               op);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm_backward";
  check_pair(x, y, op);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x");
  const DType dt = dtype_of(x, op, "x");
  const uint64_t s = read_seed(seed, dropout_p, op);
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              op, ": mean and rstd must hold ", rows, " float32 values (one per row, from the forward)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = affine_param(weight, x, op, "weight");
  const at::Tensor dout = grad_out.contiguous(), xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  // Without dropout grad_y equals grad_x: an empty tensor stands in for it (the kernel skips it).
  at::Tensor dy = dropout_p > 0.0 ? at::empty_like(xc) : at::empty({0}, xc.options());
  const int64_t chunks = add_layernorm_backward_chunks(rows);
  at::Tensor partials = at::empty({2 * chunks, C}, x.options().dtype(at::kFloat));
  at::Tensor dwb = at::empty({2, C}, x.options().dtype(at::kFloat));
  check_launch(add_layernorm_backward(dt, dout.data_ptr(), xc.data_ptr(), yc.data_ptr(), ptr(w),
                                      mc.data_ptr<float>(), rc.data_ptr<float>(), dx.data_ptr(), dropout_p > 0.0 ? dy.data_ptr() : nullptr,
                                      dwb[0].data_ptr<float>(), dwb[1].data_ptr<float>(), partials.data_ptr<float>(),
                                      rows, C, static_cast<float>(dropout_p), s, current_stream()),
               op);
  const at::ScalarType param_dtype = (weight.has_value() && weight->defined()) ? weight->scalar_type() : x.scalar_type();
  return {dx, dy, dwb[0].to(param_dtype, false, true), dwb[1].to(param_dtype, false, true)};
}

}  // namespace
}  // namespace fastbert::cuda

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("add_layernorm", &fastbert::cuda::add_layernorm_cuda);
  m.impl("add_layernorm_backward", &fastbert::cuda::add_layernorm_backward_cuda);
}
