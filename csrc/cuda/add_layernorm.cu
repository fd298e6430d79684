// add_layernorm on CUDA: layer_norm(dropout(y) + x), one block per row, fp32 accumulation.
// The CPU twin, csrc/cpu/add_layernorm.cpp, documents the semantics (reference:
// fastbert/backends/reference.py).  Dropout keeps element i (flat index) iff
// fastbert::dropout_keep(seed, i, p) - the same counter RNG as the CPU kernel, so both draw
// the same mask; the backward regenerates it.  Only per-row mean/rstd are stored.
// dweight/dbias: each backward block owns a chunk of rows and writes its partial sums to its
// own row of `partials` (no atomics); a second kernel sums the chunks in order: deterministic.
#include "common/counter_rng.h"
#include "cuda/cuda_common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kThreads = 256;

struct Dropout {
  float p, scale;
  uint64_t seed;
};

// z = x + dropout(y) at flat index i.
template <typename T>
__device__ __forceinline__ float residual(const T* x, const T* y, int64_t i, const Dropout& d) {
  float yv = to_float(y[i]);
  if (d.p > 0.0f) yv = fastbert::dropout_keep(d.seed, static_cast<uint64_t>(i), d.p) ? yv * d.scale : 0.0f;
  return to_float(x[i]) + yv;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ y, const float* __restrict__ w,
                               const float* __restrict__ b, T* __restrict__ out, float* __restrict__ mean,
                               float* __restrict__ rstd, int64_t C, float eps, Dropout d) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * C;
  float s = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += residual(x, y, base + c, d);
  const float mu = block_sum(s, scratch) / static_cast<float>(C);
  float v = 0.0f;  // two passes (z is recomputed, not stored): no cancellation in the variance
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float t = residual(x, y, base + c, d) - mu;
    v += t * t;
  }
  const float rs = rsqrtf(block_sum(v, scratch) / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float o = (residual(x, y, base + c, d) - mu) * rs;
    if (w != nullptr) o *= w[c];
    if (b != nullptr) o += b[c];
    out[base + c] = from_float<T>(o);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ y,
                                const float* __restrict__ w, const float* __restrict__ mean,
                                const float* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dy,
                                float* __restrict__ partials, int64_t rows, int64_t C, int64_t rows_per_chunk,
                                int64_t chunks, Dropout d) {
  __shared__ float scratch[32];
  const int64_t chunk = blockIdx.x;
  float* dw_part = partials + chunk * C;            // [chunks, C] then
  float* db_part = partials + (chunks + chunk) * C;  // [chunks, C]
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dw_part[c] = db_part[c] = 0.0f;
  const int64_t rend = min(rows, (chunk + 1) * rows_per_chunk);
  for (int64_t r = chunk * rows_per_chunk; r < rend; ++r) {
    const int64_t base = r * C;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float xhat = (residual(x, y, base + c, d) - mu) * rs;
      const float go = to_float(dout[base + c]);
      const float g = w != nullptr ? go * w[c] : go;
      sg += g;
      sgx += g * xhat;
      dw_part[c] += go * xhat;  // column c belongs to this thread in every row: no race
      db_part[c] += go;
    }
    const float mean_g = block_sum(sg, scratch) / static_cast<float>(C);
    const float mean_gx = block_sum(sgx, scratch) / static_cast<float>(C);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float xhat = (residual(x, y, base + c, d) - mu) * rs;
      const float go = to_float(dout[base + c]);
      const float g = w != nullptr ? go * w[c] : go;
      const float dz = rs * (g - mean_g - xhat * mean_gx);
      dx[base + c] = from_float<T>(dz);
      if (dy == nullptr) continue;  // no dropout: grad_y equals grad_x and is not written
      const bool keep = d.p == 0.0f || fastbert::dropout_keep(d.seed, static_cast<uint64_t>(base + c), d.p);
      dy[base + c] = from_float<T>(keep ? dz * d.scale : 0.0f);
    }
  }
}

// dweight[c] = sum over chunks of the partials, in chunk order.
__global__ void reduce_partials_kernel(const float* __restrict__ partials, float* __restrict__ dweight,
                                       float* __restrict__ dbias, int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) {
    sw += partials[k * C + c];
    sb += partials[(chunks + k) * C + c];
  }
  dweight[c] = sw;
  dbias[c] = sb;
}

int threads_for(int64_t C) {
  int t = 32;
  while (t < kThreads && t < C) t *= 2;
  return t;
}

Dropout make_dropout(float p, uint64_t seed) { return {p, p > 0.0f ? 1.0f / (1.0f - p) : 1.0f, seed}; }

constexpr int64_t kMinRowsPerChunk = 16;
constexpr int64_t kMaxChunks = 1024;

int64_t rows_per_chunk(int64_t rows) {
  const int64_t by_cap = (rows + kMaxChunks - 1) / kMaxChunks;
  return by_cap > kMinRowsPerChunk ? by_cap : kMinRowsPerChunk;
}

}  // namespace

cudaError_t add_layernorm_forward(DType dtype, const void* x, const void* y, const float* weight,
                                  const float* bias, void* out, float* mean, float* rstd, int64_t rows,
                                  int64_t C, float eps, float dropout_p, uint64_t seed, cudaStream_t stream) {
  if (rows == 0 || C == 0) return cudaSuccess;
  const Dropout d = make_dropout(dropout_p, seed);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<static_cast<unsigned int>(rows), threads_for(C), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(y), weight, bias, static_cast<T*>(out), mean, rstd, C,
        eps, d);
    return cudaGetLastError();
  });
}

int64_t add_layernorm_backward_chunks(int64_t rows) {
  const int64_t rpc = rows_per_chunk(rows);
  return rows == 0 ? 1 : (rows + rpc - 1) / rpc;
}

cudaError_t add_layernorm_backward(DType dtype, const void* dout, const void* x, const void* y,
                                   const float* weight, const float* mean, const float* rstd, void* dx,
                                   void* dy, float* dweight, float* dbias, float* partials, int64_t rows,
                                   int64_t C, float dropout_p, uint64_t seed, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const int64_t chunks = add_layernorm_backward_chunks(rows);
  const Dropout d = make_dropout(dropout_p, seed);
  if (rows > 0) {
    const cudaError_t err = dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      backward_kernel<T><<<static_cast<unsigned int>(chunks), threads_for(C), 0, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(x), static_cast<const T*>(y), weight, mean, rstd,
          static_cast<T*>(dx), static_cast<T*>(dy), partials, rows, C, rows_per_chunk(rows), chunks, d);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  } else {
    cudaMemsetAsync(partials, 0, sizeof(float) * 2 * chunks * C, stream);
  }
  reduce_partials_kernel<<<ceil_div(C, 256), 256, 0, stream>>>(partials, dweight, dbias, chunks, C);
  return cudaGetLastError();
}

}  // namespace fastbert::cuda
