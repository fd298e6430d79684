// pack / unpack on CUDA: row copies between padded [B, L, row] and packed [T, row]
// (row = the trailing dims, row_bytes bytes).  The CPU twin, csrc/cpu/pack.cpp, documents
// the semantics (reference: fastbert/backends/reference.py).  One block per padded position
// (b, l); copies use the widest unit (16/8/4/2/1 bytes) that the row size and the base
// pointers allow.  Offsets come from cu_seqlens; lengths are clamped to [0, L] and packed rows
// to [0, T) so bad offsets can never read or write out of bounds.
#include "cuda/cuda_common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kThreads = 128;

// Packed row of padded position (b, l), or -1 if (b, l) is a pad.
__device__ __forceinline__ int64_t packed_row(const int32_t* cu, int64_t b, int64_t l, int64_t L, int64_t T) {
  int64_t len = static_cast<int64_t>(cu[b + 1]) - cu[b];
  len = len < 0 ? 0 : (len > L ? L : len);
  const int64_t t = static_cast<int64_t>(cu[b]) + l;
  return (l < len && t >= 0 && t < T) ? t : -1;
}

template <typename U>
__global__ void pack_kernel(const U* __restrict__ padded, const int32_t* __restrict__ cu, U* __restrict__ packed,
                            int64_t L, int64_t T, int64_t row_units) {
  const int64_t pos = blockIdx.x, b = pos / L, l = pos % L;
  const int64_t t = packed_row(cu, b, l, L, T);
  if (t < 0) return;
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) packed[t * row_units + i] = padded[pos * row_units + i];
}

template <typename U>
__global__ void unpack_kernel(const U* __restrict__ packed, const int32_t* __restrict__ cu, U* __restrict__ padded,
                              int64_t L, int64_t T, int64_t row_units) {
  const int64_t pos = blockIdx.x, b = pos / L, l = pos % L;
  const int64_t t = packed_row(cu, b, l, L, T);
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x)
    padded[pos * row_units + i] = t >= 0 ? packed[t * row_units + i] : U{};
}

template <template <typename> class Launch>
cudaError_t with_copy_unit(const void* a, const void* b, int64_t row_bytes, Launch<uint8_t> l1,
                           Launch<uint16_t> l2, Launch<uint32_t> l4, Launch<uint64_t> l8, Launch<uint4> l16) {
  const uintptr_t align = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                          static_cast<uintptr_t>(row_bytes);
  if (align % 16 == 0) return l16();
  if (align % 8 == 0) return l8();
  if (align % 4 == 0) return l4();
  if (align % 2 == 0) return l2();
  return l1();
}

template <typename U>
struct PackLaunch {
  const void* src;
  const int32_t* cu;
  void* dst;
  int64_t B, L, T, row_bytes;
  bool to_packed;
  cudaStream_t stream;
  cudaError_t operator()() const {
    const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
    const unsigned int blocks = static_cast<unsigned int>(B * L);
    if (to_packed)
      pack_kernel<U><<<blocks, kThreads, 0, stream>>>(static_cast<const U*>(src), cu, static_cast<U*>(dst), L, T, units);
    else
      unpack_kernel<U><<<blocks, kThreads, 0, stream>>>(static_cast<const U*>(src), cu, static_cast<U*>(dst), L, T, units);
    return cudaGetLastError();
  }
};

cudaError_t launch_copy(const void* src, const int32_t* cu, void* dst, int64_t B, int64_t L, int64_t T,
                        int64_t row_bytes, bool to_packed, cudaStream_t stream) {
  if (B * L == 0 || row_bytes == 0) return cudaSuccess;
  return with_copy_unit<PackLaunch>(
      src, dst, row_bytes, PackLaunch<uint8_t>{src, cu, dst, B, L, T, row_bytes, to_packed, stream},
      PackLaunch<uint16_t>{src, cu, dst, B, L, T, row_bytes, to_packed, stream},
      PackLaunch<uint32_t>{src, cu, dst, B, L, T, row_bytes, to_packed, stream},
      PackLaunch<uint64_t>{src, cu, dst, B, L, T, row_bytes, to_packed, stream},
      PackLaunch<uint4>{src, cu, dst, B, L, T, row_bytes, to_packed, stream});
}

}  // namespace

cudaError_t pack_rows(const void* padded, const int32_t* cu_seqlens, void* packed, int64_t B, int64_t L,
                      int64_t T, int64_t row_bytes, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  return launch_copy(padded, cu_seqlens, packed, B, L, T, row_bytes, /*to_packed=*/true, stream);
}

cudaError_t unpack_rows(const void* packed, const int32_t* cu_seqlens, void* padded, int64_t B, int64_t L,
                        int64_t T, int64_t row_bytes, cudaStream_t stream) {
  return launch_copy(packed, cu_seqlens, padded, B, L, T, row_bytes, /*to_packed=*/false, stream);
}

}  // namespace fastbert::cuda
