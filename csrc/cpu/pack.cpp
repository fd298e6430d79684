// pack / unpack on the CPU: the unpadded encoder's entry and exit.
//   pack(X[B, L, ...], valid_lens[B]) -> packed[T, ...] (the first valid_lens[b] rows of each
//     sequence, in order), cu_seqlens[B+1] int32 (cu_seqlens[b] = first row of sequence b)
//   unpack(packed, cu_seqlens, L) -> [B, L, ...], zeros at the pad positions (rows of packed
//     past cu_seqlens[-1], row padding, are ignored)
//   pack_rows(X, cu_seqlens, T): pack with known offsets (unpack's backward; rows past
//     cu_seqlens[-1] zero)
// Reference (fastbert/backends/reference.py): X[mask] and out.masked_scatter(mask, packed).
// Pure row copies (memcpy of whole rows, parallel over sequences), so any dtype works and
// the result is bit-exact; pack's and unpack's backwards are each other.
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/cpu_common.h"

namespace fastbert::cpu {
namespace {

// Bytes of one position (the product of the trailing dims).
int64_t row_bytes_of(const at::Tensor& t, int64_t first_row_dim) {
  int64_t n = 1;
  for (int64_t d = first_row_dim; d < t.dim(); ++d) n *= t.size(d);
  return n * static_cast<int64_t>(t.element_size());
}

// Copy sequence b's rows between the padded [B, L, ...] buffer and the packed [T, ...] one.
void copy_sequences(const at::Tensor& cu, int64_t L, int64_t row_bytes, char* padded, char* packed,
                    bool to_packed) {
  const int32_t* off = cu.data_ptr<int32_t>();
  const int64_t B = cu.numel() - 1;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = off[b + 1] - off[b];
      char* pad_row = padded + b * L * row_bytes;
      char* pk_row = packed + static_cast<int64_t>(off[b]) * row_bytes;
      if (to_packed) {
        std::memcpy(pk_row, pad_row, len * row_bytes);
      } else {
        std::memcpy(pad_row, pk_row, len * row_bytes);
        std::memset(pad_row + len * row_bytes, 0, (L - len) * row_bytes);
      }
    }
  });
}

void check_cu_seqlens(const at::Tensor& cu, int64_t T, int64_t L, const char* op) {
  check_int32_cpu(cu, op, "cu_seqlens");
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, op, ": cu_seqlens must be 1-D with B+1 entries, got shape ",
              cu.sizes());
  const at::Tensor c = cu.contiguous();
  const int32_t* off = c.data_ptr<int32_t>();
  TORCH_CHECK(off[0] == 0, op, ": cu_seqlens[0] must be 0, got ", off[0]);
  for (int64_t b = 0; b + 1 < c.numel(); ++b) {
    const int64_t len = off[b + 1] - off[b];
    TORCH_CHECK(len >= 0 && len <= L, op, ": sequence ", b, " has length ", len,
                " (from cu_seqlens); lengths must lie in [0, L=", L, "]");
  }
  // Fewer offsets than rows is row padding (rows that belong to no sequence: the encoder's
  // row bucketing, ops.unpack's contract).
  TORCH_CHECK(off[c.numel() - 1] <= T, op, ": cu_seqlens[-1] = ", off[c.numel() - 1],
              " must be at most the number of packed rows ", T);
}

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& X, const at::Tensor& valid_lens) {
  constexpr const char* op = "fastbert::pack";
  TORCH_CHECK(X.device().is_cpu(), op, ": X must be a CPU tensor, got ", X.device());
  TORCH_CHECK(X.dim() >= 2, op, ": X must be [B, L, ...], got shape ", X.sizes());
  check_int32_cpu(valid_lens, op, "valid_lens");
  const int64_t B = X.size(0), L = X.size(1);
  TORCH_CHECK(valid_lens.dim() == 1 && valid_lens.size(0) == B, op, ": valid_lens must have shape (", B,
              ",), got ", valid_lens.sizes());
  const at::Tensor vl = valid_lens.contiguous();
  const int32_t* lens = vl.data_ptr<int32_t>();
  at::Tensor cu = poison_if_testing(at::empty({B + 1}, vl.options()));
  int32_t* off = cu.data_ptr<int32_t>();
  off[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= L, op, ": valid_lens must lie in [0, ", L, "], got ", lens[b]);
    TORCH_CHECK(static_cast<int64_t>(off[b]) + lens[b] <= INT32_MAX, op, ": too many tokens for int32 offsets");
    off[b + 1] = off[b] + lens[b];
  }
  std::vector<int64_t> shape(X.sizes().begin(), X.sizes().end());
  shape.erase(shape.begin());
  shape[0] = off[B];
  const at::Tensor Xc = X.contiguous();
  at::Tensor packed = poison_if_testing(at::empty(shape, X.options()));
  if (packed.numel() > 0)
    copy_sequences(cu, L, row_bytes_of(X, 2), static_cast<char*>(Xc.data_ptr()),
                   static_cast<char*>(packed.data_ptr()), /*to_packed=*/true);
  return {packed, cu};
}

at::Tensor pack_rows_cpu(const at::Tensor& X, const at::Tensor& cu_seqlens, int64_t T) {
  constexpr const char* op = "fastbert::pack_rows";
  TORCH_CHECK(X.device().is_cpu(), op, ": X must be a CPU tensor, got ", X.device());
  TORCH_CHECK(X.dim() >= 2, op, ": X must be [B, L, ...], got shape ", X.sizes());
  TORCH_CHECK(cu_seqlens.numel() == X.size(0) + 1, op, ": cu_seqlens must have B+1 = ", X.size(0) + 1,
              " entries, got ", cu_seqlens.numel());
  check_cu_seqlens(cu_seqlens, T, X.size(1), op);
  std::vector<int64_t> shape(X.sizes().begin(), X.sizes().end());
  shape.erase(shape.begin());
  shape[0] = T;
  const at::Tensor Xc = X.contiguous(), cu = cu_seqlens.contiguous();
  at::Tensor packed = poison_if_testing(at::empty(shape, X.options()));
  if (packed.numel() > 0) {
    copy_sequences(cu, X.size(1), row_bytes_of(X, 2), static_cast<char*>(Xc.data_ptr()),
                   static_cast<char*>(packed.data_ptr()), /*to_packed=*/true);
    const int64_t used = cu.data_ptr<int32_t>()[cu.numel() - 1];
    if (used < T) packed.narrow(0, used, T - used).zero_();  // row padding: zero gradient
  }
  return packed;
}

at::Tensor unpack_cpu(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t L) {
  constexpr const char* op = "fastbert::unpack";
  TORCH_CHECK(packed.device().is_cpu(), op, ": packed must be a CPU tensor, got ", packed.device());
  TORCH_CHECK(packed.dim() >= 1, op, ": packed must be [T, ...], got a 0-d tensor");
  TORCH_CHECK(L >= 0, op, ": L must be >= 0, got ", L);
  check_cu_seqlens(cu_seqlens, packed.size(0), L, op);
  const int64_t B = cu_seqlens.numel() - 1;
  std::vector<int64_t> shape{B, L};
  shape.insert(shape.end(), packed.sizes().begin() + 1, packed.sizes().end());
  const at::Tensor pc = packed.contiguous(), cu = cu_seqlens.contiguous();
  at::Tensor out = poison_if_testing(at::empty(shape, packed.options()));
  if (out.numel() > 0)
    copy_sequences(cu, L, row_bytes_of(packed, 1), static_cast<char*>(out.data_ptr()),
                   static_cast<char*>(pc.data_ptr()), /*to_packed=*/false);
  return out;
}

}  // namespace
}  // namespace fastbert::cpu

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("pack", &fastbert::cpu::pack_cpu);
  m.impl("pack_rows", &fastbert::cpu::pack_rows_cpu);
  m.impl("unpack", &fastbert::cpu::unpack_cpu);
}
