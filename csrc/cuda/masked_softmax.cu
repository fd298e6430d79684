// masked_softmax on CUDA: one warp per row (n, query), fp32 accumulation.  The CPU twin,
// csrc/cpu/masked_softmax.cpp, documents the semantics (d2l's; the reference is
// fastbert/backends/reference.py): keys at or past the valid length get exactly 0, a valid
// length of 0 gives a uniform row, masked keys are never read; backward
// dX = y * (dy - sum(dy * y)) on visible keys, 0 elsewhere.
#include "cuda/cuda_common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block

__device__ __forceinline__ int64_t visible_keys(const int32_t* lens, int mode, int64_t row, int64_t Lq,
                                                int64_t Lk) {
  if (mode == 0) return Lk;
  const int64_t len = mode == 1 ? lens[row / Lq] : lens[row];
  return len < 0 ? 0 : (len > Lk ? Lk : len);  // the binding's front door checked the range
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ X, T* __restrict__ Y, const int32_t* __restrict__ lens,
                               int mode, int64_t rows, int64_t Lq, int64_t Lk) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T* x = X + row * Lk;
  T* y = Y + row * Lk;
  const int64_t len = visible_keys(lens, mode, row, Lq, Lk);
  if (len == 0) {  // d2l: every score is -1e6, so the row is uniform
    const T uniform = from_float<T>(1.0f / static_cast<float>(Lk));
    for (int64_t j = lane; j < Lk; j += 32) y[j] = uniform;
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = lane; j < len; j += 32) mx = fmaxf(mx, to_float(x[j]));
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t j = lane; j < len; j += 32) sum += expf(to_float(x[j]) - mx);
  const float inv = 1.0f / warp_sum(sum);
  for (int64_t j = lane; j < Lk; j += 32)
    y[j] = from_float<T>(j < len ? expf(to_float(x[j]) - mx) * inv : 0.0f);
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ dY, const T* __restrict__ Y, T* __restrict__ dX,
                                const int32_t* __restrict__ lens, int mode, int64_t rows, int64_t Lq, int64_t Lk) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T* dy = dY + row * Lk;
  const T* y = Y + row * Lk;
  T* dx = dX + row * Lk;
  const int64_t len = visible_keys(lens, mode, row, Lq, Lk);
  float dot = 0.0f;
  for (int64_t j = lane; j < len; j += 32) dot += to_float(dy[j]) * to_float(y[j]);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < Lk; j += 32)
    dx[j] = from_float<T>(j < len ? to_float(y[j]) * (to_float(dy[j]) - dot) : 0.0f);
}

}  // namespace

cudaError_t masked_softmax_forward(DType dtype, const void* X, void* Y, const int32_t* lens, int lens_mode,
                                   int64_t N, int64_t Lq, int64_t Lk, cudaStream_t stream) {
  const int64_t rows = N * Lq;
  if (rows == 0 || Lk == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<ceil_div(rows, kRowsPerBlock), dim3(32, kRowsPerBlock), 0, stream>>>(
        static_cast<const T*>(X), static_cast<T*>(Y), lens, lens_mode, rows, Lq, Lk);
    return cudaGetLastError();
  });
}

cudaError_t masked_softmax_backward(DType dtype, const void* dY, const void* Y, void* dX, const int32_t* lens,
                                    int lens_mode, int64_t N, int64_t Lq, int64_t Lk, cudaStream_t stream) {
  const int64_t rows = N * Lq;
  if (rows == 0 || Lk == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_kernel<T><<<ceil_div(rows, kRowsPerBlock), dim3(32, kRowsPerBlock), 0, stream>>>(
        static_cast<const T*>(dY), static_cast<const T*>(Y), static_cast<T*>(dX), lens, lens_mode, rows, Lq, Lk);
    return cudaGetLastError();
  });
}

}  // namespace fastbert::cuda
