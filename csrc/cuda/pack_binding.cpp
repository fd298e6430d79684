// CUDA binding of pack / unpack / pack_rows (kernels: csrc/cuda/pack.cu; semantics and CPU
// twin: csrc/cpu/pack.cpp).  pack must know T to allocate, so it reads valid_lens on the host
// (one small device-to-host copy, which also validates them) and uploads cu_seqlens.  unpack
// and pack_rows trust cu_seqlens' contents (no sync); the kernels clamp, never fault.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda/binding_common.h"

namespace fastbert::cuda {
namespace {

int64_t row_bytes_of(const at::Tensor& t, int64_t first_row_dim) {
  int64_t n = 1;
  for (int64_t d = first_row_dim; d < t.dim(); ++d) n *= t.size(d);
  return n * static_cast<int64_t>(t.element_size());
}

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& data, const char* op) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 && cu.device() == data.device(), op,
              ": cu_seqlens must be a 1-D int32 tensor of B+1 offsets on ", data.device());
}

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& X, const at::Tensor& valid_lens) {
  constexpr const char* op = "fastbert::pack";
  check_cuda(X, op, "X");
  TORCH_CHECK(X.dim() >= 2, op, ": X must be [B, L, ...], got shape ", X.sizes());
  const int64_t B = X.size(0), L = X.size(1);
  TORCH_CHECK(valid_lens.scalar_type() == at::kInt && valid_lens.dim() == 1 && valid_lens.size(0) == B, op,
              ": valid_lens must be an int32 tensor of shape (", B, ",)");
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor lens = valid_lens.to(at::kCPU).contiguous();
  at::Tensor cu_host = at::empty({B + 1}, lens.options());
  int32_t* off = cu_host.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  off[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= L, op, ": valid_lens must lie in [0, ", L, "], got ", len[b]);
    off[b + 1] = off[b] + len[b];
  }
  const int64_t T = off[B];
  at::Tensor cu = cu_host.to(X.device());
  std::vector<int64_t> shape(X.sizes().begin() + 1, X.sizes().end());
  shape[0] = T;
  const at::Tensor Xc = X.contiguous();
  at::Tensor packed = at::empty(shape, X.options());
  check_launch(pack_rows(Xc.data_ptr(), cu.data_ptr<int32_t>(), packed.data_ptr(), B, L, T, row_bytes_of(X, 2),
                         current_stream()),
               op);
  return {packed, cu};
}

at::Tensor pack_rows_cuda(const at::Tensor& X, const at::Tensor& cu_seqlens, int64_t T) {
  constexpr const char* op = "fastbert::pack_rows";
  check_cuda(X, op, "X");
  TORCH_CHECK(X.dim() >= 2 && T >= 0, op, ": X must be [B, L, ...] and T >= 0");
  check_cu_seqlens(cu_seqlens, X, op);
  TORCH_CHECK(cu_seqlens.numel() == X.size(0) + 1, op, ": cu_seqlens must have B+1 = ", X.size(0) + 1, " entries");
  const c10::cuda::CUDAGuard guard(X.device());
  std::vector<int64_t> shape(X.sizes().begin() + 1, X.sizes().end());
  shape[0] = T;
  const at::Tensor Xc = X.contiguous(), cu = cu_seqlens.contiguous();
  at::Tensor packed = at::zeros(shape, X.options());  // zeros: rows the offsets never reach
  check_launch(pack_rows(Xc.data_ptr(), cu.data_ptr<int32_t>(), packed.data_ptr(), X.size(0), X.size(1), T,
                         row_bytes_of(X, 2), current_stream()),
               op);
  return packed;
}

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t L) {
  constexpr const char* op = "fastbert::unpack";
  check_cuda(packed, op, "packed");
  TORCH_CHECK(packed.dim() >= 1 && L >= 0, op, ": packed must be [T, ...] and L >= 0");
  check_cu_seqlens(cu_seqlens, packed, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t B = cu_seqlens.numel() - 1;
  std::vector<int64_t> shape{B, L};
  shape.insert(shape.end(), packed.sizes().begin() + 1, packed.sizes().end());
  const at::Tensor pc = packed.contiguous(), cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(shape, packed.options());
  check_launch(unpack_rows(pc.data_ptr(), cu.data_ptr<int32_t>(), out.data_ptr(), B, L, packed.size(0),
                           row_bytes_of(packed, 1), current_stream()),
               op);
  return out;
}

}  // namespace
}  // namespace fastbert::cuda

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("pack", &fastbert::cuda::pack_cuda);
  m.impl("pack_rows", &fastbert::cuda::pack_rows_cuda);
  m.impl("unpack", &fastbert::cuda::unpack_cuda);
}
