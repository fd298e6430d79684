// gather_positions on CUDA: out[b, p, :] = X[b, positions[b, p], :], and the backward
// scatter-add into [B, L, C].  The CPU twin, csrc/cpu/gather_positions.cpp, documents the
// semantics (reference: fastbert/backends/reference.py).  The backward is deterministic
// without atomics: each output row (b, l) is written by exactly one slot - the first p with
// positions[b, p] == l - which sums, in fp32 and in p order, the grads of every slot that
// gathered l.  Rows nobody gathered are zeroed first.  Out-of-range positions (the front door
// fastbert.ops rejects them) are skipped rather than read or written out of bounds.
#include "cuda/cuda_common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void gather_kernel(const T* __restrict__ X, const int64_t* __restrict__ pos, T* __restrict__ out,
                              int64_t L, int64_t C, int64_t P) {
  const int64_t slot = blockIdx.x;  // b * P + p
  const int64_t b = slot / P, l = pos[slot];
  T* dst = out + slot * C;
  const bool ok = l >= 0 && l < L;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dst[c] = ok ? X[(b * L + l) * C + c] : T{};
}

template <typename T>
__global__ void scatter_add_kernel(const T* __restrict__ dout, const int64_t* __restrict__ pos,
                                   T* __restrict__ dX, int64_t L, int64_t C, int64_t P) {
  const int64_t slot = blockIdx.x;
  const int64_t b = slot / P, p = slot % P;
  const int64_t* pb = pos + b * P;
  const int64_t l = pb[p];
  if (l < 0 || l >= L) return;
  for (int64_t q = 0; q < p; ++q)
    if (pb[q] == l) return;  // an earlier slot owns row l
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t q = p; q < P; ++q)
      if (pb[q] == l) acc += to_float(dout[(b * P + q) * C + c]);
    dX[(b * L + l) * C + c] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t gather_positions_forward(DType dtype, const void* X, const int64_t* positions, void* out,
                                     int64_t B, int64_t L, int64_t C, int64_t P, cudaStream_t stream) {
  if (B * P == 0 || C == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    gather_kernel<T><<<static_cast<unsigned int>(B * P), kThreads, 0, stream>>>(
        static_cast<const T*>(X), positions, static_cast<T*>(out), L, C, P);
    return cudaGetLastError();
  });
}

cudaError_t gather_positions_backward(DType dtype, const void* dout, const int64_t* positions, void* dX,
                                      int64_t B, int64_t L, int64_t C, int64_t P, cudaStream_t stream) {
  if (B * L * C == 0) return cudaSuccess;
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
  cudaError_t err = cudaMemsetAsync(dX, 0, elem * static_cast<size_t>(B * L * C), stream);
  if (err != cudaSuccess || P == 0) return err;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_add_kernel<T><<<static_cast<unsigned int>(B * P), kThreads, 0, stream>>>(
        static_cast<const T*>(dout), positions, static_cast<T*>(dX), L, C, P);
    return cudaGetLastError();
  });
}

}  // namespace fastbert::cuda
