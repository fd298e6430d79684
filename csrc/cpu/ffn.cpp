// The position-wise FFN on the CPU: y = dense2(act(dense1(x))), act relu (d2l) or gelu
// (erf), nn.Linear weight layouts w1 [F, C], w2 [C2, F].
// Reference: fastbert/backends/reference.py ffn.
//
// GEMMs run on oneDNN (csrc/cpu/onednn_gemm.h): the forward through torch's
// mkldnn::_linear_pointwise op, bias and relu fused in its epilogue (on this class of CPU
// 2-3x at::addmm, MKL, in fp32); the backward through oneDNN's matmul on the weights and
// transposed activations as they are (no copies).  Without oneDNN, at::addmm / at::mm.
//
// The forward saves one activation-sized tensor: relu -> the post-activation h (its sign
// is the relu mask); gelu -> the pre-activation (h and gelu' are recomputed elementwise).
#include <torch/library.h>

#include "cpu/attention_core.h"  // at::vec setup and FASTBERT_DISPATCH_FLOAT_BF16
#include "cpu/onednn_gemm.h"

namespace fastbert {
namespace {

using Vec = at::vec::Vectorized<float>;

using onednn::linear;
using onednn::weight_grad;

bool is_relu(c10::string_view activation) {
  TORCH_CHECK(activation == "relu" || activation == "gelu",
              "ffn: activation must be 'relu' or 'gelu', got '", activation, "'");
  return activation == "relu";
}

void check_ffn(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
               const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  TORCH_CHECK(x.dim() >= 1 && w1.dim() == 2 && w2.dim() == 2,
              "ffn: x must be [..., C], w1 [F, C], w2 [C2, F]");
  TORCH_CHECK(x.size(-1) == w1.size(1) && w2.size(1) == w1.size(0), "ffn: shapes do not agree: x ",
              x.sizes(), ", w1 ", w1.sizes(), ", w2 ", w2.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              "ffn (cpp, CPU): dtype must be float32 or bfloat16, got ", dt);
  TORCH_CHECK(w1.scalar_type() == dt && w2.scalar_type() == dt,
              "ffn: x, w1, w2 must share a dtype");
  for (const auto* b : {&b1, &b2})
    TORCH_CHECK(!b->has_value() || !(*b)->defined() || (*b)->scalar_type() == dt,
                "ffn: biases must have x's dtype");
  TORCH_CHECK(!b1.has_value() || !b1->defined() || (b1->dim() == 1 && b1->size(0) == w1.size(0)),
              "ffn: b1 must be [F]");
  TORCH_CHECK(!b2.has_value() || !b2->defined() || (b2->dim() == 1 && b2->size(0) == w2.size(0)),
              "ffn: b2 must be [C2]");
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t c2) {
  auto s = x.sizes().vec();
  s.back() = c2;
  return s;
}

// Returns (y, saved): saved = h (relu) or the pre-activation (gelu), both [M, F].
std::tuple<at::Tensor, at::Tensor> ffn(const at::Tensor& x, const at::Tensor& w1,
                                           const std::optional<at::Tensor>& b1,
                                           const at::Tensor& w2,
                                           const std::optional<at::Tensor>& b2,
                                           c10::string_view activation) {
  check_ffn(x, w1, b1, w2, b2);
  const bool relu = is_relu(activation);
  const auto x2 = x.reshape({-1, x.size(-1)});
  at::Tensor saved, h;
  if (relu) {
    saved = h = linear(x2, w1, b1, "relu");
  } else {
    saved = linear(x2, w1, b1, "none");
    h = at::gelu(saved);
  }
  auto y = linear(h, w2, b2, "none");
  return {y.view(out_shape(x, w2.size(0))), saved};
}

// gelu (erf) backward fused with its recompute, elementwise over [M, F]:
// dh <- dh * gelu'(pre) in place, h <- gelu(pre).
template <typename T>
void gelu_backward(const T* saved, T* dh, T* h, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    constexpr float kAlpha = 0.70710678118654752f;   // 1/sqrt(2)
    constexpr float kBeta = 0.39894228040143268f;    // 1/sqrt(2 pi)
    constexpr int64_t kChunk = 256;
    float pre[kChunk], g[kChunk];
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t m = std::min(kChunk, end - i0);
      attn::load_row(saved + i0, m, m, 1.f, pre);
      attn::load_row(dh + i0, m, m, 1.f, g);
      int64_t i = 0;
      constexpr int W = Vec::size();
      for (; i + W <= m; i += W) {
        const Vec x = Vec::loadu(pre + i);
        const Vec cdf = (Vec(1.f) + (x * Vec(kAlpha)).erf()) * Vec(0.5f);
        const Vec pdf = (x * x * Vec(-0.5f)).exp() * Vec(kBeta);
        (Vec::loadu(g + i) * (cdf + x * pdf)).store(g + i);
        (x * cdf).store(pre + i);
      }
      for (; i < m; ++i) {
        const float x = pre[i];
        const float cdf = 0.5f * (1.f + std::erf(x * kAlpha));
        const float pdf = std::exp(-0.5f * x * x) * kBeta;
        g[i] *= cdf + x * pdf;
        pre[i] = x * cdf;
      }
      attn::store_row(g, m, 1.f, dh + i0);
      attn::store_row(pre, m, 1.f, h + i0);
    }
  });
}

// Gradients of (x, w1, b1, w2, b2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const at::Tensor& saved_,
    c10::string_view activation) {
  check_ffn(x, w1, b1, w2, b2);
  const bool relu = is_relu(activation);
  const int64_t C = x.size(-1), F = w1.size(0), C2 = w2.size(0);
  const auto x2 = x.reshape({-1, C});
  const int64_t M = x2.size(0);
  const auto dy = grad_y.to(x.scalar_type()).reshape({-1, C2}).contiguous();
  const auto saved = saved_.contiguous();
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == M && saved.size(1) == F,
              "ffn_backward: saved activation must be [M, F]");
  // dh = dy @ w2 ; dpre = dh * act'(pre)
  auto dh = onednn::matmul(dy, w2).contiguous();
  at::Tensor h = saved;
  if (relu) {
    // torch's vectorized relu backward, in place: dh is this function's own fresh tensor
    at::threshold_backward_out(dh, dh, saved, 0);
  } else if (saved.scalar_type() == at::kBFloat16) {  // torch's bf16 gelu kernels: faster
    dh = at::gelu_backward(dh, saved);
    h = at::gelu(saved);
  } else {  // fp32: one fused pass beats torch's two here
    h = at::empty_like(saved);
    FASTBERT_DISPATCH_FLOAT_BF16(x.scalar_type(), "ffn_backward", [&] {
      gelu_backward<scalar_t>(saved.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(),
                              h.data_ptr<scalar_t>(), M * F);
    });
  }
  auto dw2 = weight_grad(dy, h);
  auto dx = onednn::matmul(dh, w1);
  auto dw1 = weight_grad(dh, x2);
  // Bias gradients (always returned; the glue drops them for a None bias): column sums
  // with fp32 accumulation.
  auto db1 = dh.sum(0, false, at::kFloat).to(x.scalar_type());
  auto db2 = dy.sum(0, false, at::kFloat).to(x.scalar_type());
  return {dx.view(x.sizes()), dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("ffn", &ffn);
  m.impl("ffn_backward", &ffn_backward);
}

}  // namespace fastbert
