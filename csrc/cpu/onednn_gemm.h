// oneDNN GEMMs for the CPU kernels, through torch's mkldnn::_linear_pointwise op (found in
// the c10 Dispatcher, so no oneDNN headers are needed).  On this class of AMD CPU, oneDNN
// runs fp32 GEMMs at 2-3x the speed of at::mm / at::addmm (MKL).  When torch has no
// mkldnn, the helpers fall back to at::addmm / at::mm with the same results.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <optional>

namespace at::native {  // aten/src/ATen/native/mkldnn/Matmul.h (not installed with torch)
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha) __attribute__((weak));
}  // namespace at::native

namespace fastbert {
namespace onednn {

using LinearPointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, c10::string_view,
                                     c10::List<std::optional<c10::Scalar>>,
                                     std::optional<c10::string_view>);

// The oneDNN linear op, or nullptr when this torch has no mkldnn.
inline const c10::TypedOperatorHandle<LinearPointwiseFn>* linear_pointwise_op() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value()) return std::nullopt;
    return op->typed<LinearPointwiseFn>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}

// Whether oneDNN runs bf16 GEMMs on this CPU (torch's own check: AVX-512 BW/VL/DQ,
// AVX-NE-CONVERT or Graviton3).  On an AVX2 CPU its bf16 primitives do not exist: the
// pointwise op fails to create one, and at::mm takes ATen's own bf16 path instead.
inline bool bf16_supported() {
  static const bool ok = [] {
    if (!at::hasMKLDNN()) return false;
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return ok;
}

// bf16 GEMMs on a CPU where oneDNN has no bf16 kernels (AVX2, no AVX-512): ATen's own bf16
// GEMM is all that is left there, ~10x slower than fp32 (AVX2 EPYC, 2 threads, [1728, 256] x
// [256, 768]: 52 ms vs 5 ms; widening both operands and running fp32: 4.5 ms).  So the GEMM
// helpers below widen bf16 operands to fp32 there and round the result to bf16 once: the
// same fp32 accumulation a bf16 GEMM does, rounded once instead of per tile.
inline bool bf16_via_fp32(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 && !bf16_supported();
}

inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return t->to(at::kFloat);
}

// act(x @ w^T + b), act in {"none", "relu"}; x 2-D (may be a transposed view), w [out, in]
// (may be a view).  float32, and bfloat16 where oneDNN supports it, go to oneDNN (bf16
// elsewhere: in fp32, bf16_via_fp32); other dtypes (float64) to at::addmm.
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& b, const char* act) {
  if (bf16_via_fp32(x))
    return onednn::linear(x.to(at::kFloat), w.to(at::kFloat), to_float(b), act)
        .to(at::kBFloat16);
  const auto dt = x.scalar_type();
  if (dt == at::kFloat || (dt == at::kBFloat16 && bf16_supported())) {
    if (const auto* op = linear_pointwise_op()) {
      if (x.size(0) > 0 && x.size(1) > 0 && w.size(0) > 0)
        return op->call(x, w, b, act, c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    }
  }
  auto y = b.has_value() && b->defined() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  return std::strcmp(act, "relu") == 0 ? y.relu_() : y;
}

// out (+)= a @ b through oneDNN's matmul primitive, which reads transposed (strided) views
// as they are: no copies and no weight reorder, unlike mkldnn::_linear_pointwise on a view.
// ATen's at::native::mkldnn_matmul is exported by libtorch_cpu but is not public API, so it
// is declared weak: a torch without it leaves the pointer null and the callers fall back.
// FASTBERT_NO_ONEDNN_MATMUL=1 takes the fallback as if it were missing (tests run both).
// It is probed once on a tiny problem: torch 2.13's refuses fp32 too on a CPU without
// oneDNN's bf16 support (AVX2 machines: "mkldnn_matmul bf16 path needs the cpu support ..."),
// so there the callers take the fallback.
inline bool has_matmul() {
  static const bool ok = [] {
    const char* off = std::getenv("FASTBERT_NO_ONEDNN_MATMUL");
    if (!at::hasMKLDNN() || &at::native::mkldnn_matmul == nullptr ||
        (off != nullptr && off[0] != '\0' && off[0] != '0'))
      return false;
    try {
      auto a = at::ones({2, 2}), out = at::empty({2, 2});
      at::native::mkldnn_matmul(a, a.t(), out, /*beta=*/0.f, /*alpha=*/1.f);
      return out.eq(2).all().item<bool>();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// a @ b.  fp32 with oneDNN: its matmul (measured 1.3x the pointwise op with a transposed
// weight, 2x MKL's at::mm here); otherwise at::mm (itself oneDNN in bf16).
inline at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
  if (bf16_via_fp32(a))
    return onednn::matmul(a.to(at::kFloat), b.to(at::kFloat)).to(at::kBFloat16);
  if (a.scalar_type() != at::kFloat || !has_matmul() || a.size(0) == 0 || b.size(1) == 0 ||
      a.size(1) == 0)
    return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::native::mkldnn_matmul(a, b, out, /*beta=*/0.f, /*alpha=*/1.f);
  return out;
}

// dW = g^T a for g [M, out], a [M, in]: a reduction over the M rows.  fp32: oneDNN on
// transposed views in chunks of kRowChunk rows, each accumulated into dW by the primitive
// (beta = 1).  One call over all M rows (~1700 in a bert.small step) errs 2-4x as much as
// MKL's at::mm (one long accumulation chain per element); 256-row chunks bring it to ~1x.
// bf16 / fp64, or fp32 without the matmul primitive: at::mm (in bf16 itself oneDNN).
inline at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& a) {
  constexpr int64_t kRowChunk = 256;
  const int64_t M = g.size(0);
  if (bf16_via_fp32(g) && M > 0)
    return onednn::weight_grad(g.to(at::kFloat), a.to(at::kFloat)).to(at::kBFloat16);
  if (g.scalar_type() != at::kFloat || M == 0) return at::mm(g.t(), a);
  // Without oneDNN's matmul (torch 2.13 on an AVX2 CPU): MKL's at::mm, the reference's own
  // GEMM.  The pointwise op on transposed 256-row chunks (copies and reorders every chunk,
  // then an add_) measured 1.5-25x slower on this AVX2 EPYC, 2 threads (M = 1728 .. 30000
  // rows, K x N from 128 x 384 to 512 x 256; 30000 x 128 x 384: 1189 ms vs 48 ms), which
  // made the book's pretraining step (T ~ 30k packed rows) spend ~40% of its time here.
  if (!has_matmul()) return at::mm(g.t(), a);
  at::Tensor dw = at::empty({g.size(1), a.size(1)}, a.options());
  for (int64_t r = 0; r < M; r += kRowChunk) {
    const int64_t n = std::min(kRowChunk, M - r);
    at::native::mkldnn_matmul(g.narrow(0, r, n).t(), a.narrow(0, r, n), dw,
                              /*beta=*/r == 0 ? 0.f : 1.f, /*alpha=*/1.f);
  }
  return dw;
}

}  // namespace onednn
}  // namespace fastbert
