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
//
// x and y may differ in dtype when one is fp32 and the other bf16 (autocast: an fp32
// residual plus a bf16 sublayer output).  The kernel then reads each in its own dtype and
// computes and writes in fp32 (the promoted dtype, as the reference's `dropout(y) + x`), and
// the backward writes grad_x and grad_y in their inputs' dtypes, so no separate cast pass runs
// either way.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/counter_rng.h"
#include "cpu/cpu_common.h"
#include "cpu/row_io.h"

namespace fastbert::cpu {
namespace {

using at::vec::Vectorized;

struct Dropout {
  bool on;
  uint64_t seed;
  float p;
  double scale;  // 1 / (1 - p)
};

// keep_scale[c] = 1/(1-p) if element (r, c) survives dropout, else 0 (the counter RNG is
// per element; the vector sweeps then multiply by it).
template <typename acc_t>
inline void fill_keep_scale(acc_t* keep_scale, int64_t r, int64_t C, const Dropout& d) {
  dropout_keep_scale_row(d.seed, static_cast<uint64_t>(r) * static_cast<uint64_t>(C), d.p,
                         static_cast<acc_t>(d.scale), C, keep_scale);
}

// z = x + dropout(y) for lanes [c, c + n) of a row (x and y each in its own dtype).
template <typename x_t, typename y_t, typename acc_t>
inline Vectorized<acc_t> residual(const x_t* x, const y_t* y, const acc_t* keep_scale, int64_t c,
                                  int64_t n) {
  auto yv = RowIO<y_t>::load(y + c, n);
  if (keep_scale != nullptr) yv = yv * Vectorized<acc_t>::loadu(keep_scale + c, n);
  return RowIO<x_t>::load(x + c, n) + yv;
}

// Visits a row of C lanes one vector at a time: body(c, n, u) with c the first lane, n the
// lanes in this vector (W except at the tail) and u in [0, kUnroll): the caller keeps kUnroll
// independent accumulators indexed by u, so the row's sums are not one long add-latency chain.
constexpr int kUnroll = 4;
template <int64_t W, typename Body>
inline void sweep(int64_t C, Body&& body) {
  int64_t c = 0;
  for (; c + kUnroll * W <= C; c += kUnroll * W) {
#pragma GCC unroll 4
    for (int u = 0; u < kUnroll; ++u) body(c + u * W, W, u);
  }
  for (int u = 0; c < C; c += W, ++u) body(c, std::min(W, C - c), u);
}

template <typename Vec>
inline typename Vec::value_type reduce_sum(const Vec (&acc)[kUnroll]) {
  const Vec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  return at::vec::vec_reduce_all<typename Vec::value_type>([](Vec a, Vec b) { return a + b; }, total);
}

// Three sweeps per row (sum, centred sum of squares, normalize + affine); z stays in an
// L1-sized row buffer between them.  out_t is the promoted dtype of x_t and y_t.
template <typename x_t, typename y_t, typename out_t>
void forward_rows(const x_t* X, const y_t* Yin, const at::opmath_type<out_t>* w,
                  const at::opmath_type<out_t>* b, out_t* out, at::opmath_type<out_t>* mean,
                  at::opmath_type<out_t>* rstd, int64_t rows, int64_t C, double eps,
                  const Dropout& d) {
  using acc_t = at::opmath_type<out_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, rows, row_grain(3 * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> zbuf(C), keep(d.on ? C : 0);
    acc_t* z = zbuf.data();
    acc_t* ks = d.on ? keep.data() : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const x_t* xr = X + r * C;
      const y_t* yr = Yin + r * C;
      if (d.on) fill_keep_scale(ks, r, C, d);
      Vec sum[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
      sweep<W>(C, [&](int64_t c, int64_t n, int u) {
        const Vec zv = residual(xr, yr, ks, c, n);
        zv.store(z + c, n);
        sum[u] = sum[u] + zv;  // lanes past n are zero
      });
      const acc_t mu = reduce_sum(sum) / C;
      Vec sq[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
      sweep<W>(C, [&](int64_t c, int64_t n, int u) {
        Vec dev = Vec::loadu(z + c, n) - Vec(mu);
        if (n < W) dev = Vec::set(Vec(0), dev, n);
        sq[u] = at::vec::fmadd(dev, dev, sq[u]);
      });
      const acc_t var = reduce_sum(sq) / C;
      const acc_t rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      mean[r] = mu;
      rstd[r] = rs;
      sweep<W>(C, [&](int64_t c, int64_t n, int) {
        Vec o = (Vec::loadu(z + c, n) - Vec(mu)) * Vec(rs);
        if (w != nullptr) o = o * Vec::loadu(w + c, n);
        if (b != nullptr) o = o + Vec::loadu(b + c, n);
        RowIO<out_t>::store(out + r * C + c, o, n);
      });
    }
  });
}

// Two sweeps per row: (1) xhat, g = dout * w, the dweight/dbias partials and the two row
// means; (2) dz.  dY is written with dropout or when y's dtype differs from x's; otherwise it
// equals dX and is left out (dY == nullptr).
template <typename x_t, typename y_t, typename out_t>
void backward_rows(const out_t* dOut, const x_t* X, const y_t* Yin,
                   const at::opmath_type<out_t>* w, const at::opmath_type<out_t>* mean,
                   const at::opmath_type<out_t>* rstd, x_t* dX, y_t* dY,
                   at::opmath_type<out_t>* dw_partial, at::opmath_type<out_t>* db_partial,
                   int64_t rows, int64_t C, int64_t rows_per_chunk, const Dropout& d) {
  using acc_t = at::opmath_type<out_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<acc_t> xhat_buf(C), g_buf(C), keep(d.on ? C : 0);
    acc_t* xhat = xhat_buf.data();
    acc_t* g = g_buf.data();
    acc_t* ks = d.on ? keep.data() : nullptr;
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      acc_t* dw = dw_partial + chunk * C;
      acc_t* db = db_partial + chunk * C;
      std::fill(dw, dw + C, acc_t(0));
      std::fill(db, db + C, acc_t(0));
      const int64_t rend = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < rend; ++r) {
        const x_t* xr = X + r * C;
        const y_t* yr = Yin + r * C;
        const out_t* gr = dOut + r * C;
        if (d.on) fill_keep_scale(ks, r, C, d);
        const Vec mu(mean[r]), rs(rstd[r]);
        Vec sum_g[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
        Vec sum_gx[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
        sweep<W>(C, [&](int64_t c, int64_t n, int u) {
          const Vec xh = (residual(xr, yr, ks, c, n) - mu) * rs;
          Vec gv = RowIO<out_t>::load(gr + c, n);  // zero past n, so no lane past n contributes
          (Vec::loadu(db + c, n) + gv).store(db + c, n);
          at::vec::fmadd(gv, xh, Vec::loadu(dw + c, n)).store(dw + c, n);
          if (w != nullptr) gv = gv * Vec::loadu(w + c, n);
          sum_g[u] = sum_g[u] + gv;
          sum_gx[u] = at::vec::fmadd(gv, xh, sum_gx[u]);
          xh.store(xhat + c, n);
          gv.store(g + c, n);
        });
        const Vec mean_g(reduce_sum(sum_g) / C);
        const Vec mean_gx(reduce_sum(sum_gx) / C);
        // dz = rstd * (g - mean(g) - xhat * mean(g * xhat))
        sweep<W>(C, [&](int64_t c, int64_t n, int) {
          const Vec dz = rs * (Vec::loadu(g + c, n) - mean_g - Vec::loadu(xhat + c, n) * mean_gx);
          RowIO<x_t>::store(dX + r * C + c, dz, n);
          if (dY != nullptr)  // dy = dz * keep / (1 - p), the same mask as the forward
            RowIO<y_t>::store(dY + r * C + c, ks != nullptr ? dz * Vec::loadu(ks + c, n) : dz, n);
        });
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

// x and y: same shape and device; the same dtype, or fp32 with bf16 (either way round).
// Returns the dtype the op computes and writes in (the promoted one).
at::ScalarType check_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_float_input(x, op, "x");
  check_float_input(y, op, "y");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last axis, got shape ",
              x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": x and y must have the same shape, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(y.device() == x.device(), op, ": x and y must be on one device, got ", x.device(),
              " and ", y.device());
  const auto xt = x.scalar_type(), yt = y.scalar_type();
  const bool mixed_ok = (xt == at::kFloat && yt == at::kBFloat16) || (xt == at::kBFloat16 && yt == at::kFloat);
  TORCH_CHECK(xt == yt || mixed_ok, op, ": x and y must share a dtype (or be float32 and bfloat16), got ",
              xt, " and ", yt);
  return xt == yt ? xt : at::kFloat;
}

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, const char* op) {
  const uint64_t s = read_seed(seed, p, op);
  return {p > 0.0, s, static_cast<float>(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

template <typename T>
struct Type { using type = T; };

// Calls fn(Type<x_t>, Type<y_t>, Type<out_t>) for the (x, y) dtype pair check_pair allows.
template <typename Fn>
void dispatch_pair(at::ScalarType xt, at::ScalarType yt, Fn&& fn) {
  if (xt == at::kFloat && yt == at::kBFloat16) {
    fn(Type<float>{}, Type<at::BFloat16>{}, Type<float>{});
  } else if (xt == at::kBFloat16 && yt == at::kFloat) {
    fn(Type<at::BFloat16>{}, Type<float>{}, Type<float>{});
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xt, "add_layernorm_cpu", [&] {
      fn(Type<scalar_t>{}, Type<scalar_t>{}, Type<scalar_t>{});
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm";
  const at::ScalarType out_dtype = check_pair(x, y, op);
  const Dropout d = make_dropout(dropout_p, seed, op);
  const auto w = affine_param(weight, x, op, "weight");
  const auto b = affine_param(bias, x, op, "bias");
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor out = poison_if_testing(at::empty(xc.sizes(), xc.options().dtype(out_dtype)));
  const auto stat_sizes = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = poison_if_testing(at::empty(stat_sizes, x.options().dtype(opmath_dtype(out_dtype))));
  at::Tensor rstd = poison_if_testing(at::empty_like(mean));
  if (rows == 0) return {out, mean, rstd};
  dispatch_pair(x.scalar_type(), y.scalar_type(), [&](auto xtag, auto ytag, auto otag) {
    using x_t = typename decltype(xtag)::type;
    using y_t = typename decltype(ytag)::type;
    using out_t = typename decltype(otag)::type;
    using acc_t = at::opmath_type<out_t>;
    forward_rows<x_t, y_t, out_t>(xc.data_ptr<x_t>(), yc.data_ptr<y_t>(),
                                  w ? w->data_ptr<acc_t>() : nullptr, b ? b->data_ptr<acc_t>() : nullptr,
                                  out.data_ptr<out_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                                  rows, C, eps, d);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastbert::add_layernorm_backward";
  const at::ScalarType out_dtype = check_pair(x, y, op);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == out_dtype, op,
              ": grad_out must match the forward's output (", x.sizes(), ", ", out_dtype, "), got ",
              grad_out.sizes(), ", ", grad_out.scalar_type());
  const Dropout d = make_dropout(dropout_p, seed, op);
  const auto w = affine_param(weight, x, op, "weight");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const at::ScalarType acc = opmath_dtype(out_dtype);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}})
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == acc, op, ": ", name, " must hold ", rows,
                " ", acc, " values (one per row, from the forward), got ", t->sizes(), " ", t->scalar_type());
  const at::Tensor dout = grad_out.contiguous(), xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = poison_if_testing(at::empty_like(xc));
  // Without dropout grad_y equals grad_x: when they also share a dtype an empty tensor stands
  // in for it (the glue reuses grad_x), which saves writing a tensor the size of x.
  const bool write_dy = d.on || y.scalar_type() != x.scalar_type();
  at::Tensor dy = write_dy ? poison_if_testing(at::empty_like(yc)) : at::empty({0}, yc.options());
  // Fixed-size chunks (independent of the thread count) keep dweight/dbias deterministic; at
  // least 64 rows each, so the serial sum of the partials below stays small beside the rows.
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + 63) / 64);
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  // Every chunk zeroes its own partial rows before accumulating; without rows (one chunk that
  // the kernel never visits) they are zeroed here.
  at::Tensor dw_partial = at::empty({chunks, C}, x.options().dtype(acc));
  at::Tensor db_partial = at::empty({chunks, C}, x.options().dtype(acc));
  if (rows == 0) {
    dw_partial.zero_();
    db_partial.zero_();
  }
  if (rows > 0) {
    dispatch_pair(x.scalar_type(), y.scalar_type(), [&](auto xtag, auto ytag, auto otag) {
      using x_t = typename decltype(xtag)::type;
      using y_t = typename decltype(ytag)::type;
      using out_t = typename decltype(otag)::type;
      using acc_t = at::opmath_type<out_t>;
      backward_rows<x_t, y_t, out_t>(dout.data_ptr<out_t>(), xc.data_ptr<x_t>(), yc.data_ptr<y_t>(),
                                     w ? w->data_ptr<acc_t>() : nullptr, mc.data_ptr<acc_t>(),
                                     rc.data_ptr<acc_t>(), dx.data_ptr<x_t>(),
                                     write_dy ? dy.data_ptr<y_t>() : nullptr,
                                     dw_partial.data_ptr<acc_t>(), db_partial.data_ptr<acc_t>(), rows, C,
                                     rows_per_chunk, d);
    });
  }
  // Sum the chunk partials in chunk order (vectorized over C): the same bits for any thread count.
  AT_DISPATCH_FLOATING_TYPES(dw_partial.scalar_type(), "add_layernorm_reduce_partials", [&] {
    using Vec = Vectorized<scalar_t>;
    for (at::Tensor* partial : {&dw_partial, &db_partial}) {
      scalar_t* p = partial->data_ptr<scalar_t>();
      for (int64_t chunk = 1; chunk < partial->size(0); ++chunk) {
        const scalar_t* q = p + chunk * C;
        for (int64_t c = 0; c < C; c += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), C - c);
          (Vec::loadu(p + c, n) + Vec::loadu(q + c, n)).store(p + c, n);
        }
      }
    }
  });
  const at::ScalarType param_dtype =
      (weight.has_value() && weight->defined()) ? weight->scalar_type() : out_dtype;
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
