// CUDA binding of gather_positions (kernels: csrc/cuda/gather_positions.cu; semantics and CPU
// twin: csrc/cpu/gather_positions.cpp).  Position ranges are checked by fastbert.ops (a device
// check here would sync); the kernels skip out-of-range positions instead of faulting.
#include <torch/library.h>

#include "cuda/binding_common.h"

namespace fastbert::cuda {
namespace {

void check_positions(const at::Tensor& positions, const at::Tensor& data, int64_t B, const char* op) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.device() == data.device(), op,
              ": positions must be an int64 tensor on ", data.device());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B, op, ": positions must be [", B, ", P], got shape ",
              positions.sizes());
}

at::Tensor gather_positions_cuda(const at::Tensor& X, const at::Tensor& positions) {
  constexpr const char* op = "fastbert::gather_positions";
  check_cuda(X, op, "X");
  TORCH_CHECK(X.dim() == 3, op, ": X must be [B, L, C], got shape ", X.sizes());
  const DType dt = dtype_of(X, op, "X");
  const int64_t B = X.size(0), L = X.size(1), C = X.size(2);
  check_positions(positions, X, B, op);
  const int64_t P = positions.size(1);
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor Xc = X.contiguous(), pc = positions.contiguous();
  at::Tensor out = at::empty({B, P, C}, X.options());
  check_launch(gather_positions_forward(dt, Xc.data_ptr(), pc.data_ptr<int64_t>(), out.data_ptr(), B, L, C, P,
                                        current_stream()),
               op);
  return out;
}

at::Tensor gather_positions_backward_cuda(const at::Tensor& grad_out, const at::Tensor& positions, int64_t L) {
  constexpr const char* op = "fastbert::gather_positions_backward";
  check_cuda(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && L >= 0, op, ": grad_out must be [B, P, C] and L >= 0");
  const DType dt = dtype_of(grad_out, op, "grad_out");
  const int64_t B = grad_out.size(0), P = grad_out.size(1), C = grad_out.size(2);
  check_positions(positions, grad_out, B, op);
  TORCH_CHECK(positions.size(1) == P, op, ": positions must be [", B, ", ", P, "] like grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous(), pc = positions.contiguous();
  at::Tensor dX = at::empty({B, L, C}, grad_out.options());
  check_launch(gather_positions_backward(dt, g.data_ptr(), pc.data_ptr<int64_t>(), dX.data_ptr(), B, L, C, P,
                                         current_stream()),
               op);
  return dX;
}

}  // namespace
}  // namespace fastbert::cuda

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("gather_positions", &fastbert::cuda::gather_positions_cuda);
  m.impl("gather_positions_backward", &fastbert::cuda::gather_positions_backward_cuda);
}
