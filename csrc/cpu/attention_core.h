// Fused CPU attention core, shared by varlen_attention.cpp (packed sequences) and
// attention.cpp (padded batches).
//
// One "problem" is one (sequence, head) pair: nq query rows and nk key rows, read through
// row strides from the caller's tensors (fp32 or bf16), so packed [T, H, D] and padded
// [N, L, D] layouts use the same code.  A problem runs on one thread with small fp32
// scratch tiles (K^T, V, a block of scores); nothing of size (rows x keys) is ever stored
// outside the thread.  Whole key rows fit in a tile, so the backward recomputes each row's
// softmax from q and k with the forward's exact arithmetic (bit-identical P; the per-row
// logsumexp is still returned).  Dropout keeps an element with a counter RNG keyed by
// (seed, row_base(i) + j), regenerated in the backward.
//
// Reference semantics: fastbert/backends/reference.py `attention` (d2l):
//   p = softmax(mask(q k^T * scale)); out = dropout(p) v
// where keys j >= lim(i) are masked (probability 0) and lim(i) == 0 gives a uniform row
// over all nk keys with no gradient to the scores (d2l's -1e6 fill).
#pragma once

// at::vec picks its instruction set from the CPU_CAPABILITY_* macros that setup.py sets per
// kernel variant (fastbert/cpu_variants.py), as torch's own build does per file.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/counter_rng.h"

// The kernels take fp32 and bf16 (fp32 accumulation).
#define FASTBERT_DISPATCH_FLOAT_BF16(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastbert {
namespace attn {

using Vec = at::vec::Vectorized<float>;
// Column paddings are multiples of 16 floats (one AVX-512 vector, two AVX2 vectors).
constexpr int64_t kPad = 16;
inline int64_t pad16(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// ----------------------------------------------------------------------------- tiny GEMM
// C[M, N] (+)= A[M, K] * B[K, N]: A element (i, k) at A[i * ars + k * acs] (so A may be
// read transposed without a copy), B row-major with ldb, C row-major with ldc, N a
// multiple of the vector width.  Register tile RM rows x NV vectors.
template <int RM, int NV>
inline void gemm_tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec::size();
  Vec acc[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * W) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * W);
    for (int r = 0; r < RM; ++r) {
      const Vec a(A[r * ars + k * acs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W);
}

template <int RM>
inline void gemm_rows(int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec::size();
  int64_t j = 0;
  for (; j + 4 * W <= N; j += 4 * W)
    gemm_tile<RM, 4>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
  switch ((N - j) / W) {
    case 3: gemm_tile<RM, 3>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate); break;
    case 2: gemm_tile<RM, 2>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate); break;
    case 1: gemm_tile<RM, 1>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate); break;
    default: break;
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4)
    gemm_rows<4>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: gemm_rows<3>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 2: gemm_rows<2>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 1: gemm_rows<1>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

// ----------------------------------------------------------------------------- loads/stores
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// dst[0:n] = src[0:n] * alpha (fp32), dst[n:npad] = 0.
template <typename T>
inline void load_row(const T* src, int64_t n, int64_t npad, float alpha, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * alpha;
  } else {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < n; ++d) {
      uint32_t u = static_cast<uint32_t>(bits[d]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      dst[d] = f * alpha;
    }
  }
  for (int64_t d = n; d < npad; ++d) dst[d] = 0.f;
}

template <typename T>
inline void store_row(const float* src, int64_t n, float alpha, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * alpha;
  } else {
    // Round to nearest even (at::vec::convert), after scaling in fp32.
    float tmp[512];
    for (int64_t d0 = 0; d0 < n; d0 += 512) {
      const int64_t m = std::min<int64_t>(512, n - d0);
      for (int64_t d = 0; d < m; ++d) tmp[d] = src[d0 + d] * alpha;
      at::vec::convert(tmp, dst + d0, m);
    }
  }
}

// rows x n block of a strided tensor -> fp32 [rows, npad] (alpha-scaled, zero padded).
template <typename T>
inline void load_block(const T* src, int64_t rs, int64_t rows, int64_t n, int64_t npad,
                       float alpha, float* dst) {
  for (int64_t r = 0; r < rows; ++r) load_row(src + r * rs, n, npad, alpha, dst + r * npad);
}

// rows x n block -> transposed fp32 [n, ldt] (columns rows..ldt zero).  Strided reads and
// contiguous writes: the block is small enough to stay in L1 across the n passes.
template <typename T>
inline void load_block_t(const T* src, int64_t rs, int64_t rows, int64_t n, int64_t ldt,
                         float* dst) {
  for (int64_t d = 0; d < n; ++d) {
    float* out = dst + d * ldt;
    const T* s = src + d;
    for (int64_t r = 0; r < rows; ++r) out[r] = to_float(s[r * rs]);
    for (int64_t r = rows; r < ldt; ++r) out[r] = 0.f;
  }
}

// ----------------------------------------------------------------------------- problems
// One (sequence, head) problem.  Strides are in elements.
template <typename T>
struct Problem {
  const T* q; const T* k; const T* v;
  int64_t q_rs, k_rs, v_rs;
  // Row strides of the gradients dq, dk, dv in the backward; 0: the input's (q_rs ...).
  int64_t dq_rs = 0, dk_rs = 0, dv_rs = 0;
  int64_t nq, nk;
  // Key limit per query row: lim_rows ? lim_rows[i] : lim.  0 means a uniform row.
  const int32_t* lim_rows;
  int64_t lim;
  // Dropout counter of element (i, j) = drop_base + i * drop_rs + j.
  uint64_t drop_base, drop_rs;
  int64_t lim_of(int64_t i) const { return lim_rows ? lim_rows[i] : lim; }
};

struct Dropout {
  float p = 0.f;
  uint64_t seed = 0;
  bool on() const { return p > 0.f; }
};

// keep[j] = keep-scale 1/(1-p) or 0, for j < n (common/counter_rng.h).
inline void dropout_row(const Dropout& dr, uint64_t base, int64_t n, float* keep) {
  dropout_keep_scale_row(dr.seed, base, dr.p, 1.f / (1.f - dr.p), n, keep);
}

constexpr int64_t kRowBlock = 32;

// Per-thread scratch, grown on demand and reused across problems.
struct Scratch {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
};

// Effective key count of a row: the keys a row's probabilities can be non-zero on.
inline int64_t row_keys(int64_t lim, int64_t nk) { return lim == 0 ? nk : std::min(lim, nk); }

// Probabilities of one row from its unscaled scores s[0:nkp] (q.k), in place: softmax of
// s * scale over the valid keys, zero beyond them.  Returns the row's logsumexp (+inf marks
// a uniform row).  The forward and the backward both call this: bit-identical P.
inline float softmax_row(float* s, int64_t lim, int64_t nk, int64_t nkp, float scale) {
  if (lim == 0) {  // d2l: every key masked with the same value -> uniform
    const float u = 1.f / static_cast<float>(nk);
    for (int64_t j = 0; j < nk; ++j) s[j] = u;
    for (int64_t j = nk; j < nkp; ++j) s[j] = 0.f;
    return std::numeric_limits<float>::infinity();
  }
  const int64_t n = std::min(lim, nk);
  constexpr int W = Vec::size();
  // Scale and row max, a vector at a time (the tail as a partial vector).
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += W) {
    const int64_t m = std::min<int64_t>(W, n - j);
    const Vec x = Vec::loadu(s + j, m) * Vec(scale);
    x.store(s + j, m);
    vmax = at::vec::maximum(vmax, m == W ? x : Vec::set(Vec(-std::numeric_limits<float>::infinity()), x, m));
  }
  const float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  const Vec vmx(mx);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec e = (Vec::loadu(s + j) - vmx).exp();
    e.store(s + j);
    vsum = vsum + e;
  }
  if (j < n) {  // the tail as one partial vector (only its n - j lanes are stored)
    const Vec e = (Vec::loadu(s + j, n - j) - vmx).exp();
    e.store(s + j, n - j);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) sum += s[j];
  const float inv = 1.f / sum;
  for (j = 0; j < n; ++j) s[j] *= inv;
  for (j = n; j < nkp; ++j) s[j] = 0.f;
  return mx + std::log(sum);
}

// Forward of one problem: out rows (stride o_rs) and lse[i * lse_rs].
template <typename T>
void forward_problem(const Problem<T>& pr, int64_t D, int64_t Dv, float scale,
                     const Dropout& dr, T* out, int64_t o_rs, float* lse, int64_t lse_rs,
                     Scratch& scratch) {
  const int64_t nq = pr.nq, nk = pr.nk;
  if (nq == 0) return;
  const int64_t nkp = pad16(nk), Dp = pad16(D), Dvp = pad16(Dv);
  const int64_t mb = std::min(nq, kRowBlock);
  if (nk == 0) {  // no keys at all: an empty softmax; output zero (never happens in BERT)
    for (int64_t i = 0; i < nq; ++i) {
      std::fill(out + i * o_rs, out + i * o_rs + Dv, T(0.f));
      lse[i * lse_rs] = std::numeric_limits<float>::infinity();
    }
    return;
  }
  float* kt = scratch.get(D * nkp + nk * Dvp + mb * Dp + mb * nkp + mb * Dvp + nkp);
  float* vv = kt + D * nkp;      // V  [nk, Dvp]
  float* qs = vv + nk * Dvp;     // Q block [mb, Dp]
  float* s = qs + mb * Dp;       // scores / probabilities [mb, nkp]
  float* o = s + mb * nkp;       // output block [mb, Dvp]
  float* keep = o + mb * Dvp;    // dropout keep-scale row [nkp]
  load_block_t(pr.k, pr.k_rs, nk, D, nkp, kt);
  load_block(pr.v, pr.v_rs, nk, Dv, Dvp, 1.f, vv);
  for (int64_t i0 = 0; i0 < nq; i0 += mb) {
    const int64_t m = std::min(mb, nq - i0);
    load_block(pr.q + i0 * pr.q_rs, pr.q_rs, m, D, Dp, 1.f, qs);
    gemm(m, nkp, D, qs, Dp, 1, kt, nkp, s, nkp, false);  // q k^T (scaled in softmax_row)
    int64_t kmax = 0;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r, lim = pr.lim_of(i);
      float* srow = s + r * nkp;
      lse[i * lse_rs] = softmax_row(srow, lim, nk, nkp, scale);
      const int64_t n = row_keys(lim, nk);
      kmax = std::max(kmax, n);
      if (dr.on()) {
        dropout_row(dr, pr.drop_base + i * pr.drop_rs, n, keep);
        for (int64_t j = 0; j < n; ++j) srow[j] *= keep[j];
      }
    }
    gemm(m, Dvp, kmax, s, nkp, 1, vv, Dvp, o, Dvp, false);
    for (int64_t r = 0; r < m; ++r) store_row(o + r * Dvp, Dv, 1.f, out + (i0 + r) * o_rs);
  }
}

// Backward of one problem.  Gradient rows use dq_rs/dk_rs/dv_rs (default: the strides of
// their inputs); go (grad of out) uses o_rs.  `o` (the output) is not needed: the row sums
// D_i = sum_j P_ij dP_ij come from the recomputed tile, as torch's softmax backward does.
template <typename T>
void backward_problem(const Problem<T>& pr, int64_t D, int64_t Dv, float scale,
                      const Dropout& dr, const T* go, const T* o, int64_t o_rs,
                      const float* lse, int64_t lse_rs, T* dq, T* dk, T* dv,
                      Scratch& scratch) {
  const int64_t nq = pr.nq, nk = pr.nk;
  const int64_t nkp = pad16(nk), Dp = pad16(D), Dvp = pad16(Dv);
  const int64_t dq_rs = pr.dq_rs ? pr.dq_rs : pr.q_rs, dk_rs = pr.dk_rs ? pr.dk_rs : pr.k_rs,
                dv_rs = pr.dv_rs ? pr.dv_rs : pr.v_rs;
  if (nk == 0) {
    for (int64_t i = 0; i < nq; ++i) std::fill(dq + i * dq_rs, dq + i * dq_rs + D, T(0.f));
    return;
  }
  const int64_t mb = std::max<int64_t>(1, std::min(nq, kRowBlock));
  float* kt = scratch.get(D * nkp + nk * Dp + Dv * nkp + nk * Dp + nk * Dvp + mb * Dp +
                          mb * Dvp + 3 * mb * nkp + mb * Dp);
  float* kk = kt + D * nkp;     // K   [nk, Dp]
  float* vt = kk + nk * Dp;     // V^T [Dv, nkp]
  float* gk = vt + Dv * nkp;    // dK / scale [nk, Dp]
  float* gv = gk + nk * Dp;     // dV  [nk, Dvp]
  float* qs = gv + nk * Dvp;    // Q block [mb, Dp]
  float* dob = qs + mb * Dp;    // dO block [mb, Dvp]
  float* p = dob + mb * Dvp;    // probabilities [mb, nkp]
  float* pd = p + mb * nkp;     // dropped probabilities [mb, nkp]
  float* ds = pd + mb * nkp;    // dP then dS [mb, nkp]
  float* gq = ds + mb * nkp;    // dQ block [mb, Dp]
  load_block_t(pr.k, pr.k_rs, nk, D, nkp, kt);
  load_block(pr.k, pr.k_rs, nk, D, Dp, 1.f, kk);
  load_block_t(pr.v, pr.v_rs, nk, Dv, nkp, vt);
  std::fill(gk, gk + nk * Dp, 0.f);
  std::fill(gv, gv + nk * Dvp, 0.f);
  for (int64_t i0 = 0; i0 < nq; i0 += mb) {
    const int64_t m = std::min(mb, nq - i0);
    load_block(pr.q + i0 * pr.q_rs, pr.q_rs, m, D, Dp, 1.f, qs);
    load_block(go + i0 * o_rs, o_rs, m, Dv, Dvp, 1.f, dob);
    gemm(m, nkp, D, qs, Dp, 1, kt, nkp, p, nkp, false);       // scores
    gemm(m, nkp, Dv, dob, Dvp, 1, vt, nkp, ds, nkp, false);   // dP = dO V^T
    int64_t kmax = 0;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r, lim = pr.lim_of(i);
      float* prow = p + r * nkp;
      float* pdrow = pd + r * nkp;
      float* dsrow = ds + r * nkp;
      const int64_t n = row_keys(lim, nk);
      kmax = std::max(kmax, n);
      // The same arithmetic as the forward (whole rows fit in the tile): bit-identical P.
      softmax_row(prow, lim, nk, nkp, scale);
      if (dr.on()) {
        dropout_row(dr, pr.drop_base + i * pr.drop_rs, n, pdrow);  // keep-scale
        for (int64_t j = 0; j < n; ++j) {
          dsrow[j] *= pdrow[j];        // dP w.r.t. the undropped probabilities
          pdrow[j] *= prow[j];         // dropped probabilities
        }
      } else {
        std::copy(prow, prow + n, pdrow);
      }
      for (int64_t j = n; j < nkp; ++j) pdrow[j] = 0.f;
      // Di = sum_j P_j dP_j (the softmax backward's row sum; equals dO . O), vectorized:
      // P is 0 past n (softmax_row), so whole padded vectors add nothing extra.
      Vec vsum(0.f);
      for (int64_t j = 0; j < nkp; j += Vec::size())
        vsum = at::vec::fmadd(Vec::loadu(prow + j), Vec::loadu(dsrow + j), vsum);
      const float dsum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
      if (lim == 0) {  // masked scores get no gradient
        std::fill(dsrow, dsrow + nkp, 0.f);
      } else {  // dS = P * (dP - Di); P is 0 past n, so the padded tail comes out 0
        const Vec vd(dsum);
        for (int64_t j = 0; j < nkp; j += Vec::size())
          (Vec::loadu(prow + j) * (Vec::loadu(dsrow + j) - vd)).store(dsrow + j);
      }
    }
    // dV += Pd^T dO ; dK += dS^T Q (* scale at the end) ; dQ = dS K * scale
    gemm(kmax, Dvp, m, pd, 1, nkp, dob, Dvp, gv, Dvp, true);
    gemm(kmax, Dp, m, ds, 1, nkp, qs, Dp, gk, Dp, true);
    gemm(m, Dp, kmax, ds, nkp, 1, kk, Dp, gq, Dp, false);
    for (int64_t r = 0; r < m; ++r)
      store_row(gq + r * Dp, D, scale, dq + (i0 + r) * dq_rs);
  }
  for (int64_t j = 0; j < nk; ++j) {
    store_row(gk + j * Dp, D, scale, dk + j * dk_rs);
    store_row(gv + j * Dvp, Dv, 1.f, dv + j * dv_rs);
  }
}

}  // namespace attn
}  // namespace fastbert
