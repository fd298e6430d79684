// Padded attention on the CPU: softmax(q k^T * scale, masked) v for q [N, Lq, D],
// k [N, Lk, D], v [N, Lk, Dv], valid_lens None / [N] / [N, Lq] (int32), with dropout on
// the probabilities.  Fused per batch entry (attention_core.h): scores, masked softmax and
// P V on small per-thread tiles; the backward recomputes P from q and k.
// Reference: fastbert/backends/reference.py attention (d2l DotProductAttention): keys at or
// past the valid length get probability 0; a valid length of 0 gives a uniform row.
//
// Dropout counter of probability element (n, i, j): its flat index (n * Lq + i) * Lk + j.
#include <torch/library.h>

#include "cpu/attention_core.h"
#include "cpu/cpu_common.h"

namespace fastbert {
namespace {

using attn::Dropout;
using attn::Problem;
using attn::Scratch;

void check_padded(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& valid_lens) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "attention: q, k, v must be 3-D [N, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "attention (cpp, CPU): dtype must be float32 or bfloat16, got ", q.scalar_type());
  const int64_t N = q.size(0), Lq = q.size(1), D = q.size(2), Lk = k.size(1);
  TORCH_CHECK(k.size(0) == N && v.size(0) == N && k.size(2) == D && v.size(1) == Lk,
              "attention: shapes do not agree: q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  if (valid_lens.has_value()) {
    const auto& vl = *valid_lens;
    TORCH_CHECK(vl.scalar_type() == at::kInt, "attention: valid_lens must be int32");
    TORCH_CHECK((vl.dim() == 1 && vl.size(0) == N) ||
                    (vl.dim() == 2 && vl.size(0) == N && vl.size(1) == Lq),
                "attention: valid_lens must be [N] or [N, Lq], got ", vl.sizes());
    const auto c = vl.contiguous();
    const int32_t* p = c.data_ptr<int32_t>();
    for (int64_t i = 0; i < c.numel(); ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] <= Lk, "attention: valid_lens must lie in [0, ", Lk,
                  "], got ", p[i]);
  }
}

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  Dropout dr;
  dr.seed = cpu::read_seed(seed, p, "attention");
  dr.p = static_cast<float>(p);
  return dr;
}

template <typename T>
Problem<T> make_problem(const T* q, const T* k, const T* v, const int32_t* vl, int vl_dim,
                        int64_t n, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv) {
  Problem<T> pr;
  pr.q = q + n * Lq * D;
  pr.k = k + n * Lk * D;
  pr.v = v + n * Lk * Dv;
  pr.q_rs = D;
  pr.k_rs = D;
  pr.v_rs = Dv;
  pr.nq = Lq;
  pr.nk = Lk;
  pr.lim_rows = vl_dim == 2 ? vl + n * Lq : nullptr;
  pr.lim = vl_dim == 1 ? vl[n] : Lk;
  pr.drop_base = static_cast<uint64_t>(n) * Lq * Lk;
  pr.drop_rs = Lk;
  return pr;
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q_, const at::Tensor& k_,
                                                 const at::Tensor& v_,
                                                 const std::optional<at::Tensor>& valid_lens,
                                                 double dropout_p, double scale,
                                                 const std::optional<at::Tensor>& seed) {
  check_padded(q_, k_, v_, valid_lens);
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t N = q.size(0), Lq = q.size(1), D = q.size(2), Lk = k.size(1), Dv = v.size(2);
  at::Tensor vl;
  if (valid_lens.has_value()) vl = valid_lens->contiguous();
  const int vl_dim = vl.defined() ? static_cast<int>(vl.dim()) : 0;
  const int32_t* vlp = vl.defined() ? vl.data_ptr<int32_t>() : nullptr;
  auto out = cpu::poison_if_testing(at::empty({N, Lq, Dv}, q.options()));
  auto lse = cpu::poison_if_testing(at::empty({N, Lq}, q.options().dtype(at::kFloat)));
  const Dropout dr = make_dropout(dropout_p, seed);
  FASTBERT_DISPATCH_FLOAT_BF16(q.scalar_type(), "attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t n = begin; n < end; ++n) {
        const auto pr = make_problem(qp, kp, vp, vlp, vl_dim, n, Lq, Lk, D, Dv);
        attn::forward_problem(pr, D, Dv, static_cast<float>(scale), dr, op + n * Lq * Dv, Dv,
                              lp + n * Lq, 1, scratch);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_,
    const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
    const std::optional<at::Tensor>& valid_lens, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed) {
  check_padded(q_, k_, v_, valid_lens);
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t N = q.size(0), Lq = q.size(1), D = q.size(2), Lk = k.size(1), Dv = v.size(2);
  TORCH_CHECK(grad_out_.sizes() == out_.sizes() && out_.size(0) == N && out_.size(1) == Lq &&
                  out_.size(2) == Dv,
              "attention_backward: grad_out and out must be [N, Lq, Dv]");
  const auto go = grad_out_.to(q.scalar_type()).contiguous();
  const auto o = out_.contiguous(), lse = lse_.contiguous();
  at::Tensor vl;
  if (valid_lens.has_value()) vl = valid_lens->contiguous();
  const int vl_dim = vl.defined() ? static_cast<int>(vl.dim()) : 0;
  const int32_t* vlp = vl.defined() ? vl.data_ptr<int32_t>() : nullptr;
  auto dq = cpu::poison_if_testing(at::empty_like(q));
  auto dk = cpu::poison_if_testing(at::empty_like(k));
  auto dv = cpu::poison_if_testing(at::empty_like(v));
  const Dropout dr = make_dropout(dropout_p, seed);
  FASTBERT_DISPATCH_FLOAT_BF16(q.scalar_type(), "attention_backward", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t n = begin; n < end; ++n) {
        const auto pr = make_problem(qp, kp, vp, vlp, vl_dim, n, Lq, Lk, D, Dv);
        attn::backward_problem(pr, D, Dv, static_cast<float>(scale), dr, gop + n * Lq * Dv,
                               opp + n * Lq * Dv, Dv, lp + n * Lq, 1, dqp + n * Lq * D,
                               dkp + n * Lk * D, dvp + n * Lk * Dv, scratch);
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace fastbert
