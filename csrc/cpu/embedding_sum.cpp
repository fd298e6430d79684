// embedding_sum on the CPU: the unpadded encoder's embedding of its packed tokens,
//   out[t] = token_weight[ids[t, 0]] + segment_weight[ids[t, 1]] + position_weight[ids[t, 2]]
// in one pass over the rows (the three lookups and two adds of the reference are five passes).
// Reference: fastbert/backends/reference.py embedding_sum (F.embedding, summed in that order).
//
// Backward: the dense gradient of each table that needs one, a scatter-add of the rows of
// grad.  Threads split the columns, and each one walks the rows in order, so every element
// sums in row order: deterministic for any thread count.  bf16 tables accumulate in fp32.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cpu/cpu_common.h"
#include "cpu/row_io.h"

namespace fastbert::cpu {
namespace {

using at::vec::Vectorized;

constexpr const char* kOp = "fastbert::embedding_sum";

void check_tables(const at::Tensor& ids, const std::array<const at::Tensor*, 3>& tables) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 &&
                  ids.size(1) == 3,
              kOp, ": ids must be an int64 CPU tensor [T, 3] (token, segment, position), got ",
              ids.scalar_type(), " ", ids.sizes(), " on ", ids.device());
  const char* names[3] = {"token_weight", "segment_weight", "position_weight"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& w = *tables[i];
    check_float_input(w, kOp, names[i]);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == tables[0]->size(1), kOp, ": ", names[i],
                " must be [rows, C] with token_weight's C = ", tables[0]->size(1), ", got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == tables[0]->scalar_type(), kOp,
                ": the three tables must share a dtype, got ", w.scalar_type(), " and ",
                tables[0]->scalar_type());
  }
}

at::Tensor embedding_sum_cpu(const at::Tensor& ids, const at::Tensor& token_weight,
                             const at::Tensor& segment_weight, const at::Tensor& position_weight) {
  check_tables(ids, {&token_weight, &segment_weight, &position_weight});
  const at::Tensor id = ids.contiguous();
  const at::Tensor tw = token_weight.contiguous(), sw = segment_weight.contiguous(),
                   pw = position_weight.contiguous();
  const int64_t T = id.size(0), C = tw.size(1);
  const int64_t rows[3] = {tw.size(0), sw.size(0), pw.size(0)};
  const int64_t* ip = id.data_ptr<int64_t>();
  const char* names[3] = {"token", "segment", "position"};
  for (int64_t t = 0; t < T; ++t)
    for (int i = 0; i < 3; ++i)
      TORCH_CHECK(ip[3 * t + i] >= 0 && ip[3 * t + i] < rows[i], kOp, ": ", names[i], " id ",
                  ip[3 * t + i], " (row ", t, ") is out of range [0, ", rows[i], ")");
  at::Tensor out = poison_if_testing(at::empty({T, C}, tw.options()));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, tw.scalar_type(), "embedding_sum_cpu", [&] {
    using IO = RowIO<scalar_t>;
    constexpr int64_t W = IO::Vec::size();
    const scalar_t* a = tw.data_ptr<scalar_t>();
    const scalar_t* b = sw.data_ptr<scalar_t>();
    const scalar_t* c = pw.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(4 * C), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* ra = a + ip[3 * t] * C;
        const scalar_t* rb = b + ip[3 * t + 1] * C;
        const scalar_t* rc = c + ip[3 * t + 2] * C;
        for (int64_t j = 0; j < C; j += W) {
          const int64_t n = std::min(W, C - j);
          IO::store(o + t * C + j, (IO::load(ra + j, n) + IO::load(rb + j, n)) + IO::load(rc + j, n), n);
        }
      }
    });
  });
  return out;
}

// Gradients of the three tables ([V, C], [S, C], [P, C]); a table whose `needs` flag is off
// gets an empty (0,) tensor instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_sum_backward_cpu(
    const at::Tensor& grad, const at::Tensor& ids, int64_t V, int64_t S, int64_t P,
    std::array<bool, 3> needs) {
  constexpr const char* op = "fastbert::embedding_sum_backward";
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 &&
                  ids.size(1) == 3, op, ": ids must be an int64 CPU tensor [T, 3]");
  check_float_input(grad, op, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == ids.size(0), op, ": grad must be [T, C] with T = ",
              ids.size(0), ", got ", grad.sizes());
  const at::Tensor g = grad.contiguous(), id = ids.contiguous();
  const int64_t T = g.size(0), C = g.size(1);
  const int64_t rows[3] = {V, S, P};
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::array<at::Tensor, 3> sums;
  for (int i = 0; i < 3; ++i)
    sums[i] = needs[i] ? at::zeros({rows[i], C}, g.options().dtype(acc)) : at::empty({0}, g.options());
  const int64_t* ip = id.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "embedding_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    acc_t* dst[3];
    for (int i = 0; i < 3; ++i) dst[i] = needs[i] ? sums[i].data_ptr<acc_t>() : nullptr;
    // Column blocks of whole vectors; each block walks every row in order.
    const int64_t blocks = (C + W - 1) / W;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t c0 = begin * W, c1 = std::min(C, end * W);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = c0; j < c1; j += W) {
          const int64_t n = std::min(W, c1 - j);
          const Vec gv = RowIO<scalar_t>::load(gp + t * C + j, n);
          for (int i = 0; i < 3; ++i) {
            if (dst[i] == nullptr) continue;
            acc_t* row = dst[i] + ip[3 * t + i] * C + j;
            (Vec::loadu(row, n) + gv).store(row, n);
          }
        }
      }
    });
  });
  for (int i = 0; i < 3; ++i)
    if (needs[i] && sums[i].scalar_type() != g.scalar_type()) sums[i] = sums[i].to(g.scalar_type());
  return {sums[0], sums[1], sums[2]};
}

}  // namespace
}  // namespace fastbert::cpu

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embedding_sum", &fastbert::cpu::embedding_sum_cpu);
  m.impl("embedding_sum_backward", &fastbert::cpu::embedding_sum_backward_cpu);
}
