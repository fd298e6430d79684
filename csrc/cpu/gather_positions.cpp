// gather_positions on the CPU: out[b, p, :] = X[b, positions[b, p], :] (the MLM gather),
// and its backward, a scatter-add into [B, L, C] where positions may repeat.
//
// Reference (fastbert/backends/reference.py): X[arange(B)[:, None], positions]; autograd's
// backward is index_put_ with accumulate=True.  Here the backward is deterministic and
// race-free: parallel over batch rows b, and each output row (b, l) is written once, with
// the fp32 (fp64) sum of every grad row that gathered it, in p order.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/cpu_common.h"

namespace fastbert::cpu {
namespace {

void check_positions(const at::Tensor& positions, int64_t B, int64_t L, const char* op) {
  TORCH_CHECK(positions.device().is_cpu(), op, ": positions must be a CPU tensor, got ",
              positions.device());
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B, op, ": positions must be [", B,
              ", P], got shape ", positions.sizes());
  const at::Tensor pc = positions.contiguous();
  const int64_t* pos = pc.data_ptr<int64_t>();
  for (int64_t i = 0; i < pc.numel(); ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < L, op, ": positions must lie in [0, ", L - 1, "], got ", pos[i]);
}

at::Tensor gather_positions_cpu(const at::Tensor& X, const at::Tensor& positions) {
  constexpr const char* op = "fastbert::gather_positions";
  check_float_input(X, op, "X");
  TORCH_CHECK(X.dim() == 3, op, ": X must be [B, L, C], got shape ", X.sizes());
  const int64_t B = X.size(0), L = X.size(1), C = X.size(2);
  check_positions(positions, B, L, op);
  const int64_t P = positions.size(1);
  const at::Tensor Xc = X.contiguous(), pc = positions.contiguous();
  at::Tensor out = poison_if_testing(at::empty({B, P, C}, X.options()));
  if (out.numel() == 0) return out;
  const int64_t* pos = pc.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(Xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = C * X.element_size();
  at::parallel_for(0, B * P, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P;
      std::memcpy(dst + i * row_bytes, src + (b * L + pos[i]) * row_bytes, row_bytes);
    }
  });
  return out;
}

template <typename scalar_t>
void scatter_add_rows(const scalar_t* dOut, const int64_t* pos, scalar_t* dX, int64_t B, int64_t P,
                      int64_t L, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, std::max<int64_t>(1, row_grain(L * C)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* pb = pos + b * P;
      scalar_t* out = dX + b * L * C;
      std::fill(out, out + L * C, scalar_t(0));
      for (int64_t p = 0; p < P; ++p) {
        bool first = true;  // only the first slot of a position writes its row
        for (int64_t q = 0; q < p && first; ++q) first = pb[q] != pb[p];
        if (!first) continue;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t q = p; q < P; ++q) {
          if (pb[q] != pb[p]) continue;
          const scalar_t* g = dOut + (b * P + q) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(g[c]);
        }
        scalar_t* row = out + pb[p] * C;
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

at::Tensor gather_positions_backward_cpu(const at::Tensor& grad_out, const at::Tensor& positions,
                                         int64_t L) {
  constexpr const char* op = "fastbert::gather_positions_backward";
  check_float_input(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3, op, ": grad_out must be [B, P, C], got shape ", grad_out.sizes());
  TORCH_CHECK(L >= 0, op, ": L must be >= 0, got ", L);
  const int64_t B = grad_out.size(0), P = grad_out.size(1), C = grad_out.size(2);
  check_positions(positions, B, L, op);
  TORCH_CHECK(positions.size(1) == P, op, ": positions must be [", B, ", ", P, "] like grad_out, got ",
              positions.sizes());
  const at::Tensor g = grad_out.contiguous(), pc = positions.contiguous();
  at::Tensor dX = poison_if_testing(at::empty({B, L, C}, grad_out.options()));
  if (dX.numel() == 0) return dX;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "gather_positions_backward_cpu", [&] {
    scatter_add_rows<scalar_t>(g.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), dX.data_ptr<scalar_t>(),
                               B, P, L, C);
  });
  return dX;
}

}  // namespace
}  // namespace fastbert::cpu

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("gather_positions", &fastbert::cpu::gather_positions_cpu);
  m.impl("gather_positions_backward", &fastbert::cpu::gather_positions_backward_cpu);
}
