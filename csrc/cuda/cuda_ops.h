// Host launchers of the CUDA kernels (csrc/cuda/*.cu).  No torch headers on either side:
// raw device pointers, sizes and a cudaStream_t; the thin bindings (csrc/cuda/*_binding.cpp)
// check tensors, allocate outputs and call these.  Every launcher returns the launch's
// cudaError_t (cudaSuccess when nothing needed launching).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastbert::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// masked_softmax.cu.  lens_mode: 0 no valid_lens, 1 one per sequence ([N]), 2 one per query
// ([N, Lq]).  Rows are N * Lq of length Lk, contiguous.
cudaError_t masked_softmax_forward(DType dtype, const void* X, void* Y, const int32_t* lens, int lens_mode,
                                   int64_t N, int64_t Lq, int64_t Lk, cudaStream_t stream);
cudaError_t masked_softmax_backward(DType dtype, const void* dY, const void* Y, void* dX, const int32_t* lens,
                                    int lens_mode, int64_t N, int64_t Lq, int64_t Lk, cudaStream_t stream);

// add_layernorm.cu.  x, y, out, dx, dy: [rows, C] of `dtype`; weight/bias (nullable), mean,
// rstd and the partial buffers: fp32.  Dropout (p > 0) keeps element i iff
// fastbert::dropout_keep(seed, i, p) (csrc/common/counter_rng.h), like the CPU kernel.
cudaError_t add_layernorm_forward(DType dtype, const void* x, const void* y, const float* weight,
                                  const float* bias, void* out, float* mean, float* rstd, int64_t rows,
                                  int64_t C, float eps, float dropout_p, uint64_t seed, cudaStream_t stream);
// Rows per block of the backward (the dweight/dbias partials have one row per chunk).
int64_t add_layernorm_backward_chunks(int64_t rows);
cudaError_t add_layernorm_backward(DType dtype, const void* dout, const void* x, const void* y,
                                   const float* weight, const float* mean, const float* rstd, void* dx,
                                   void* dy, float* dweight, float* dbias, float* partials, int64_t rows,
                                   int64_t C, float dropout_p, uint64_t seed, cudaStream_t stream);

// gather_positions.cu.  X: [B, L, C], positions: [B, P] int64, out: [B, P, C].
cudaError_t gather_positions_forward(DType dtype, const void* X, const int64_t* positions, void* out,
                                     int64_t B, int64_t L, int64_t C, int64_t P, cudaStream_t stream);
// dX: [B, L, C]; each row written once with the fp32 sum of the grads that gathered it.
cudaError_t gather_positions_backward(DType dtype, const void* dout, const int64_t* positions, void* dX,
                                      int64_t B, int64_t L, int64_t C, int64_t P, cudaStream_t stream);

// pack.cu.  Row copies of row_bytes bytes between padded [B, L, row] and packed [T, row].
cudaError_t pack_rows(const void* padded, const int32_t* cu_seqlens, void* packed, int64_t B, int64_t L,
                      int64_t T, int64_t row_bytes, cudaStream_t stream);
cudaError_t unpack_rows(const void* packed, const int32_t* cu_seqlens, void* padded, int64_t B, int64_t L,
                        int64_t T, int64_t row_bytes, cudaStream_t stream);

}  // namespace fastbert::cuda
