// varlen_attention on the CPU: attention within each packed sequence, like FlashAttention's
// varlen interface.  k, v [Tk, H, D]: sequence b's keys are rows cu_seqlens[b]:cu_seqlens[b+1];
// q [Tq, H, D]: its queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (cu_seqlens_q None:
// the same rows as the keys, self-attention).  One (sequence, head) problem per task
// (attention_core.h): nq query rows against nk key rows, O((nq + nk) * D + nq * nk * D) work,
// never a padded (B*H, L, L) tensor.  A sequence with queries but no keys outputs zeros (and
// gets zero gradients).  Reference: fastbert/backends/reference.py varlen_attention.
//
// Dropout counter of the score element (query row tq, head h, key row u) — global row
// indices, tq in [0, Tq), u in [0, Tk) — is (tq * H + h) * Tk + u: independent of max_len
// and of how the work is split, and (t * H + h) * T + u for self-attention.  Tq and Tk are
// the last offsets (the valid row counts).
//
// Row padding: q, k, v may hold rows past their last offset (the unpadded encoder rounds its
// row count up so GEMM shapes recur from batch to batch; fastbert/bert.py).  Those rows belong
// to no sequence: their output and gradients are zero and they change nothing else.
#include <torch/library.h>

#include "cpu/attention_core.h"
#include "cpu/cpu_common.h"

namespace fastbert {
namespace {

using attn::Dropout;
using attn::Problem;
using attn::Scratch;

void check_offsets(const at::Tensor& cu, const char* name, int64_t rows, const char* what) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
              "varlen_attention: ", name, " must be a 1-D int32 tensor of B+1 offsets");
  TORCH_CHECK(cu.device().is_cpu(), "varlen_attention: ", name, " must be on the CPU");
  const auto c_ = cu.contiguous();
  const int32_t* c = c_.data_ptr<int32_t>();
  const int64_t B = c_.numel() - 1;
  TORCH_CHECK(c[0] == 0, "varlen_attention: ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(c[b + 1] >= c[b], "varlen_attention: ", name, " must be non-decreasing");
  TORCH_CHECK(c[B] <= rows, "varlen_attention: ", name, "[-1] (", c[B],
              ") must not exceed the number of packed ", what, " (", rows, ")");
}

// q [Tq, H, D]; k, v [Tk, H, D].  Without cu_seqlens_q, q shares k's rows (Tq == Tk).
void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& cu_seqlens_q) {
  TORCH_CHECK(q.dim() == 3, "varlen_attention: q must be [T, H, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 3,
              "varlen_attention: k and v must share a [Tk, H, D] shape, got ", k.sizes(), ", ",
              v.sizes());
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(q.size(1) == k.size(1) && q.size(2) == k.size(2),
                "varlen_attention: q [Tq, H, D] and k, v [Tk, H, D] must share H and D, got ",
                q.sizes(), ", ", k.sizes());
  } else {
    TORCH_CHECK(q.sizes() == k.sizes(),
                "varlen_attention: q, k, v must share a shape (or pass cu_seqlens_q), got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "varlen_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "varlen_attention (cpp, CPU): dtype must be float32 or bfloat16, got ",
              q.scalar_type());
  check_offsets(cu_seqlens, "cu_seqlens", k.size(0), "key tokens Tk");
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(cu_seqlens_q->numel() == cu_seqlens.numel(),
                "varlen_attention: cu_seqlens_q must have B+1 = ", cu_seqlens.numel(),
                " offsets like cu_seqlens, got ", cu_seqlens_q->numel());
    check_offsets(*cu_seqlens_q, "cu_seqlens_q", q.size(0), "query tokens Tq");
  }
}

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  Dropout dr;
  dr.seed = cpu::read_seed(seed, p, "varlen_attention");
  dr.p = static_cast<float>(p);
  return dr;
}

// q, k, v as the kernel reads them: each packed row's [H, D] block contiguous, rows at any
// stride.  The encoder's q, k, v are column slices of one fused QKV GEMM output [T, 3C]:
// reading them in place saves three copies in the forward and three in the backward.
at::Tensor rows_of_heads(const at::Tensor& t) {
  const bool heads_contiguous = t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) == t.size(2));
  return heads_contiguous && t.stride(0) >= t.size(1) * t.size(2) ? t : t.contiguous();
}

// The inputs both passes read: q, k, v in place (rows_of_heads), the key offsets and the
// query offsets (the key offsets for self-attention), and the (sequence, head) problems.
struct Operands {
  at::Tensor q, k, v, cu, cuq;
  int64_t H, D, Tk, B;

  Operands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
           const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& cu_seqlens_q)
      : q(rows_of_heads(q_)), k(rows_of_heads(k_)), v(rows_of_heads(v_)),
        cu(cu_seqlens.contiguous()),
        cuq(cu_seqlens_q.has_value() ? cu_seqlens_q->contiguous() : cu),
        H(q.size(1)), D(q.size(2)), B(cu.numel() - 1) {
    Tk = valid_keys();  // the dropout counters' key count: row padding leaves them unchanged
  }

  const int32_t* query_offsets() const { return cuq.data_ptr<int32_t>(); }
  const int32_t* key_offsets() const { return cu.data_ptr<int32_t>(); }
  int64_t valid_queries() const { return query_offsets()[B]; }
  int64_t valid_keys() const { return key_offsets()[B]; }

  // Sequence b, head h: its queries, keys and values at their row strides.
  template <typename T>
  Problem<T> problem(int64_t b, int64_t h) const {
    const int32_t* cq = query_offsets();
    const int32_t* ck = key_offsets();
    const int64_t qs = cq[b], ks = ck[b];
    Problem<T> pr;
    pr.q = q.data_ptr<T>() + qs * q.stride(0) + h * D;
    pr.k = k.data_ptr<T>() + ks * k.stride(0) + h * D;
    pr.v = v.data_ptr<T>() + ks * v.stride(0) + h * D;
    pr.q_rs = q.stride(0);
    pr.k_rs = k.stride(0);
    pr.v_rs = v.stride(0);
    pr.nq = cq[b + 1] - qs;
    pr.nk = ck[b + 1] - ks;
    pr.lim_rows = nullptr;
    pr.lim = pr.nk;
    pr.drop_base = (static_cast<uint64_t>(qs) * H + h) * Tk + ks;
    pr.drop_rs = static_cast<uint64_t>(H) * Tk;
    return pr;
  }
};

// (sequence, head) tasks, grain 1: at::parallel_for splits the range into one contiguous
// chunk per thread and only uses fewer threads when the range is under grain * threads, so
// every thread works even for a handful of tasks (B * H >= 2), and with B * H in the hundreds
// the chunks' total key lengths even out.
constexpr int64_t kTaskGrain = 1;

std::tuple<at::Tensor, at::Tensor> varlen_attention(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& cu_seqlens, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& cu_seqlens_q) {
  check_varlen(q_, k_, v_, cu_seqlens, cu_seqlens_q);
  const Operands in(q_, k_, v_, cu_seqlens, cu_seqlens_q);
  const int64_t H = in.H, D = in.D;
  auto out = cpu::poison_if_testing(at::empty(in.q.sizes(), in.q.options()));
  auto lse = cpu::poison_if_testing(at::empty({in.q.size(0), H}, in.q.options().dtype(at::kFloat)));
  const Dropout dr = make_dropout(dropout_p, seed);
  const int32_t* cq = in.query_offsets();
  FASTBERT_DISPATCH_FLOAT_BF16(in.q.scalar_type(), "varlen_attention", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, in.B * H, kTaskGrain, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / H, h = id % H;
        const auto pr = in.problem<scalar_t>(b, h);
        attn::forward_problem(pr, D, D, static_cast<float>(scale), dr,
                              op + cq[b] * H * D + h * D, H * D, lp + cq[b] * H + h, H,
                              scratch);
      }
    });
  });
  const int64_t Tq = in.valid_queries();
  if (Tq < out.size(0)) {  // row padding: no sequence's rows
    out.narrow(0, Tq, out.size(0) - Tq).zero_();
    lse.narrow(0, Tq, lse.size(0) - Tq).zero_();
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_,
    const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
    const at::Tensor& cu_seqlens, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& cu_seqlens_q) {
  check_varlen(q_, k_, v_, cu_seqlens, cu_seqlens_q);
  TORCH_CHECK(grad_out_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "varlen_attention_backward: grad_out and out must have q's shape");
  TORCH_CHECK(lse_.dim() == 2 && lse_.size(0) == q_.size(0) && lse_.size(1) == q_.size(1) &&
                  lse_.scalar_type() == at::kFloat,
              "varlen_attention_backward: lse must be float32 [Tq, H], got ", lse_.sizes());
  const Operands in(q_, k_, v_, cu_seqlens, cu_seqlens_q);
  const int64_t H = in.H, D = in.D;
  const auto go = grad_out_.to(in.q.scalar_type()).contiguous();
  const auto o = out_.contiguous(), lse = lse_.contiguous();
  // Contiguous (row stride H * D), whatever the inputs' strides.
  auto dq = cpu::poison_if_testing(at::empty(in.q.sizes(), in.q.options()));
  auto dk = cpu::poison_if_testing(at::empty(in.k.sizes(), in.k.options()));
  auto dv = cpu::poison_if_testing(at::empty(in.v.sizes(), in.v.options()));
  const Dropout dr = make_dropout(dropout_p, seed);
  const int32_t* c = in.key_offsets();
  const int32_t* cq = in.query_offsets();
  FASTBERT_DISPATCH_FLOAT_BF16(in.q.scalar_type(), "varlen_attention_backward", [&] {
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, in.B * H, kTaskGrain, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / H, h = id % H;
        auto pr = in.problem<scalar_t>(b, h);
        pr.dq_rs = pr.dk_rs = pr.dv_rs = H * D;  // the gradients are contiguous
        const int64_t qoff = cq[b] * H * D + h * D, koff = c[b] * H * D + h * D;
        if (pr.nq == 0) {  // keys no query sees: zero gradients, without reading k and v
          for (int64_t j = 0; j < pr.nk; ++j) {
            std::fill(dkp + koff + j * H * D, dkp + koff + j * H * D + D, scalar_t(0.f));
            std::fill(dvp + koff + j * H * D, dvp + koff + j * H * D + D, scalar_t(0.f));
          }
          continue;
        }
        attn::backward_problem(pr, D, D, static_cast<float>(scale), dr, gop + qoff,
                               opp + qoff, H * D, lp + cq[b] * H + h, H, dqp + qoff,
                               dkp + koff, dvp + koff, scratch);
      }
    });
  });
  // Row padding gets zero gradients.
  for (auto [t, valid] : {std::pair<at::Tensor*, int64_t>{&dq, in.valid_queries()},
                          {&dk, in.valid_keys()}, {&dv, in.valid_keys()}})
    if (valid < t->size(0)) t->narrow(0, valid, t->size(0) - valid).zero_();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("varlen_attention", &varlen_attention);
  m.impl("varlen_attention_backward", &varlen_attention_backward);
}

}  // namespace fastbert
