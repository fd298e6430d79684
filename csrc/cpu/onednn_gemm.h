// oneDNN GEMMs for the CPU kernels, through torch's mkldnn::_linear_pointwise op (found in
// the c10 Dispatcher, so no oneDNN headers are needed).  On this class of AMD CPU, oneDNN
// runs fp32 GEMMs at 2-3x the speed of at::mm / at::addmm (MKL).  When torch has no
// mkldnn, the helpers fall back to at::addmm / at::mm with the same results.
// (Copied from csrc/cpu/ffn.cpp's helpers; ffn.cpp should include this header instead.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <optional>

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

// act(x @ w^T + b), act in {"none", "relu"}; x 2-D (may be a transposed view), w [out, in]
// (may be a view).  float32 / bfloat16 go to oneDNN; other dtypes (float64) to at::addmm.
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& b, const char* act) {
  const auto dt = x.scalar_type();
  if (dt == at::kFloat || dt == at::kBFloat16) {
    if (const auto* op = linear_pointwise_op()) {
      if (x.size(0) > 0 && x.size(1) > 0 && w.size(0) > 0)
        return op->call(x, w, b, act, c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    }
  }
  auto y = b.has_value() && b->defined() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  return std::strcmp(act, "relu") == 0 ? y.relu_() : y;
}

// dW = g^T a for g [M, out], a [M, in].  fp32: oneDNN on transposed views (1.6x MKL here);
// bf16 / fp64: at::mm (in bf16 itself oneDNN, slightly faster than the op on views).
inline at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& a) {
  if (g.scalar_type() != at::kFloat) return at::mm(g.t(), a);
  return linear(g.t(), a.t(), std::nullopt, "none");
}

}  // namespace onednn
}  // namespace fastbert
