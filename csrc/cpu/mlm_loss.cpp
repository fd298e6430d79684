// The fused masked-LM head loss on CPU (op contract: fastbert.ops.mlm_loss; reference:
// fastbert/backends/reference.py mlm_loss).
//
// Only the real prediction slots (weight > 0) are gathered and computed.  The vocab
// projection and the cross-entropy run over cache-sized tiles of [slots, vocab]: `chunk`
// vocab columns (a "piece") by kRowBlock slots.  A tile's logits come from one small GEMM
// (oneDNN's brgemm micro-kernel, fp32 accumulation), are used while they sit in L1/L2 and
// dropped, so the [S, V] logits never exist.
//
// Forward: each tile is folded into a running per-slot (max, sum of exp); the label logit is
// a dot product per slot.  Backward: each tile's logits are recomputed and turned into
// p_coef * softmax, which feeds dH (tile @ w2 piece) and dW2^T (Hn^T @ tile) at once, while
// both are hot; the -coef * onehot(label) part of dlogits is applied once, outside the
// tiles, as a gather / scatter-add.  The two threads split the vocab pieces (each keeps its
// own partial (max, sum) or dH; dW2 / db2 columns belong to one thread), and each thread
// walks all slot blocks for one piece, so the piece of w2 and of dW2^T stay in its L2.  The
// split is static, so results do not depend on timing (handing pieces out dynamically made
// the sums' grouping, hence the last bits, vary from run to run).
//
// With gradients needed, mlm_loss_fwd_bwd does both in one sweep, 3 GEMM passes instead of
// 4 (Liger-Kernel's fused linear cross-entropy): per slab of kSlab slots each thread keeps
// its vocab pieces' logits (a [256, V / 2] fp32 slab, beyond L2 but in L3), so the softmax
// can follow the slab's lse without recomputing them, then feeds dH and dW2^T as above.
// The forward-only path (mlm_loss) keeps the one-pass fold.
//
// bf16 runs the GEMMs in bf16 with fp32 accumulation (B operands in oneDNN's VNNI layout:
// pairs of K rows interleaved); logits, softmax and lse are always fp32.  fp64 runs the same
// tiles through at::mm (tests and gradcheck only).
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastbert {
namespace {

using at::Tensor;
using at::BFloat16;

// Slots per tile: [64, 512] fp32 logits are 128 KB, and w2's piece, dW2^T's piece and the
// tile together stay well inside a 1-2 MB L2.
constexpr int64_t kRowBlock = 64;

// Flat indices of the real slots, and the rows of X (viewed [B*L, C]) they read.
struct Slots {
  Tensor flat;    // [S] int64, index into the [B*P] slots
  Tensor tokens;  // [S] int64, index into the [B*L] tokens
};

Slots real_slots(const Tensor& X, const Tensor& positions, const Tensor& weights) {
  const int64_t P = positions.size(1), L = X.size(1);
  Tensor flat = (weights.reshape(-1) > 0).nonzero().reshape(-1);
  Tensor rows = at::div(flat, P, "floor");
  Tensor tokens = rows * L + positions.reshape(-1).index_select(0, flat);
  return {flat, tokens};
}

// The head's MLP on the gathered slots: Z = H0 w1^T + b1, A = relu(Z), Hn = LN(A).
struct Mlp {
  Tensor H0, Z, A, Hn, mean, rstd;
};

Mlp run_mlp(const Tensor& X, const Slots& s, const Tensor& w1, const Tensor& b1,
            const Tensor& ln_w, const Tensor& ln_b, double eps) {
  Mlp m;
  m.H0 = X.reshape({-1, X.size(2)}).index_select(0, s.tokens);
  m.Z = at::addmm(b1, m.H0, w1.t());
  m.A = at::relu(m.Z);
  auto ln = at::native_layer_norm(m.A, {w1.size(0)}, ln_w, ln_b, eps);
  m.Hn = std::get<0>(ln);
  m.mean = std::get<1>(ln);
  m.rstd = std::get<2>(ln);
  return m;
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// bf16 B operands go in VNNI layout ([K/2, N, 2]), so K is padded to even.
template <typename T>
constexpr bool kVnni = std::is_same_v<T, BFloat16>;

template <typename T>
int64_t pad_k(int64_t k) {
  return kVnni<T> ? (k + 1) / 2 * 2 : k;
}

// C[M, N] (ld_c) = (add ? C : 0) + A[M, K] (ld_a) @ B[K, N] (ld_b), accumulated in acc_t.
// bf16 B is in VNNI layout with ld_b columns.
void tile_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
               bool add, const float* A, const float* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}
void tile_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
               bool add, const BFloat16* A, const BFloat16* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/true);
}
void tile_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
               bool add, const double* A, const double* B, double* C) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  Tensor a = at::from_blob(const_cast<double*>(A), {M, K}, {lda, 1}, opt);
  Tensor b = at::from_blob(const_cast<double*>(B), {K, N}, {ldb, 1}, opt);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (add) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// Whether oneDNN's bf16 brgemm runs here (it needs the ukernel API and AVX512-core): checked
// once on a 2x16x2 product against the exact answer; if not, bf16 computes in fp32.
bool bf16_brgemm_ok() {
  static const bool ok = [] {
    try {
      // A = [[1, 2], [3, 4]]; B[k][n] = k + 1 in VNNI order ([1, 2] pairs per column).
      std::vector<BFloat16> a = {1.f, 2.f, 3.f, 4.f};
      std::vector<BFloat16> b(2 * 16);
      for (int n = 0; n < 16; ++n) b[2 * n] = 1.f, b[2 * n + 1] = 2.f;
      std::vector<float> c(2 * 16, -1.f);
      tile_gemm(2, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data());
      at::native::cpublas::brgemm_release(true);
      for (int n = 0; n < 16; ++n)
        if (c[n] != 5.f || c[16 + n] != 11.f) return false;
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// src [K, N] (any strides) as a GEMM B operand: contiguous, or VNNI [K/2, N, 2] (K padded
// with a zero row when odd).
template <typename T>
Tensor as_b_operand(const Tensor& src) {
  if (!kVnni<T>) return src.contiguous();
  const int64_t K = src.size(0), N = src.size(1);
  Tensor padded = K % 2 ? at::cat({src, at::zeros({1, N}, src.options())}) : src;
  return padded.reshape({(K + 1) / 2, 2, N}).permute({0, 2, 1}).contiguous();
}

// src [M, K] as a row-major A operand whose K is padded (zero columns) to `k_padded`.
Tensor as_a_operand(const Tensor& src, int64_t k_padded) {
  if (src.size(1) == k_padded) return src.contiguous();
  return at::constant_pad_nd(src, {0, k_padded - src.size(1)});
}

// fp32 exp: at::vec's exp_u20, as PyTorch's own CPU flash attention uses for its softmax
// (about 1.5x Sleef's exp here, well inside the fp32 tolerances).
template <typename acc_t>
at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// One row of a tile folded into the running (max m, sum of exp s) of its slot: the logits
// are row[j] + b[j] (the tile holds them without the bias).  Two passes over a row that sits
// in L1: the max, then the sum of exp.
template <typename acc_t>
void fold_row(const acc_t* row, const acc_t* b, int64_t n, acc_t& m, acc_t& s) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  Vec vmax(-inf);
  int64_t j = 0;
  for (; j + W <= n; j += W)
    vmax = at::vec::maximum(vmax, Vec::loadu(row + j) + Vec::loadu(b + j));
  if (j < n) {
    Vec x = Vec::loadu(row + j, n - j) + Vec::loadu(b + j, n - j);
    vmax = at::vec::maximum(vmax, Vec::set(Vec(-inf), x, n - j));
  }
  const acc_t new_m = std::max(m, at::vec::vec_reduce_all<acc_t>(
                                       [](Vec a, Vec c) { return at::vec::maximum(a, c); }, vmax));
  Vec vsum(0);
  const Vec vm(new_m);
  for (j = 0; j + W <= n; j += W) vsum += vexp(Vec::loadu(row + j) + Vec::loadu(b + j) - vm);
  if (j < n) {
    Vec x = vexp(Vec::loadu(row + j, n - j) + Vec::loadu(b + j, n - j) - vm);
    vsum += Vec::set(Vec(0), x, n - j);
  }
  s = s * std::exp(m - new_m) +
      at::vec::vec_reduce_all<acc_t>([](Vec a, Vec c) { return a + c; }, vsum);
  m = new_m;
}

// row[j] = c * exp(row[j] + b[j] - l); db[j] += row[j].
template <typename acc_t>
void scaled_softmax_row(acc_t* row, const acc_t* b, acc_t l, acc_t c, acc_t* db, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vl(l), vc(c);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec p = vexp(Vec::loadu(row + j) + Vec::loadu(b + j) - vl) * vc;
    p.store(row + j);
    (Vec::loadu(db + j) + p).store(db + j);
  }
  for (; j < n; ++j) {
    row[j] = c * std::exp(row[j] + b[j] - l);
    db[j] += row[j];
  }
}

// Rows [sb, n] of an fp32 tile (ld) -> bf16: `plain` [sb, ld] (row-major, the A of dH) and
// `vnni` [ceil(sb/2), ld, 2] (the B of dW2^T); an odd last row pairs with zeros.  Columns
// n..ld-1 are zero in the tile already.
void tile_to_bf16(const float* tile, int64_t sb, int64_t ld, BFloat16* plain, BFloat16* vnni) {
  using fVec = at::vec::Vectorized<float>;
  constexpr int64_t W = fVec::size();
  at::vec::convert(tile, plain, sb * ld);
  std::vector<float> zeros;
  for (int64_t r = 0; r < sb; r += 2) {
    const float* r0 = tile + r * ld;
    const float* r1 = r0 + ld;
    if (r + 1 >= sb) {
      zeros.assign(ld, 0.f);
      r1 = zeros.data();
    }
    BFloat16* out = vnni + r * ld;  // row pair r / 2: 2 * ld elements
    int64_t j = 0;
    for (; j + W <= ld; j += W) {
      auto ab = at::vec::interleave2<float>(fVec::loadu(r0 + j), fVec::loadu(r1 + j));
      at::vec::convert_float_bfloat16(std::get<0>(ab), std::get<1>(ab)).store(out + 2 * j);
    }
    for (; j < ld; ++j) {
      out[2 * j] = BFloat16(r0[j]);
      out[2 * j + 1] = BFloat16(r1[j]);
    }
  }
}

// The tiles' shared operands, packed once per call.
template <typename T>
struct Operands {
  int64_t S, V, K;  // real slots, vocab, hidden padded for VNNI
  Tensor Hn;        // A of the logits: [S, K] in T
  int64_t chunk;
  Tensor w2t;       // B of the logits, per vocab piece: w2^T [pieces, K, chunk] (bf16: VNNI)
  Tensor b2;        // [V] acc_t
};

template <typename T>
Operands<T> pack_operands(const Tensor& Hn, const Tensor& w2, const Tensor& b2, int64_t chunk) {
  using acc_t = acc_of<T>;
  const auto dt = c10::CppTypeToScalarType<T>::value;
  Operands<T> o;
  o.S = Hn.size(0);
  o.V = w2.size(0);
  o.K = pad_k<T>(w2.size(1));
  o.Hn = as_a_operand(Hn.to(dt), o.K);
  // bf16: even pieces, so every piece starts on a VNNI row pair of w2 (the B of dH).
  chunk = o.chunk = pad_k<T>(chunk);
  const int64_t np = (o.V + chunk - 1) / chunk;
  // Each piece's B contiguous (ld = chunk): 1.25x the GEMM rate of ld = V here.
  Tensor w = at::constant_pad_nd(w2.to(dt), {0, o.K - w2.size(1), 0, np * chunk - o.V});
  o.w2t = kVnni<T> ? w.view({np, chunk, o.K / 2, 2}).permute({0, 2, 1, 3}).contiguous()
                   : w.view({np, chunk, o.K}).permute({0, 2, 1}).contiguous();
  o.b2 = b2.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return o;
}

// Vocab pieces [p0, p1) of `chunk` columns each.
int64_t n_pieces(int64_t V, int64_t chunk) { return (V + chunk - 1) / chunk; }

// Per-slot lse over the whole vocab, [S] acc_t.
template <typename T>
Tensor tiled_lse(const Operands<T>& o) {
  using acc_t = acc_of<T>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t S = o.S, V = o.V, K = o.K, chunk = o.chunk;
  const int64_t nt = at::get_num_threads();
  // Each thread's running (max, sum of exp) over its own pieces, merged below.
  Tensor maxs = at::full({nt, S}, -std::numeric_limits<double>::infinity(),
                         at::TensorOptions().dtype(acc));
  Tensor sums = at::zeros({nt, S}, at::TensorOptions().dtype(acc));
  const T* Hn = o.Hn.template const_data_ptr<T>();
  const T* w2t = o.w2t.template const_data_ptr<T>();
  const acc_t* b2 = o.b2.template const_data_ptr<acc_t>();
  at::parallel_for(0, n_pieces(V, chunk), 1, [&](int64_t p0, int64_t p1) {
    const int64_t t = at::get_thread_num();
    acc_t* run_max = maxs.data_ptr<acc_t>() + t * S;
    acc_t* run_sum = sums.data_ptr<acc_t>() + t * S;
    std::vector<acc_t> tile(kRowBlock * chunk);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t v0 = p * chunk, n = std::min(chunk, V - v0);
      for (int64_t s0 = 0; s0 < S; s0 += kRowBlock) {
        const int64_t sb = std::min(kRowBlock, S - s0);
        tile_gemm(sb, n, K, K, chunk, n, false, Hn + s0 * K, w2t + p * K * chunk,
                  tile.data());
        for (int64_t i = 0; i < sb; ++i)
          fold_row(tile.data() + i * n, b2 + v0, n, run_max[s0 + i], run_sum[s0 + i]);
      }
    }
    if (!std::is_same_v<T, double>) at::native::cpublas::brgemm_release(kVnni<T>);
  });
  Tensor m = std::get<0>(maxs.max(0));
  return m + at::log((sums * at::exp(maxs - m)).sum(0));
}

// The most the separate backward's per-thread dH buffers may take together.
constexpr int64_t kBackwardBufferBytes = int64_t(256) << 20;

// The softmax part of the vocab projection's backward, all acc_t: dHn [S, C'] with
// dHn_i = p_coef_i * softmax_i @ w2, dW2 [V, C'] (a transposed view) = sum_i p_coef_i *
// softmax_i^T Hn_i, db2 [V] = sum_i p_coef_i * softmax_i.
template <typename T>
std::tuple<Tensor, Tensor, Tensor> tiled_softmax_grads(const Operands<T>& o, const Tensor& w2,
                                                        const Tensor& lse_,
                                                        const Tensor& pc_) {
  using acc_t = acc_of<T>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const int64_t S = o.S, V = o.V, K = o.K, Cp = w2.size(1), chunk = o.chunk;
  const int64_t Sp = pad_k<T>(S), np = n_pieces(V, chunk);
  // One [S, K] dH buffer per chunk of pieces, as many as the threads, the pieces and
  // kBackwardBufferBytes allow (one buffer per core would take GBs on a 64-core server at
  // the book's slot counts); fewer buffers mean fewer threads here.
  const int64_t n_buf = std::clamp<int64_t>(
      kBackwardBufferBytes / std::max<int64_t>(1, S * K * int64_t(sizeof(acc_t))), 1,
      std::min<int64_t>(at::get_num_threads(), np));
  // B of dH: w2 [V, K] (bf16: VNNI, V padded to even); A of dW2^T: Hn^T [K, Sp].
  const Tensor w2b = as_b_operand<T>(as_a_operand(w2.to(dt), K));
  const Tensor HnT = as_a_operand(o.Hn.t(), Sp);
  Tensor dH = at::zeros({n_buf, S, K}, at::TensorOptions().dtype(acc));
  Tensor dW2t = at::empty({K, V}, at::TensorOptions().dtype(acc));
  Tensor db2 = at::zeros({V}, at::TensorOptions().dtype(acc));
  const Tensor lse = lse_.contiguous(), pc = pc_.contiguous();
  const T* Hn = o.Hn.template const_data_ptr<T>();
  const T* w2t = o.w2t.template const_data_ptr<T>();
  const T* w2p = w2b.template const_data_ptr<T>();
  const T* hnt = HnT.template const_data_ptr<T>();
  const acc_t* b2 = o.b2.template const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* pc_p = pc.const_data_ptr<acc_t>();
  // Buffer b takes pieces [np * b / n_buf, np * (b + 1) / n_buf): one thread each.
  at::parallel_for(0, n_buf, 1, [&](int64_t b0, int64_t b1) {
    acc_t* dw = dW2t.data_ptr<acc_t>();
    acc_t* db = db2.data_ptr<acc_t>();
    const int64_t ld_max = pad_k<T>(chunk);
    std::vector<acc_t> tile(kRowBlock * ld_max, acc_t(0));
    std::vector<T> plain(kVnni<T> ? kRowBlock * ld_max : 0);
    std::vector<T> vnni(kVnni<T> ? (kRowBlock + 1) * ld_max : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = np * b / n_buf, p1 = np * (b + 1) / n_buf;
      acc_t* dh = dH.data_ptr<acc_t>() + b * S * K;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t v0 = p * chunk, n = std::min(chunk, V - v0), ld = pad_k<T>(n);
        for (int64_t s0 = 0; s0 < S; s0 += kRowBlock) {
          const int64_t sb = std::min(kRowBlock, S - s0);
          tile_gemm(sb, n, K, K, chunk, ld, false, Hn + s0 * K, w2t + p * K * chunk,
                    tile.data());
          for (int64_t i = 0; i < sb; ++i) {
            acc_t* row = tile.data() + i * ld;
            scaled_softmax_row(row, b2 + v0, lse_p[s0 + i], pc_p[s0 + i], db + v0, n);
            if (ld > n) row[n] = 0;  // the VNNI pad column takes no part
          }
          const T* dl_a = nullptr;
          const T* dl_b = nullptr;
          if constexpr (kVnni<T>) {
            tile_to_bf16(tile.data(), sb, ld, plain.data(), vnni.data());
            dl_a = plain.data();
            dl_b = vnni.data();
          } else {
            dl_a = dl_b = tile.data();
          }
          // dH[s0:s0+sb] += dl [sb, ld] @ w2[v0:v0+ld];  dW2^T[:, v0:v0+n] (+)= Hn^T @ dl.
          tile_gemm(sb, K, ld, ld, K, K, true, dl_a, w2p + v0 * K, dh + s0 * K);
          tile_gemm(K, n, pad_k<T>(sb), Sp, ld, V, s0 > 0, hnt + s0, dl_b, dw + v0);
        }
      }
    }
    if (!std::is_same_v<T, double>) at::native::cpublas::brgemm_release(kVnni<T>);
  });
  Tensor dHn = dH.sum(0).narrow(1, 0, Cp);
  return {dHn, dW2t.narrow(0, 0, Cp).t(), db2};
}


// Slots per slab of the fused forward + backward: each thread holds [kSlab, its vocab half]
// fp32 logits (10 MB at the book's shape) between computing them and their softmax.
// Measured in a prototype at that shape: 256 beat 64 and 128 (re-reading W and dW per slab
// costs less with fewer, taller slabs) and tied 512.
constexpr int64_t kSlab = 256;

// The softmax part of the vocab projection's gradients and the lse, in one sweep (3 GEMM
// passes instead of the 4 of forward + backward): for each slab of kSlab slots, each thread
// computes the logits of its vocab pieces into its slab and folds them into partial
// (max, sum); after a barrier every thread merges the partials into the slab's lse, then turns
// its pieces into coef * softmax in place and feeds its own [kSlab, K] dH buffer and dW2^T;
// after a third barrier each thread sums the buffers' rows of its share of the slab into dH
// (fixed thread order: deterministic) and zeroes them for the next slab.  The per-thread
// buffers are one slab tall (not [S, K] each, which at 64 threads and the book's slot counts
// would be GBs), and there are at most as many threads as vocab pieces (a thread without a
// piece would only hold empty buffers).  Returns (lse [S], dHn [S, C'], dW2 [V, C'] (a
// transposed view), db2 [V]), all acc_t.
//
// An exception must not leave an OpenMP region (std::terminate): each thread runs its work
// through `guarded`, which records the first exception and makes every thread skip the rest
// of the work while still passing every barrier (a thread that left early would deadlock
// the others); it is rethrown after the region.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_lse_and_grads(const Operands<T>& o,
                                                                const Tensor& w2,
                                                                const Tensor& coef_) {
  using acc_t = acc_of<T>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const int64_t S = o.S, V = o.V, K = o.K, Cp = w2.size(1), chunk = o.chunk;
  const int64_t np = (V + chunk - 1) / chunk, Sp = pad_k<T>(S), ld_max = pad_k<T>(chunk);
  // fp64 tiles call at::mm, which does not belong inside an OpenMP region: one thread.
  const int nt = std::is_same_v<T, double>
                     ? 1
                     : static_cast<int>(std::max<int64_t>(
                           1, std::min<int64_t>(at::get_num_threads(), np)));
  // Test hook (tests/test_mlm_loss.py): the last thread throws inside the region.
  const bool inject_failure = std::getenv("FASTBERT_TEST_MLM_LOSS_THROW_IN_REGION") != nullptr;
  const Tensor w2b = as_b_operand<T>(as_a_operand(w2.to(dt), K));
  const Tensor HnT = as_a_operand(o.Hn.t(), Sp);
  const auto opt = at::TensorOptions().dtype(acc);
  Tensor lse = at::empty({S}, opt);
  Tensor dH = at::empty({S, K}, opt);                   // every row written by one reducer
  Tensor dh_bufs = at::zeros({nt, kSlab, K}, opt);      // zeroed again by the reducers
  Tensor dW2t = at::zeros({K, V}, opt);
  Tensor db2 = at::zeros({V}, opt);
  Tensor part_max = at::empty({nt, kSlab}, opt), part_sum = at::empty({nt, kSlab}, opt);
  const Tensor coef = coef_.contiguous();
  const T* Hn = o.Hn.template const_data_ptr<T>();
  const T* w2t = o.w2t.template const_data_ptr<T>();
  const T* w2p = w2b.template const_data_ptr<T>();
  const T* hnt = HnT.template const_data_ptr<T>();
  const acc_t* b2 = o.b2.template const_data_ptr<acc_t>();
  const acc_t* cf = coef.const_data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* dh_out = dH.data_ptr<acc_t>();
  acc_t* bufs = dh_bufs.data_ptr<acc_t>();
  acc_t* pmax = part_max.data_ptr<acc_t>();
  acc_t* psum = part_sum.data_ptr<acc_t>();
  acc_t* dw = dW2t.data_ptr<acc_t>();
  acc_t* db = db2.data_ptr<acc_t>();
  std::exception_ptr first_error;
  std::atomic<bool> failed{false};
  auto guarded = [&](auto&& work) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
#pragma omp critical(fastbert_mlm_loss_error)
      if (!first_error) first_error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
#pragma omp parallel num_threads(nt)
  {
    const int t = nt == 1 ? 0 : omp_get_thread_num();
    const int nth = nt == 1 ? 1 : omp_get_num_threads();
    // A static split of the pieces: results do not depend on timing.
    const int64_t p0 = np * t / nth, p1 = np * (t + 1) / nth;
    std::vector<acc_t> slab;
    std::vector<T> plain, vnni;
    std::vector<acc_t> my_lse;
    guarded([&] {
      slab.assign((p1 - p0) * kSlab * ld_max, acc_t(0));
      plain.resize(kVnni<T> && p1 > p0 ? kSlab * ld_max : 0);
      vnni.resize(kVnni<T> && p1 > p0 ? (kSlab + 1) * ld_max : 0);
      my_lse.resize(kSlab);
    });
    acc_t* dh = bufs + t * kSlab * K;
    acc_t* run_max = pmax + t * kSlab;
    acc_t* run_sum = psum + t * kSlab;
    for (int64_t s0 = 0; s0 < S; s0 += kSlab) {
      const int64_t sb = std::min(kSlab, S - s0);
      guarded([&] {
        std::fill(run_max, run_max + sb, -std::numeric_limits<acc_t>::infinity());
        std::fill(run_sum, run_sum + sb, acc_t(0));
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t v0 = p * chunk, n = std::min(chunk, V - v0), ld = pad_k<T>(n);
          acc_t* tile = slab.data() + (p - p0) * kSlab * ld_max;
          tile_gemm(sb, n, K, K, chunk, ld, false, Hn + s0 * K, w2t + p * K * chunk, tile);
          for (int64_t i = 0; i < sb; ++i)
            fold_row(tile + i * ld, b2 + v0, n, run_max[i], run_sum[i]);
        }
      });
#pragma omp barrier
      guarded([&] {
        for (int64_t i = 0; i < sb; ++i) {
          acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
          for (int u = 0; u < nth; ++u) m = std::max(m, pmax[u * kSlab + i]);
          for (int u = 0; u < nth; ++u)
            sum += psum[u * kSlab + i] * std::exp(pmax[u * kSlab + i] - m);
          my_lse[i] = m + std::log(sum);
        }
        if (t == 0) std::copy(my_lse.begin(), my_lse.begin() + sb, lse_p + s0);
      });
#pragma omp barrier
      guarded([&] {
        TORCH_CHECK(!(inject_failure && t == nth - 1),
                    "mlm_loss: failure injected in thread ", t, " of ", nth,
                    " (FASTBERT_TEST_MLM_LOSS_THROW_IN_REGION)");
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t v0 = p * chunk, n = std::min(chunk, V - v0), ld = pad_k<T>(n);
          acc_t* tile = slab.data() + (p - p0) * kSlab * ld_max;
          for (int64_t i = 0; i < sb; ++i) {
            acc_t* row = tile + i * ld;
            scaled_softmax_row(row, b2 + v0, my_lse[i], cf[s0 + i], db + v0, n);
            if (ld > n) row[n] = 0;  // the VNNI pad column takes no part
          }
          const T* dl_a = nullptr;
          const T* dl_b = nullptr;
          if constexpr (kVnni<T>) {
            tile_to_bf16(tile, sb, ld, plain.data(), vnni.data());
            dl_a = plain.data();
            dl_b = vnni.data();
          } else {
            dl_a = dl_b = tile;
          }
          tile_gemm(sb, K, ld, ld, K, K, true, dl_a, w2p + v0 * K, dh);
          tile_gemm(K, n, pad_k<T>(sb), Sp, ld, V, true, hnt + s0, dl_b, dw + v0);
        }
      });
#pragma omp barrier
      guarded([&] {
        const int64_t r0 = sb * t / nth, r1 = sb * (t + 1) / nth;
        for (int64_t r = r0; r < r1; ++r) {
          acc_t* out = dh_out + (s0 + r) * K;
          std::fill(out, out + K, acc_t(0));
          for (int u = 0; u < nth; ++u) {
            acc_t* src = bufs + (u * kSlab + r) * K;
            for (int64_t j = 0; j < K; ++j) out[j] += src[j];
            std::fill(src, src + K, acc_t(0));
          }
        }
      });
      // The next slab's first phase writes only this thread's own partials and buffers,
      // which no other thread reads before the next barrier: no barrier needed here.
    }
    guarded([&] { at::native::cpublas::brgemm_release(kVnni<T>); });
  }
  if (first_error) std::rethrow_exception(first_error);
  Tensor dHn = dH.narrow(1, 0, Cp);
  return {lse, dHn, dW2t.narrow(0, 0, Cp).t(), db2};
}

at::ScalarType acc_type(const Tensor& X) {
  return X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The GEMM type the tiles run in: the input's, except bf16 without a bf16 brgemm (fp32).
at::ScalarType compute_type(const Tensor& X) {
  if (X.scalar_type() == at::kBFloat16 && !bf16_brgemm_ok()) return at::kFloat;
  return X.scalar_type();
}

void check_inputs(const Tensor& X, const Tensor& positions, const Tensor& weights,
                  const Tensor& labels, const Tensor& w1, const Tensor& w2, int64_t chunk) {
  TORCH_CHECK(X.device().is_cpu(), "mlm_loss (cpp): CPU tensors only, got ", X.device());
  TORCH_CHECK(X.dim() == 3 && positions.dim() == 2 && weights.sizes() == positions.sizes() &&
                  labels.sizes() == positions.sizes() && positions.size(0) == X.size(0),
              "mlm_loss: X must be [B, L, C] and positions, weights, labels [B, P]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && labels.scalar_type() == at::kLong,
              "mlm_loss: positions and labels must be int64");
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2 && w1.size(1) == X.size(2) &&
                  w2.size(1) == w1.size(0),
              "mlm_loss: head weight shapes do not match X");
  TORCH_CHECK(chunk > 0, "mlm_loss: the vocab chunk must be positive, got ", chunk);
  TORCH_CHECK(X.scalar_type() == w1.scalar_type() && X.scalar_type() == w2.scalar_type(),
              "mlm_loss: X, w1 and w2 must share a dtype");
  const auto dt = X.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "mlm_loss (cpp): float32, bfloat16 or float64 only, got ", dt);
}

}  // namespace

namespace {

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// From the softmax part of the vocab projection's gradients (acc_t; coef [S, 1] the slots'
// d loss / d CE): the -coef * onehot(y) part of dlogits, then back through LayerNorm, ReLU
// and the first Linear, scatter-added into X (positions may repeat).  Grads in the inputs'
// dtypes.
Grads finish_grads(const Tensor& X, const Slots& s, const Mlp& m, const Tensor& y,
                   const Tensor& coef, Tensor dHn, const Tensor& dw2, Tensor db2,
                   const Tensor& w1, const Tensor& b1, const Tensor& ln_w, const Tensor& ln_b,
                   const Tensor& w2, const Tensor& b2) {
  const auto acc = coef.scalar_type();
  const int64_t Cp = w1.size(0);
  dHn.sub_(w2.index_select(0, y).to(acc) * coef);
  Tensor dw2_acc = dw2.contiguous();
  dw2_acc.index_add_(0, y, m.Hn.to(acc) * coef, -1);
  db2.index_add_(0, y, coef.squeeze(1), -1);
  auto ln_grads = at::native_layer_norm_backward(dHn.to(X.scalar_type()), m.A, {Cp}, m.mean,
                                                 m.rstd, ln_w, ln_b, {true, true, true});
  Tensor dZ = std::get<0>(ln_grads).masked_fill_(m.Z <= 0, 0);
  Tensor dw1 = at::mm(dZ.t(), m.H0);
  Tensor db1 = dZ.sum(0, false, acc).to(b1.scalar_type());
  Tensor dX = at::zeros_like(X);
  dX.view({-1, X.size(2)}).index_add_(0, s.tokens, at::mm(dZ, w1));
  return {dX, dw1, db1, std::get<1>(ln_grads), std::get<2>(ln_grads),
          dw2_acc.to(w2.scalar_type()), db2.to(b2.scalar_type())};
}

Grads zero_grads(const Tensor& X, const Tensor& w1, const Tensor& b1, const Tensor& ln_w,
                 const Tensor& ln_b, const Tensor& w2, const Tensor& b2) {
  return {at::zeros_like(X), at::zeros_like(w1), at::zeros_like(b1), at::zeros_like(ln_w),
          at::zeros_like(ln_b), at::zeros_like(w2), at::zeros_like(b2)};
}

}  // namespace

// Returns (loss, lse[B, P]): loss = sum_i w_i CE_i / sum_i w_i over the real slots (0 if
// none); lse holds each real slot's logsumexp (0 at padding slots).  Both are float32
// (float64 for float64 inputs).
std::tuple<Tensor, Tensor> mlm_loss_cpu(const Tensor& X_, const Tensor& positions_,
                                        const Tensor& weights_, const Tensor& labels_,
                                        const Tensor& w1, const Tensor& b1, const Tensor& ln_w,
                                        const Tensor& ln_b, const Tensor& w2_, const Tensor& b2,
                                        double eps, int64_t chunk) {
  check_inputs(X_, positions_, weights_, labels_, w1, w2_, chunk);
  at::NoGradGuard no_grad;
  const Tensor X = X_.contiguous(), positions = positions_.contiguous();
  const Tensor weights = weights_.contiguous(), labels = labels_.contiguous();
  const Tensor w2 = w2_.contiguous();
  const auto acc = acc_type(X);

  Slots s = real_slots(X, positions, weights);
  const int64_t S = s.flat.size(0);
  Tensor lse_all = at::zeros({positions.numel()}, X.options().dtype(acc));
  if (S == 0) return {at::zeros({}, X.options().dtype(acc)), lse_all.view(positions.sizes())};

  Mlp m = run_mlp(X, s, w1, b1, ln_w, ln_b, eps);
  Tensor lse;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, compute_type(X), "mlm_loss", [&] {
    lse = tiled_lse<scalar_t>(pack_operands<scalar_t>(m.Hn, w2, b2, chunk));
  });
  // The label logit of each slot: one dot product, in the accumulation type.
  Tensor y = labels.reshape(-1).index_select(0, s.flat);
  Tensor label_logit = (m.Hn.to(acc) * w2.index_select(0, y).to(acc)).sum(1) +
                       b2.index_select(0, y).to(acc);
  Tensor w = weights.reshape(-1).index_select(0, s.flat).to(acc);
  Tensor loss = ((lse - label_logit) * w).sum() / w.sum();
  lse_all.index_copy_(0, s.flat, lse);
  return {loss, lse_all.view(positions.sizes())};
}

// Gradients for X and the six head parameters, given d loss and (optionally) d lse.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlm_loss_backward_cpu(
    const Tensor& grad, const std::optional<Tensor>& grad_lse, const Tensor& X_,
    const Tensor& positions_, const Tensor& weights_, const Tensor& labels_, const Tensor& w1,
    const Tensor& b1, const Tensor& ln_w, const Tensor& ln_b, const Tensor& w2_,
    const Tensor& b2, double eps, int64_t chunk, const Tensor& lse_all) {
  check_inputs(X_, positions_, weights_, labels_, w1, w2_, chunk);
  at::NoGradGuard no_grad;
  const Tensor X = X_.contiguous(), positions = positions_.contiguous();
  const Tensor weights = weights_.contiguous(), labels = labels_.contiguous();
  const Tensor w2 = w2_.contiguous();
  const auto acc = acc_type(X);

  Slots s = real_slots(X, positions, weights);
  const int64_t S = s.flat.size(0);
  if (S == 0) return zero_grads(X, w1, b1, ln_w, ln_b, w2, b2);
  Mlp m = run_mlp(X, s, w1, b1, ln_w, ln_b, eps);
  Tensor y = labels.reshape(-1).index_select(0, s.flat);
  Tensor w = weights.reshape(-1).index_select(0, s.flat).to(acc);
  // d loss / d CE_i = grad * w_i / sum w;  d CE_i / d logits_i = softmax_i - onehot(y_i);
  // d lse_i / d logits_i = softmax_i.
  Tensor coef = (w * (grad.to(acc) / w.sum())).unsqueeze(1);  // [S, 1]
  Tensor p_coef = coef.squeeze(1);
  if (grad_lse.has_value() && grad_lse->defined()) {
    p_coef = p_coef + grad_lse->reshape(-1).index_select(0, s.flat).to(acc);
  }
  Tensor lse = lse_all.reshape(-1).index_select(0, s.flat).to(acc);

  Tensor dHn, dw2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, compute_type(X), "mlm_loss_backward", [&] {
    std::tie(dHn, dw2, db2) = tiled_softmax_grads<scalar_t>(
        pack_operands<scalar_t>(m.Hn, w2, b2, chunk), w2, lse, p_coef);
  });
  return finish_grads(X, s, m, y, coef, dHn, dw2, db2, w1, b1, ln_w, ln_b, w2, b2);
}

// The loss and its gradients for d loss = 1 in one sweep over the vocab (3 GEMM passes
// instead of the 4 of mlm_loss + mlm_loss_backward): what autograd uses when gradients are
// needed (the glue scales them by d loss in the backward).  Returns (loss, dX, dw1, db1,
// dln_weight, dln_bias, dw2, db2), the loss as mlm_loss's, the grads in the inputs' dtypes.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlm_loss_fwd_bwd_cpu(
    const Tensor& X_, const Tensor& positions_, const Tensor& weights_, const Tensor& labels_,
    const Tensor& w1, const Tensor& b1, const Tensor& ln_w, const Tensor& ln_b,
    const Tensor& w2_, const Tensor& b2, double eps, int64_t chunk) {
  check_inputs(X_, positions_, weights_, labels_, w1, w2_, chunk);
  at::NoGradGuard no_grad;
  const Tensor X = X_.contiguous(), positions = positions_.contiguous();
  const Tensor weights = weights_.contiguous(), labels = labels_.contiguous();
  const Tensor w2 = w2_.contiguous();
  const auto acc = acc_type(X);

  Slots s = real_slots(X, positions, weights);
  const int64_t S = s.flat.size(0);
  if (S == 0) {
    return std::tuple_cat(std::make_tuple(at::zeros({}, X.options().dtype(acc))),
                          zero_grads(X, w1, b1, ln_w, ln_b, w2, b2));
  }
  Mlp m = run_mlp(X, s, w1, b1, ln_w, ln_b, eps);
  Tensor y = labels.reshape(-1).index_select(0, s.flat);
  Tensor w = weights.reshape(-1).index_select(0, s.flat).to(acc);
  Tensor coef = (w / w.sum()).unsqueeze(1);  // d loss / d CE_i for d loss = 1
  Tensor lse, dHn, dw2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, compute_type(X), "mlm_loss_fwd_bwd", [&] {
    std::tie(lse, dHn, dw2, db2) = fused_lse_and_grads<scalar_t>(
        pack_operands<scalar_t>(m.Hn, w2, b2, chunk), w2, coef.squeeze(1));
  });
  Tensor label_logit = (m.Hn.to(acc) * w2.index_select(0, y).to(acc)).sum(1) +
                       b2.index_select(0, y).to(acc);
  Tensor loss = ((lse - label_logit) * w).sum() / w.sum();
  return std::tuple_cat(std::make_tuple(loss), finish_grads(X, s, m, y, coef, dHn, dw2, db2,
                                                            w1, b1, ln_w, ln_b, w2, b2));
}

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("mlm_loss", &mlm_loss_cpu);
  m.impl("mlm_loss_backward", &mlm_loss_backward_cpu);
  m.impl("mlm_loss_fwd_bwd", &mlm_loss_fwd_bwd_cpu);
}

}  // namespace fastbert
