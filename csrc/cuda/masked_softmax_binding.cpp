// CUDA binding of masked_softmax (kernels: csrc/cuda/masked_softmax.cu; semantics and CPU
// twin: csrc/cpu/masked_softmax.cpp).  valid_lens' range is checked by fastbert.ops (the
// kernel clamps, so a bad value can never read out of bounds).
#include <torch/library.h>

#include "cuda/binding_common.h"

namespace fastbert::cuda {
namespace {

int lens_mode(const at::Tensor& X, const std::optional<at::Tensor>& valid_lens, const char* op) {
  if (!valid_lens.has_value() || !valid_lens->defined()) return 0;
  const at::Tensor& vl = *valid_lens;
  TORCH_CHECK(vl.scalar_type() == at::kInt && vl.device() == X.device() && vl.is_contiguous(), op,
              ": valid_lens must be a contiguous int32 tensor on ", X.device());
  if (vl.dim() == 1 && vl.size(0) == X.size(0)) return 1;
  TORCH_CHECK(vl.dim() == 2 && vl.size(0) == X.size(0) && vl.size(1) == X.size(1), op,
              ": valid_lens must have shape (N,) or (N, Lq), got ", vl.sizes());
  return 2;
}

const int32_t* lens_ptr(const std::optional<at::Tensor>& vl) {
  return vl.has_value() && vl->defined() ? vl->data_ptr<int32_t>() : nullptr;
}

at::Tensor masked_softmax_cuda(const at::Tensor& X, const std::optional<at::Tensor>& valid_lens) {
  constexpr const char* op = "fastbert::masked_softmax";
  check_cuda(X, op, "X");
  TORCH_CHECK(X.dim() == 3, op, ": X must be [N, Lq, Lk], got shape ", X.sizes());
  const DType dt = dtype_of(X, op, "X");
  const int mode = lens_mode(X, valid_lens, op);
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor Xc = X.contiguous();
  at::Tensor Y = at::empty_like(Xc);
  check_launch(masked_softmax_forward(dt, Xc.data_ptr(), Y.data_ptr(), lens_ptr(valid_lens), mode, X.size(0),
                                      X.size(1), X.size(2), current_stream()), op);
  return Y;
}

at::Tensor masked_softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                        const std::optional<at::Tensor>& valid_lens) {
  constexpr const char* op = "fastbert::masked_softmax_backward";
  check_cuda(out, op, "out");
  TORCH_CHECK(out.dim() == 3 && grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type() &&
                  grad_out.device() == out.device(),
              op, ": grad_out must match out (", out.sizes(), ", ", out.scalar_type(), ")");
  const DType dt = dtype_of(out, op, "out");
  const int mode = lens_mode(out, valid_lens, op);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor dY = grad_out.contiguous(), Y = out.contiguous();
  at::Tensor dX = at::empty_like(Y);
  check_launch(masked_softmax_backward(dt, dY.data_ptr(), Y.data_ptr(), dX.data_ptr(), lens_ptr(valid_lens), mode,
                                       out.size(0), out.size(1), out.size(2), current_stream()), op);
  return dX;
}

}  // namespace
}  // namespace fastbert::cuda

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("masked_softmax", &fastbert::cuda::masked_softmax_cuda);
  m.impl("masked_softmax_backward", &fastbert::cuda::masked_softmax_backward_cuda);
}
