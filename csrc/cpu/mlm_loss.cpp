// The fused masked-LM head loss on CPU (op contract: fastbert.ops.mlm_loss; reference:
// fastbert/backends/reference.py mlm_loss).
//
// Only the real prediction slots (weight > 0) are gathered and computed.  The vocab
// projection and the cross-entropy run over chunks of the vocab: each chunk's logits
// [S, chunk] come from one GEMM and are folded into a running per-slot logsumexp (float32;
// float64 for float64 inputs), then dropped, so the [S, V] logits never exist.  The label
// logit is a dot product per slot.  The backward recomputes the small MLP and each chunk's
// logits, turns them into coef * softmax and feeds dH and dW2; the -coef * onehot(label)
// part of dlogits is applied once, outside the chunk loop, as a gather / scatter-add.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "cpu/onednn_gemm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <limits>
#include <optional>
#include <tuple>

namespace fastbert {
namespace {

using at::Tensor;

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

// Rows of a [S, n] chunk per parallel task: about 32K elements.
int64_t rows_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)); }

// One row of a chunk as acc_t: the row itself when the types agree, else converted into tmp.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* row, int64_t n, std::vector<acc_t>& tmp) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, tmp.data(), n);
    return tmp.data();
  }
}

// Fold a chunk of logits [S, n] into the running per-slot (max, sum of exp): the online
// logsumexp, one pass for the max and one for the sum, each on a row that sits in L1.
template <typename scalar_t, typename acc_t>
void fold_chunk(const Tensor& logits, acc_t* run_max, acc_t* run_sum) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t S = logits.size(0), n = logits.size(1);
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, S, rows_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(std::is_same_v<scalar_t, acc_t> ? 0 : n);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = row_as_acc<scalar_t, acc_t>(data + i * n, n, tmp);
      const acc_t chunk_max = at::vec::reduce_all<acc_t>(
          [](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, n);
      const acc_t new_max = std::max(chunk_max, run_max[i]);
      const acc_t chunk_sum = at::vec::map_reduce_all<acc_t>(
          [new_max](Vec x) { return (x - Vec(new_max)).exp(); },
          [](Vec a, Vec b) { return a + b; }, row, n);
      run_sum[i] = run_sum[i] * std::exp(run_max[i] - new_max) + chunk_sum;
      run_max[i] = new_max;
    }
  });
}

// logits [S, n] -> p_coef_i * softmax_i in place (the softmax part of dlogits).
template <typename scalar_t, typename acc_t>
void scaled_softmax_inplace(Tensor& logits, const acc_t* lse, const acc_t* p_coef) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t S = logits.size(0), n = logits.size(1);
  scalar_t* data = logits.data_ptr<scalar_t>();
  at::parallel_for(0, S, rows_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(n);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = row_as_acc<scalar_t, acc_t>(data + i * n, n, tmp);
      const acc_t l = lse[i], c = p_coef[i];
      at::vec::map([l, c](Vec x) { return (x - Vec(l)).exp() * Vec(c); }, tmp.data(), row, n);
      at::vec::convert(tmp.data(), data + i * n, n);
    }
  });
}

// fp32 chunk GEMMs go to oneDNN (2-3x MKL's fp32 speed on this CPU); bf16 dH / dW and fp64
// keep at::mm (bf16 at::mm is itself oneDNN, as fast as the linear op for those).
bool use_onednn(const Tensor& t) {
  return t.scalar_type() == at::kFloat && onednn::linear_pointwise_op() != nullptr;
}

// Hn [S, C'] @ w2c^T + b2c: [S, n], oneDNN's own output or else written into scratch.
Tensor chunk_logits(Tensor scratch, const Tensor& Hn, const Tensor& w2c, const Tensor& b2c) {
  // bf16 too: oneDNN's linear runs this shape at ~2x at::addmm's bf16 rate here.
  const bool bf16 = Hn.scalar_type() == at::kBFloat16;
  if (use_onednn(Hn) || (bf16 && onednn::linear_pointwise_op() != nullptr))
    return onednn::linear(Hn, w2c, b2c, "none");
  at::addmm_out(scratch, b2c, Hn, w2c.t());
  return scratch;
}

at::ScalarType acc_type(const Tensor& X) {
  return X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
}

}  // namespace

// Returns (loss, lse[B, P]): loss = sum_i w_i CE_i / sum_i w_i over the real slots (0 if
// none); lse holds each real slot's logsumexp (0 at padding slots).  Both are float32
// (float64 for float64 inputs).
std::tuple<Tensor, Tensor> mlm_loss_cpu(const Tensor& X_, const Tensor& positions_,
                                            const Tensor& weights_, const Tensor& labels_,
                                            const Tensor& w1, const Tensor& b1,
                                            const Tensor& ln_w, const Tensor& ln_b,
                                            const Tensor& w2_, const Tensor& b2, double eps,
                                            int64_t chunk) {
  check_inputs(X_, positions_, weights_, labels_, w1, w2_, chunk);
  TORCH_CHECK(X_.scalar_type() == w1.scalar_type() && X_.scalar_type() == w2_.scalar_type(),
              "mlm_loss: X, w1 and w2 must share a dtype");
  at::NoGradGuard no_grad;
  const Tensor X = X_.contiguous(), positions = positions_.contiguous();
  const Tensor weights = weights_.contiguous(), labels = labels_.contiguous();
  const Tensor w2 = w2_.contiguous();
  const auto acc = acc_type(X);
  const int64_t V = w2.size(0);

  Slots s = real_slots(X, positions, weights);
  const int64_t S = s.flat.size(0);
  Tensor lse_all = at::zeros({positions.numel()}, X.options().dtype(acc));
  if (S == 0) return {at::zeros({}, X.options().dtype(acc)), lse_all.view(positions.sizes())};

  Mlp m = run_mlp(X, s, w1, b1, ln_w, ln_b, eps);
  Tensor run_max = at::full({S}, -std::numeric_limits<double>::infinity(),
                            X.options().dtype(acc));
  Tensor run_sum = at::zeros({S}, X.options().dtype(acc));
  // One chunk of scratch, reused (left untouched when oneDNN allocates its own output).
  Tensor logits = at::empty({S * std::min(chunk, V)}, X.options());
  for (int64_t v0 = 0; v0 < V; v0 += chunk) {
    const int64_t n = std::min(chunk, V - v0);
    Tensor buf = chunk_logits(logits.narrow(0, 0, S * n).view({S, n}), m.Hn,
                              w2.narrow(0, v0, n), b2.narrow(0, v0, n));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, buf.scalar_type(), "mlm_loss", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      fold_chunk<scalar_t, acc_t>(buf, run_max.data_ptr<acc_t>(), run_sum.data_ptr<acc_t>());
    });
  }
  Tensor lse = run_max + at::log(run_sum);
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
    const Tensor& grad, const std::optional<Tensor>& grad_lse, const Tensor& X_, const Tensor& positions_, const Tensor& weights_,
    const Tensor& labels_, const Tensor& w1, const Tensor& b1, const Tensor& ln_w,
    const Tensor& ln_b, const Tensor& w2_, const Tensor& b2, double eps, int64_t chunk,
    const Tensor& lse_all) {
  check_inputs(X_, positions_, weights_, labels_, w1, w2_, chunk);
  TORCH_CHECK(X_.scalar_type() == w1.scalar_type() && X_.scalar_type() == w2_.scalar_type(),
              "mlm_loss: X, w1 and w2 must share a dtype");
  at::NoGradGuard no_grad;
  const Tensor X = X_.contiguous(), positions = positions_.contiguous();
  const Tensor weights = weights_.contiguous(), labels = labels_.contiguous();
  const Tensor w2 = w2_.contiguous();
  const auto acc = acc_type(X);
  const int64_t V = w2.size(0), Cp = w1.size(0);

  Tensor dX = at::zeros_like(X);
  Slots s = real_slots(X, positions, weights);
  const int64_t S = s.flat.size(0);
  if (S == 0) {
    return {dX, at::zeros_like(w1), at::zeros_like(b1), at::zeros_like(ln_w),
            at::zeros_like(ln_b), at::zeros_like(w2), at::zeros_like(b2)};
  }
  Mlp m = run_mlp(X, s, w1, b1, ln_w, ln_b, eps);
  Tensor y = labels.reshape(-1).index_select(0, s.flat);
  Tensor w = weights.reshape(-1).index_select(0, s.flat).to(acc);
  // d loss / d CE_i = grad * w_i / sum w;  d CE_i / d logits_i = softmax_i - onehot(y_i);
  // d lse_i / d logits_i = softmax_i.
  Tensor coef = (w * (grad.to(acc) / w.sum())).unsqueeze(1);  // [S, 1]
  Tensor p_coef = coef;
  if (grad_lse.has_value() && grad_lse->defined()) {
    p_coef = coef + grad_lse->reshape(-1).index_select(0, s.flat).to(acc).unsqueeze(1);
  }
  p_coef = p_coef.contiguous();
  Tensor lse = lse_all.reshape(-1).index_select(0, s.flat).to(acc).contiguous();

  Tensor dHn = at::zeros({S, Cp}, X.options().dtype(acc));
  Tensor dw2 = at::empty_like(w2);
  Tensor db2 = at::empty({V}, X.options().dtype(acc));
  // One chunk of scratch, reused (left untouched when oneDNN allocates its own output).
  Tensor logits = at::empty({S * std::min(chunk, V)}, X.options());
  for (int64_t v0 = 0; v0 < V; v0 += chunk) {
    const int64_t n = std::min(chunk, V - v0);
    Tensor w2c = w2.narrow(0, v0, n);
    Tensor dl = chunk_logits(logits.narrow(0, 0, S * n).view({S, n}), m.Hn, w2c,
                             b2.narrow(0, v0, n));  // the logits, recomputed
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dl.scalar_type(), "mlm_loss_backward", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      scaled_softmax_inplace<scalar_t, acc_t>(dl, lse.data_ptr<acc_t>(), p_coef.data_ptr<acc_t>());
    });
    Tensor db2c = db2.narrow(0, v0, n);
    at::sum_out(db2c, dl, {0}, false, acc);
    Tensor dw2c = dw2.narrow(0, v0, n);
    if (use_onednn(dl)) {
      dHn.add_(onednn::linear(dl, w2c.t(), std::nullopt, "none"));
      dw2c.copy_(onednn::weight_grad(dl, m.Hn));
    } else {
      if (dl.scalar_type() == acc) {
        dHn.addmm_(dl, w2c);
      } else {
        dHn.add_(at::mm(dl, w2c));  // low-precision GEMM, accumulated across chunks in fp32
      }
      at::mm_out(dw2c, dl.t(), m.Hn);
    }
  }
  // The -coef * onehot(y) part of dlogits, in the accumulation type.
  Tensor c = coef.squeeze(1);
  dHn.sub_(w2.index_select(0, y).to(acc) * coef);
  Tensor dw2_acc = dw2.to(acc);
  dw2_acc.index_add_(0, y, m.Hn.to(acc) * coef, -1);
  db2.index_add_(0, y, c, -1);

  // Back through LayerNorm, ReLU and the first Linear; scatter-add into X (positions may
  // repeat).
  auto ln_grads = at::native_layer_norm_backward(dHn.to(X.scalar_type()), m.A, {Cp}, m.mean,
                                                 m.rstd, ln_w, ln_b, {true, true, true});
  Tensor dZ = std::get<0>(ln_grads).masked_fill_(m.Z <= 0, 0);
  Tensor dw1 = at::mm(dZ.t(), m.H0);
  Tensor db1 = dZ.sum(0, false, acc).to(b1.scalar_type());
  dX.view({-1, X.size(2)}).index_add_(0, s.tokens, at::mm(dZ, w1));
  return {dX, dw1, db1, std::get<1>(ln_grads), std::get<2>(ln_grads),
          dw2_acc.to(w2.scalar_type()), db2.to(b2.scalar_type())};
}

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("mlm_loss", &mlm_loss_cpu);
  m.impl("mlm_loss_backward", &mlm_loss_backward_cpu);
}

}  // namespace fastbert
