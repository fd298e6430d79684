// add_layernorm on the CPU: layer_norm(dropout(y) + x) over the last axis, fused, one row
// at a time (parallel over rows), fp32 accumulation for bf16 (fp64 for fp64).
//
// Reference (fastbert/backends/reference.py, d2l's AddNorm(X, Y)):
//   F.layer_norm(F.dropout(y, p) + x, (C,), weight, bias, eps)
// Dropout keeps element i (its flat index in x) iff uniform01(seed, i) >= p
// (csrc/common/counter_rng.h) and scales kept values by 1 / (1 - p).  The forward stores
// only the per-row mean and rstd; the backward recomputes z = x + dropout(y) and regenerates
// the mask from the seed, so nothing the size of the activations is kept besides x and y.
// dweight/dbias are reduced over fixed-size row chunks in a fixed order: deterministic for
// any thread count.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/counter_rng.h"
#include "cpu/cpu_common.h"

namespace fastbert::cpu {
namespace {

using at::vec::Vectorized;

struct Dropout {
  bool on;
  uint64_t seed;
  float p;
  double scale;  // 1 / (1 - p)
};

// z[c] = x[c] + dropout(y)[c] for row `r` of width C (accumulation type).  With dropout,
// keep_scale (if not null) receives each element's factor, 1/(1-p) or 0, for the backward.
template <typename scalar_t, typename acc_t>
inline void sum_row(const scalar_t* x, const scalar_t* y, int64_t r, int64_t C, const Dropout& d,
                    acc_t* z, acc_t* tmp, acc_t* keep_scale = nullptr) {
  using Vec = Vectorized<acc_t>;
  at::vec::convert(x, z, C);
  at::vec::convert(y, tmp, C);
  if (d.on) {
    const uint64_t base = static_cast<uint64_t>(r) * static_cast<uint64_t>(C);
    const acc_t scale = static_cast<acc_t>(d.scale);
    for (int64_t c = 0; c < C; ++c) {
      const bool keep = dropout_keep(d.seed, base + c, d.p);
      tmp[c] = keep ? tmp[c] * scale : acc_t(0);
      if (keep_scale != nullptr) keep_scale[c] = keep ? scale : acc_t(0);
    }
  }
  at::vec::map2([](Vec a, Vec b) { return b + a; }, z, z, tmp, C);
}

template <typename scalar_t>
void forward_rows(const scalar_t* X, const scalar_t* Yin, const at::opmath_type<scalar_t>* w,
                  const at::opmath_type<scalar_t>* b, scalar_t* out, at::opmath_type<scalar_t>* mean,
                  at::opmath_type<scalar_t>* rstd, int64_t rows, int64_t C, double eps,
                  const Dropout& d) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, rows, row_grain(3 * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(C), tmp(C);
    for (int64_t r = begin; r < end; ++r) {
      sum_row(X + r * C, Yin + r * C, r, C, d, z.data(), tmp.data());
      const acc_t mu = at::vec::reduce_all<acc_t>([](Vec a, Vec c) { return a + c; }, z.data(), C) / C;
      const acc_t var = at::vec::map_reduce_all<acc_t>(
                            [mu](Vec v) { return (v - Vec(mu)) * (v - Vec(mu)); },
                            [](Vec a, Vec c) { return a + c; }, z.data(), C) / C;
      const acc_t rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      mean[r] = mu;
      rstd[r] = rs;
      at::vec::map([mu, rs](Vec v) { return (v - Vec(mu)) * Vec(rs); }, z.data(), z.data(), C);
      if (w != nullptr) at::vec::map2([](Vec v, Vec g) { return v * g; }, z.data(), z.data(), w, C);
      if (b != nullptr) at::vec::map2([](Vec v, Vec s) { return v + s; }, z.data(), z.data(), b, C);
      at::vec::convert(z.data(), out + r * C, C);
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* dOut, const scalar_t* X, const scalar_t* Yin,
                   const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* mean,
                   const at::opmath_type<scalar_t>* rstd, scalar_t* dX, scalar_t* dY,
                   at::opmath_type<scalar_t>* dw_partial, at::opmath_type<scalar_t>* db_partial,
                   int64_t rows, int64_t C, int64_t rows_per_chunk, const Dropout& d) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto add = [](Vec a, Vec c) { return a + c; };
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<acc_t> xhat(C), tmp(C), g(C), dz(C), keep_scale(d.on ? C : 0);
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      acc_t* dw = dw_partial + chunk * C;
      acc_t* db = db_partial + chunk * C;
      std::fill(dw, dw + C, acc_t(0));
      std::fill(db, db + C, acc_t(0));
      const int64_t rend = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < rend; ++r) {
        sum_row(X + r * C, Yin + r * C, r, C, d, xhat.data(), tmp.data(), keep_scale.data());
        const acc_t mu = mean[r], rs = rstd[r];
        at::vec::map([mu, rs](Vec v) { return (v - Vec(mu)) * Vec(rs); }, xhat.data(), xhat.data(), C);
        at::vec::convert(dOut + r * C, g.data(), C);  // g = dout (then dout * weight)
        at::vec::map2([](Vec a, Vec go) { return a + go; }, db, db, g.data(), C);
        at::vec::map3([](Vec a, Vec go, Vec xh) { return a + go * xh; }, dw, dw, g.data(), xhat.data(), C);
        if (w != nullptr) at::vec::map2([](Vec go, Vec wt) { return go * wt; }, g.data(), g.data(), w, C);
        const acc_t mean_g = at::vec::reduce_all<acc_t>(add, g.data(), C) / C;
        const acc_t mean_gx = at::vec::map2_reduce_all<acc_t>(
                                  [](Vec a, Vec c) { return a * c; }, add, g.data(), xhat.data(), C) / C;
        // dz = rstd * (g - mean(g) - xhat * mean(g * xhat))
        at::vec::map2([mean_g, mean_gx, rs](Vec gv, Vec xh) {
          return Vec(rs) * (gv - Vec(mean_g) - xh * Vec(mean_gx));
        }, dz.data(), g.data(), xhat.data(), C);
        at::vec::convert(dz.data(), dX + r * C, C);
        if (d.on)  // dy = dz * keep / (1 - p), the same mask as the forward
          at::vec::map2([](Vec a, Vec k) { return a * k; }, dz.data(), dz.data(), keep_scale.data(), C);
        at::vec::convert(dz.data(), dY + r * C, C);
      }
    }
  });
}

at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// weight/bias as contiguous accumulation-type vectors (C elements: a negligible copy).
std::optional<at::Tensor> affine_param(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                       const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  check_float_input(*t, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), op, ": ", name, " must have shape (",
              x.size(-1), ",), got ", t->sizes());
  return t->to(opmath_dtype(x.scalar_type())).contiguous();
}

void check_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_float_input(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last axis, got shape ",
              x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": x and y must have the same shape, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.device() == x.device(), op,
              ": x and y must share dtype and device, got ", x.scalar_type(), " and ", y.scalar_type());
}

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, const char* op) {
  const uint64_t s = read_seed(seed, p, op);
  return {p > 0.0, s, static_cast<float>(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm";
  check_pair(x, y, op);
  const Dropout d = make_dropout(dropout_p, seed, op);
  const auto w = affine_param(weight, x, op, "weight");
  const auto b = affine_param(bias, x, op, "bias");
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor out = poison_if_testing(at::empty_like(xc));
  const auto stat_sizes = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = poison_if_testing(at::empty(stat_sizes, x.options().dtype(opmath_dtype(x.scalar_type()))));
  at::Tensor rstd = poison_if_testing(at::empty_like(mean));
  if (rows == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layernorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                           w ? w->data_ptr<acc_t>() : nullptr, b ? b->data_ptr<acc_t>() : nullptr,
                           out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                           rows, C, eps, d);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm_backward";
  check_pair(x, y, op);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x (", x.sizes(), ", ", x.scalar_type(), "), got ",
              grad_out.sizes(), ", ", grad_out.scalar_type());
  const Dropout d = make_dropout(dropout_p, seed, op);
  const auto w = affine_param(weight, x, op, "weight");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const at::ScalarType acc = opmath_dtype(x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}})
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == acc, op, ": ", name, " must hold ", rows,
                " ", acc, " values (one per row, from the forward), got ", t->sizes(), " ", t->scalar_type());
  const at::Tensor dout = grad_out.contiguous(), xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = poison_if_testing(at::empty_like(xc));
  at::Tensor dy = poison_if_testing(at::empty_like(xc));
  // Fixed-size chunks (independent of the thread count) keep dweight/dbias deterministic.
  const int64_t rows_per_chunk = std::max<int64_t>(16, (rows + 255) / 256);
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  at::Tensor dw_partial = at::zeros({chunks, C}, x.options().dtype(acc));
  at::Tensor db_partial = at::zeros({chunks, C}, x.options().dtype(acc));
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layernorm_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_rows<scalar_t>(dout.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                              w ? w->data_ptr<acc_t>() : nullptr, mc.data_ptr<acc_t>(),
                              rc.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                              dw_partial.data_ptr<acc_t>(), db_partial.data_ptr<acc_t>(), rows, C,
                              rows_per_chunk, d);
    });
  }
  // Sum the chunk partials in chunk order: the same bits for any thread count.
  AT_DISPATCH_FLOATING_TYPES(dw_partial.scalar_type(), "add_layernorm_reduce_partials", [&] {
    for (at::Tensor* partial : {&dw_partial, &db_partial}) {
      scalar_t* p = partial->data_ptr<scalar_t>();
      for (int64_t chunk = 1; chunk < chunks; ++chunk)
        for (int64_t c = 0; c < C; ++c) p[c] += p[chunk * C + c];
    }
  });
  const at::ScalarType param_dtype =
      (weight.has_value() && weight->defined()) ? weight->scalar_type() : x.scalar_type();
  // copy=true: never hand out a view into the partials buffer.
  at::Tensor dweight = dw_partial[0].to(param_dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor dbias = db_partial[0].to(param_dtype, /*non_blocking=*/false, /*copy=*/true);
  return {dx, dy, dweight, dbias};
}

at::Tensor dropout_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double p) {
  constexpr const char* op = "fastbert::dropout_mask";
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must lie in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a 0-d int64 CPU tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor mask = poison_if_testing(at::empty(shape, seed.options().dtype(at::kBool)));
  bool* m = mask.data_ptr<bool>();
  const float pf = static_cast<float>(p);
  at::parallel_for(0, mask.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) m[i] = dropout_keep(s, static_cast<uint64_t>(i), pf);
  });
  return mask;
}

}  // namespace
}  // namespace fastbert::cpu

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("add_layernorm", &fastbert::cpu::add_layernorm_cpu);
  m.impl("add_layernorm_backward", &fastbert::cpu::add_layernorm_backward_cpu);
  m.impl("dropout_mask", &fastbert::cpu::dropout_mask_cpu);
}
