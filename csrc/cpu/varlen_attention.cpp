// varlen_attention on the CPU: attention within each packed sequence of q, k, v [T, H, D]
// (sequence b holds rows cu_seqlens[b]:cu_seqlens[b+1]), like FlashAttention's varlen
// interface.  One (sequence, head) problem per task (attention_core.h); never a padded
// (B*H, L, L) tensor.  Reference: fastbert/backends/reference.py varlen_attention.
//
// Dropout counter of the score element (query token t, head h, key token u) — t and u
// global row indices in [0, T) — is (t * H + h) * T + u: independent of max_len and of
// how the work is split.
#include <torch/library.h>

#include "cpu/attention_core.h"
#include "cpu/cpu_common.h"

namespace fastbert {
namespace {

using attn::Dropout;
using attn::Problem;
using attn::Scratch;

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_seqlens) {
  TORCH_CHECK(q.dim() == 3, "varlen_attention: q must be [T, H, D], got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "varlen_attention: q, k, v must share a shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "varlen_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "varlen_attention (cpp, CPU): dtype must be float32 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 1,
              "varlen_attention: cu_seqlens must be a 1-D int32 tensor of B+1 offsets");
  TORCH_CHECK(cu_seqlens.device().is_cpu(), "varlen_attention: cu_seqlens must be on the CPU");
  const auto cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0, "varlen_attention: cu_seqlens[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(c[b + 1] >= c[b], "varlen_attention: cu_seqlens must be non-decreasing");
  TORCH_CHECK(c[B] == q.size(0), "varlen_attention: cu_seqlens[-1] (", c[B],
              ") must equal the number of packed tokens T (", q.size(0), ")");
}

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  Dropout dr;
  dr.seed = cpu::read_seed(seed, p, "varlen_attention");
  dr.p = static_cast<float>(p);
  return dr;
}

template <typename T>
Problem<T> make_problem(const T* q, const T* k, const T* v, const int32_t* cu, int64_t b,
                        int64_t h, int64_t H, int64_t D, int64_t Ttot) {
  const int64_t start = cu[b], len = cu[b + 1] - cu[b], rs = H * D;
  Problem<T> pr;
  pr.q = q + start * rs + h * D;
  pr.k = k + start * rs + h * D;
  pr.v = v + start * rs + h * D;
  pr.q_rs = pr.k_rs = pr.v_rs = rs;
  pr.nq = pr.nk = len;
  pr.lim_rows = nullptr;
  pr.lim = len;
  pr.drop_base = (static_cast<uint64_t>(start) * H + h) * Ttot + start;
  pr.drop_rs = static_cast<uint64_t>(H) * Ttot;
  return pr;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& cu_seqlens, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed) {
  check_varlen(q_, k_, v_, cu_seqlens);
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto cu = cu_seqlens.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), B = cu.numel() - 1;
  auto out = cpu::poison_if_testing(at::empty_like(q));
  auto lse = cpu::poison_if_testing(at::empty({T, H}, q.options().dtype(at::kFloat)));
  const Dropout dr = make_dropout(dropout_p, seed);
  const int32_t* c = cu.data_ptr<int32_t>();
  FASTBERT_DISPATCH_FLOAT_BF16(q.scalar_type(), "varlen_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / H, h = id % H;
        const auto pr = make_problem(qp, kp, vp, c, b, h, H, D, T);
        attn::forward_problem(pr, D, D, static_cast<float>(scale), dr,
                              op + c[b] * H * D + h * D, H * D, lp + c[b] * H + h, H, scratch);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_,
    const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
    const at::Tensor& cu_seqlens, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed) {
  check_varlen(q_, k_, v_, cu_seqlens);
  TORCH_CHECK(grad_out_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "varlen_attention_backward: grad_out and out must have q's shape");
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto go = grad_out_.to(q.scalar_type()).contiguous();
  const auto o = out_.contiguous(), lse = lse_.contiguous();
  const auto cu = cu_seqlens.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), B = cu.numel() - 1;
  auto dq = cpu::poison_if_testing(at::empty_like(q));
  auto dk = cpu::poison_if_testing(at::empty_like(k));
  auto dv = cpu::poison_if_testing(at::empty_like(v));
  const Dropout dr = make_dropout(dropout_p, seed);
  const int32_t* c = cu.data_ptr<int32_t>();
  FASTBERT_DISPATCH_FLOAT_BF16(q.scalar_type(), "varlen_attention_backward", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / H, h = id % H;
        const auto pr = make_problem(qp, kp, vp, c, b, h, H, D, T);
        const int64_t off = c[b] * H * D + h * D;
        attn::backward_problem(pr, D, D, static_cast<float>(scale), dr, gop + off, opp + off,
                               H * D, lp + c[b] * H + h, H, dqp + off, dkp + off, dvp + off,
                               scratch);
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("varlen_attention", &varlen_attention);
  m.impl("varlen_attention_backward", &varlen_attention_backward);
}

}  // namespace fastbert
