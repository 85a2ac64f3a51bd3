// simvq-kernels: the SimVQ projection Q = B W^T + b on CUDA tensor cores (mma.sync),
// for bf16/fp16 inputs (exact products, fp32 accumulation; fp32 inputs use simt.cu).
//
// The codebook is projected by this kernel rather than by cuBLAS because every element
// is then formed by the same instructions in the same order whatever its position:
// identical basis rows give bitwise-identical codes, so the search sends them to the
// lowest index (cuBLAS may split the reduction differently per output tile, e.g. its
// stream-K kernels). Block (m, n) forms a 128 x 128 tile of Q from 64-byte chunks of
// the basis and weight rows (cp.async, double-buffered), adds the bias in fp32 and
// rounds once to the inputs' dtype; columns d..ldq-1 are written as 0 (the search's
// zero padding).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mma.cuh"

namespace simvq {
namespace cuda {
namespace kernels {

using namespace dev;

template <Mma M>
struct Out;
template <>
struct Out<Mma::kBF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(const T* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ T conv(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Out<Mma::kFP16> {
  using T = __half;
  static __device__ __forceinline__ float load(const T* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ T conv(float x) { return __float2half_rn(x); }
};

template <class Mode>
__global__ void __launch_bounds__(kThreads, (Mode::kMode == Mma::kBF16 || Mode::kMode == Mma::kFP16) ? 2 : 1)
    project_kernel(const uint8_t* __restrict__ basis, const uint8_t* __restrict__ weight,
                   int64_t K, int64_t d, int64_t row_bytes, const void* __restrict__ bias_,
                   void* __restrict__ q_, int64_t ldq) {
  constexpr Mma M = Mode::kMode;
  using O = Out<M>;
  using T = typename O::T;
  const T* bias = static_cast<const T*>(bias_);
  T* q = static_cast<T*>(q_);

  __shared__ __align__(16) uint32_t As[2][kStageWords];
  __shared__ __align__(16) uint32_t Bs[2][kStageWords];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
  const int64_t k0 = int64_t(blockIdx.x) * kTileM, j0 = int64_t(blockIdx.y) * kTileN;
  const int64_t nchunks = row_bytes / kChunkBytes;

  float acc[kMF][kNF][4];
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mf][nf][e] = 0.f;

  load_chunk_async(As[0], Bs[0], basis, k0, K, weight, j0, d, row_bytes, 0, tid);
  for (int64_t c = 0; c < nchunks; ++c) {
    if (c + 1 < nchunks) {
      load_chunk_async(As[(c + 1) & 1], Bs[(c + 1) & 1], basis, k0, K, weight, j0, d, row_bytes,
                       c + 1, tid);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    mma_chunk<M>(As[c & 1], Bs[c & 1], acc, wm, wn, lane);
    __syncthreads();
  }

#pragma unroll
  for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int64_t j = j0 + wn * kWarpN + nf * 8 + 2 * t + e2;
      if (j >= ldq) continue;
      const float bj = (bias != nullptr && j < d) ? O::load(bias, j) : 0.f;
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = k0 + wm * kWarpM + mf * 16 + 8 * h + g;
          if (k < K) q[k * ldq + j] = O::conv(j < d ? acc[mf][nf][2 * h + e2] + bj : 0.f);
        }
    }
}

}  // namespace kernels

using namespace kernels;

cudaError_t launch_project(Mma mode, const void* basis, const void* weight, int64_t K,
                           int64_t d, int64_t ldr, const void* bias, void* q, int64_t ldq,
                           cudaStream_t stream) {
  if (K == 0 || ldq == 0) return cudaSuccess;
  const dim3 grid(unsigned((K + kTileM - 1) / kTileM), unsigned((ldq + kTileN - 1) / kTileN));
  const int64_t row_bytes = ldr * mma_elem_bytes(mode);
  const auto* b = static_cast<const uint8_t*>(basis);
  const auto* w = static_cast<const uint8_t*>(weight);
  switch (mode) {
    case Mma::kBF16:
      project_kernel<mode::bf16><<<grid, kThreads, 0, stream>>>(b, w, K, d, row_bytes, bias, q, ldq);
      break;
    case Mma::kFP16:
      project_kernel<mode::fp16><<<grid, kThreads, 0, stream>>>(b, w, K, d, row_bytes, bias, q, ldq);
      break;
    default:  // fp32 projections use the CUDA-core kernel (simt.cu)
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace simvq
