// simvq-kernels: SimVQ backward on CUDA tensor cores (sm_80+, mma.sync).
//
// grad_weight = g^T B[idx] (d x r) as a gather-GEMM, and grad_bias = sum_n g_n as a
// column sum of the same g tiles. Block (i, j, s) forms a 128 x 128 tile of the (d, r)
// product over the tokens of split s (reduction over tokens, 64 bytes of them per
// chunk), staging the transposed tiles through registers (tokens become the contiguous
// dimension) into double-buffered, swizzled shared memory (conflict-free stores, see
// plan.h), fragments read by ldmatrix; the blocks with j = 0 also sum their g tile's rows
// (grad_bias for rows i) from shared memory, so r = 128 needs one column tile, not two.
// Each split writes its fp32 partial (d x (r + 1), column r = grad_bias) and a second
// kernel adds the partials in split order in double. No K x d buffer, no atomics: reruns
// are bit-identical.
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mma.cuh"

namespace simvq {
namespace cuda {
namespace kernels {

using namespace dev;

// Element bits per mode, a NaN's bits, and the sum of the values in a word (fp32).
template <Mma M>
struct Elem {
  using bits = uint16_t;
  static constexpr uint32_t nan = 0x7FFFu;  // bf16 NaN
  static constexpr int per_word = 2;
  static __device__ __forceinline__ float word_sum(uint32_t w) {
    return __uint_as_float(w << 16) + __uint_as_float(w & 0xFFFF0000u);
  }
};
template <>
struct Elem<Mma::kFP16> {
  using bits = uint16_t;
  static constexpr uint32_t nan = 0x7FFFu;  // fp16 NaN
  static constexpr int per_word = 2;
  static __device__ __forceinline__ float word_sum(uint32_t w) {
    return __half2float(__ushort_as_half(uint16_t(w))) +
           __half2float(__ushort_as_half(uint16_t(w >> 16)));
  }
};
template <>
struct Elem<Mma::kTF32> {
  using bits = uint32_t;
  static constexpr uint32_t nan = 0x7FFFFFFFu;  // fp32 NaN
  static constexpr int per_word = 1;
  static __device__ __forceinline__ float word_sum(uint32_t w) { return __uint_as_float(w); }
};
template <>
struct Elem<Mma::kTF32x3> : Elem<Mma::kTF32> {};

template <class Mode>
__global__ void __launch_bounds__(kThreads, (Mode::kMode == Mma::kBF16 || Mode::kMode == Mma::kFP16) ? 2 : 1)
    backward_kernel(const void* __restrict__ g_, int64_t ldg, const void* __restrict__ basis_,
                    int64_t ldb, const int64_t* __restrict__ idx, int64_t N, int64_t K,
                    int64_t d, int64_t r, int64_t tokens_per_split, float* __restrict__ part) {
  constexpr Mma M = Mode::kMode;
  using E = Elem<M>;
  using bits_t = typename E::bits;
  constexpr int P = E::per_word;
  constexpr int kTok = kWords * P;  // tokens per chunk
  const auto* g = static_cast<const bits_t*>(g_);
  const auto* basis = static_cast<const bits_t*>(basis_);

  __shared__ __align__(16) uint32_t As[2][kStageWords];
  __shared__ __align__(16) uint32_t Bs[2][kStageWords];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t i0 = int64_t(blockIdx.x) * kTileM, j0 = int64_t(blockIdx.y) * kTileN;
  const int64_t nbeg = int64_t(blockIdx.z) * tokens_per_split;
  const int64_t nend = nbeg + tokens_per_split < N ? nbeg + tokens_per_split : N;
  const int64_t nchunks = nend > nbeg ? (nend - nbeg + kTok - 1) / kTok : 0;
  const bool bias_block = blockIdx.y == 0;  // also sums g over the tokens (grad_bias)

  // thread -> word p of the chunk (tokens p * P ..), tile rows cl + 16 e (plan.h): a
  // global read covers 8 consecutive elements of 4 token rows; a shared store, 8
  // consecutive rows x 4 words (32 distinct banks)
  const int p = plan::backward_word(warp, lane), cl = plan::backward_row(warp, lane, 0);
  uint32_t wa[8], wb[8];

  auto load = [&](int64_t c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) wa[e] = wb[e] = 0u;
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const int64_t n = nbeg + c * kTok + p * P + q;
      if (n < nend) {
        const bits_t* gr = g + n * ldg;
        const int64_t k = idx[n];
        const bool ok = k >= 0 && k < K;
        const bits_t* br = basis + (ok ? k : 0) * ldb;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          // an index out of range makes the token's g and basis row NaN, so that dW
          // and db get NaN (never a wrong finite value); the basis is not read for it
          // (with K = 0 there is no row 0 to read)
          const int64_t i = i0 + cl + 16 * e;
          const uint32_t x = !ok ? E::nan : (i < d ? uint32_t(gr[i]) : 0u);
          const int64_t j = j0 + cl + 16 * e;
          const uint32_t y = !ok ? E::nan : (j < r ? uint32_t(br[j]) : 0u);
          wa[e] |= x << (16 * q);
          wb[e] |= y << (16 * q);
        }
      }
    }
  };
  auto store = [&](int stage) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int at = plan::word_offset(plan::backward_row(warp, lane, e), p);
      As[stage][at] = wa[e];
      Bs[stage][at] = wb[e];
    }
  };
  // grad_bias: row bias_row(tid) of the g tile, half of its 16 words (fixed order)
  float bsum = 0.f;
  auto bias_add = [&](const uint32_t* T) {
    const int row = plan::bias_row(tid);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t* at = T + plan::seg_offset(row, plan::bias_seg(tid, i));
      const uint4 v = *reinterpret_cast<const uint4*>(at);
      s += (E::word_sum(v.x) + E::word_sum(v.y)) + (E::word_sum(v.z) + E::word_sum(v.w));
    }
    bsum += s;
  };

  float acc[kMF][kNF][4];
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mf][nf][e] = 0.f;

  if (nchunks > 0) {
    load(0);
    store(0);
  }
  __syncthreads();
  for (int64_t c = 0; c < nchunks; ++c) {
    if (c + 1 < nchunks) load(c + 1);  // global loads in flight during the products
    mma_chunk<M>(As[c & 1], Bs[c & 1], acc, wm, wn, lane);
    if (bias_block) bias_add(As[c & 1]);
    if (c + 1 < nchunks) store(int((c + 1) & 1));
    __syncthreads();
  }

  const int gq = lane >> 2, t = lane & 3;
  float* out = part + int64_t(blockIdx.z) * d * (r + 1);
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = i0 + wm * kWarpM + mf * 16 + gq + 8 * (e >> 1);
        const int64_t j = j0 + wn * kWarpN + nf * 8 + 2 * t + (e & 1);
        if (i < d && j < r) out[i * (r + 1) + j] = acc[mf][nf][e];
      }
  if (bias_block) {  // column r: the two halves of each row, in order
    float* red = reinterpret_cast<float*>(&As[0][0]);  // [2][128] (free after the loop)
    red[tid] = bsum;
    __syncthreads();
    const int64_t i = i0 + tid;
    if (tid < kTileM && i < d) out[i * (r + 1) + r] = red[tid] + red[tid + kTileM];
  }
}

template <typename T>
__device__ __forceinline__ T from_double(double x);
template <>
__device__ __forceinline__ float from_double<float>(double x) { return float(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16(float(x));  // double -> float is exact enough before bf16 rounding
}
template <>
__device__ __forceinline__ __half from_double<__half>(double x) {
  return __float2half(float(x));
}

template <typename T>
__global__ void __launch_bounds__(256)
    backward_finalize_kernel(const float* __restrict__ part, int splits, int64_t d, int64_t r,
                             T* __restrict__ dW, T* __restrict__ db) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = d * (r + 1);
  if (e >= total) return;
  double s = 0.0;
  for (int sp = 0; sp < splits; ++sp) s += double(part[int64_t(sp) * total + e]);
  const int64_t i = e / (r + 1), j = e - i * (r + 1);
  if (j < r) {
    dW[i * r + j] = from_double<T>(s);
  } else if (db != nullptr) {
    db[i] = from_double<T>(s);
  }
}

}  // namespace kernels

using namespace kernels;

cudaError_t launch_backward_partials(Mma mode, const void* g, int64_t ldg, const void* basis,
                                     int64_t ldb, const int64_t* idx, int64_t N, int64_t K,
                                     int64_t d, int64_t r, int splits, int64_t tokens_per_split,
                                     float* part, cudaStream_t stream) {
  if (d == 0) return cudaSuccess;
  const dim3 grid(unsigned((d + kTileM - 1) / kTileM), unsigned(plan::backward_col_tiles(r)),
                  unsigned(splits));
  switch (mode) {
    case Mma::kBF16:
      backward_kernel<mode::bf16><<<grid, kThreads, 0, stream>>>(g, ldg, basis, ldb, idx, N, K,
                                                                 d, r, tokens_per_split, part);
      break;
    case Mma::kFP16:
      backward_kernel<mode::fp16><<<grid, kThreads, 0, stream>>>(g, ldg, basis, ldb, idx, N, K,
                                                                 d, r, tokens_per_split, part);
      break;
    case Mma::kTF32:
      backward_kernel<mode::tf32><<<grid, kThreads, 0, stream>>>(g, ldg, basis, ldb, idx, N, K,
                                                                 d, r, tokens_per_split, part);
      break;
    case Mma::kTF32x3:
      backward_kernel<mode::tf32x3><<<grid, kThreads, 0, stream>>>(
          g, ldg, basis, ldb, idx, N, K, d, r, tokens_per_split, part);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_backward_finalize(const float* part, int splits, int64_t d, int64_t r,
                                     int out_dtype, void* dW, void* db, cudaStream_t stream) {
  const int64_t total = d * (r + 1);
  if (total == 0) return cudaSuccess;
  const dim3 grid(unsigned((total + 255) / 256));
  switch (out_dtype) {
    case 0:
      backward_finalize_kernel<float><<<grid, 256, 0, stream>>>(
          part, splits, d, r, static_cast<float*>(dW), static_cast<float*>(db));
      break;
    case 1:
      backward_finalize_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
          part, splits, d, r, static_cast<__nv_bfloat16*>(dW), static_cast<__nv_bfloat16*>(db));
      break;
    default:
      backward_finalize_kernel<__half><<<grid, 256, 0, stream>>>(
          part, splits, d, r, static_cast<__half*>(dW), static_cast<__half*>(db));
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace simvq
