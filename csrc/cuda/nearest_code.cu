// simvq-kernels: fused nearest-code search on CUDA tensor cores (sm_80+, mma.sync).
//
// Block (m, s) keeps 128 tokens in shared memory, loaded once (the whole width d when it
// fits the block's share of shared memory, else its first chunks, the rest streamed with
// the codes), and streams the codes of split s in tiles of 128: the tile's dot products
// z.Q^T come from mma.sync over the whole width d (64-byte chunks, double-buffered with
// cp.async, fragments read by ldmatrix), and are folded at once into a running (min, argmin)
// of ||Q_k||^2 - 2 z.Q_k per token held in registers; the N x K matrix never exists.
// Ties go to the lowest index at every level: within a thread codes are visited in
// increasing order with a strict '<'; across the 4 lanes of a row, the 4 warps of a
// row and the splits, candidates merge by (value, index), lowest index on equal value.
// Every code's value is computed by the same instructions whatever the split, so the
// result does not depend on the number of splits and reruns are bit-identical.
#include <atomic>
#include <cfloat>
#include <climits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mma.cuh"

namespace simvq {
namespace cuda {
namespace kernels {

using namespace dev;

constexpr float kInf = __builtin_huge_valf();
static_assert(plan::kStages == 2, "the search kernel double-buffers (stage = iteration & 1)");

__device__ __forceinline__ bool better(float v, int32_t i, float bv, int32_t bi) {
  return v < bv || (v == bv && i < bi);
}

template <Mma M>
__device__ __forceinline__ float elem_value(const void* base, int64_t i) {
  if constexpr (M == Mma::kBF16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  } else if constexpr (M == Mma::kFP16) {
    return __half2float(static_cast<const __half*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

// One warp per code: ||Q_k||^2 in fp32 over the values that enter the product, summed
// in a fixed lane order (identical rows get identical norms).
template <class Mode>
__global__ void __launch_bounds__(256) code_norms_kernel(const void* __restrict__ cb, int64_t K,
                                                         int64_t ld, float* __restrict__ qn) {
  constexpr Mma M = Mode::kMode;
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (k >= K) return;
  float s = 0.f;
  for (int64_t j = lane; j < ld; j += 32) {
    float x = elem_value<M>(cb, k * ld + j);
    if constexpr (M == Mma::kTF32) x = __uint_as_float(to_tf32(x));
    s = fmaf(x, x, s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) qn[k] = s;
}

// Two blocks per SM for bf16/fp16 (128 registers); the tf32 modes convert their
// fragments in registers and need more, so one block (search_blocks_per_sm).
//
// Shared memory (dynamic, plan::SearchSmem): the token tile's chunks [0, resident) are
// loaded once, at the start, and stay for every code tile; the code tiles stream
// through 2 stages, each with the token chunk too when that chunk is not resident.
template <class Mode>
__global__ void __launch_bounds__(kThreads, search_blocks_per_sm(Mode::kMode))
    search_kernel(const uint8_t* __restrict__ z, const uint8_t* __restrict__ cb,
                  const float* __restrict__ qn, int64_t N, int64_t K, int64_t row_bytes,
                  int64_t codes_per_split, int32_t resident, float* __restrict__ part_val,
                  int32_t* __restrict__ part_idx) {
  constexpr Mma M = Mode::kMode;
  extern __shared__ __align__(16) uint32_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kTileM;
  const int64_t s = blockIdx.y;
  const int64_t kbeg = s * codes_per_split;
  const int64_t kend = kbeg + codes_per_split < K ? kbeg + codes_per_split : K;
  const int64_t ntiles = kend > kbeg ? (kend - kbeg + kTileN - 1) / kTileN : 0;
  const int64_t nchunks = row_bytes / kChunkBytes;
  const int64_t total = ntiles * nchunks;
  const int32_t nchunks32 = int32_t(nchunks);
  // [resident token chunks][stage 0: codes (, tokens)][stage 1: codes (, tokens)]
  const bool stream_a = resident < nchunks32;
  uint32_t* const Zs = smem;
  uint32_t* const stages = smem + int64_t(resident) * kStageWords;
  const int stage_words = (stream_a ? 2 : 1) * kStageWords;

  // the resident token chunks: one cp.async group, before the first stage's
  for (int32_t c = 0; c < resident; ++c)
    load_tile_async(Zs + int64_t(c) * kStageWords, z, m0, N, row_bytes, c, tid);
  cp_async_commit();
  // chunk c of code tile `tile` (and of the tokens when c is not resident) into a stage
  auto load = [&](int32_t tile, int32_t c, int stage) {
    uint32_t* st = stages + stage * stage_words;
    load_tile_async(st, cb, kbeg + int64_t(tile) * kTileN, kend, row_bytes, c, tid);
    if (c >= resident) load_tile_async(st + kStageWords, z, m0, N, row_bytes, c, tid);
    cp_async_commit();
  };

  float best_v[kMF][2];
  int32_t best_i[kMF][2];
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best_v[mf][h] = kInf;  // +inf
      best_i[mf][h] = INT_MAX;
    }

  float acc[kMF][kNF][4];
  float qv[kNF][2];
  if (total > 0) load(0, 0, 0);
  int32_t tile = 0, c = 0;  // iteration it = tile * nchunks + c (both < 2^31)
  for (int64_t it = 0; it < total; ++it) {
    const bool last_chunk = c + 1 == nchunks32;
    const int64_t col0 = kbeg + int64_t(tile) * kTileN + wn * kWarpN + 2 * t;
    if (c == 0) {
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mf][nf][e] = 0.f;
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = col0 + nf * 8 + e;
          qv[nf][e] = col < kend ? __ldg(qn + col) : kInf;
        }
    }
    // (the wait leaves only the newest group in flight: the resident group, committed
    // first, is complete before the first product)
    if (it + 1 < total) {
      load(last_chunk ? tile + 1 : tile, last_chunk ? 0 : c + 1, int((it + 1) & 1));
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t* st = stages + int(it & 1) * stage_words;
    mma_chunk<M>(c < resident ? Zs + int64_t(c) * kStageWords : st + kStageWords, st, acc, wm,
                 wn, lane);
    __syncthreads();
    if (last_chunk) {
      // fold the tile into the running best; per row slot, columns in increasing order
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = fmaf(-2.f, acc[mf][nf][e], qv[nf][e & 1]);
            const int h = e >> 1;
            if (v < best_v[mf][h]) {
              best_v[mf][h] = v;
              best_i[mf][h] = int32_t(col0 + nf * 8 + (e & 1));
            }
          }
      ++tile;
      c = 0;
    } else {
      ++c;
    }
  }
  cp_async_wait<0>();  // (only the resident group when there was no code tile)
  __syncthreads();

  // the 4 lanes sharing a row (t = 0..3), then the 4 warps sharing a row (wn = 0..3)
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best_v[mf][h], o);
        const int32_t i = __shfl_xor_sync(0xffffffffu, best_i[mf][h], o);
        if (better(v, i, best_v[mf][h], best_i[mf][h])) {
          best_v[mf][h] = v;
          best_i[mf][h] = i;
        }
      }
  // (shared memory is free again: at least 2 tiles of 8 KiB, and 2 x 2 KiB are needed)
  float* red_v = reinterpret_cast<float*>(smem);                       // [4][128]
  int32_t* red_i = reinterpret_cast<int32_t*>(smem + 4 * kTileM);      // [4][128]
  if (t == 0) {
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * kWarpM + mf * 16 + h * 8 + g;
        red_v[wn * kTileM + row] = best_v[mf][h];
        red_i[wn * kTileM + row] = best_i[mf][h];
      }
  }
  __syncthreads();
  if (tid < kTileM && m0 + tid < N) {
    float bv = red_v[tid];
    int32_t bi = red_i[tid];
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      const float v = red_v[w * kTileM + tid];
      const int32_t i = red_i[w * kTileM + tid];
      if (better(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    }
    part_val[s * N + m0 + tid] = bv;
    part_idx[s * N + m0 + tid] = bi;
  }
}

// One warp per token: ||z||^2 (fixed lane order) and the merge of the splits.
template <class Mode>
__global__ void __launch_bounds__(256)
    finalize_kernel(const void* __restrict__ z, int64_t N, int64_t d, int64_t ld, int splits,
                    const float* __restrict__ part_val, const int32_t* __restrict__ part_idx,
                    int64_t* __restrict__ idx, float* __restrict__ dist) {
  constexpr Mma M = Mode::kMode;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  float s = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float x = elem_value<M>(z, n * ld + j);
    s = fmaf(x, x, s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) {
    float bv = part_val[n];
    int32_t bi = part_idx[n];
    for (int sp = 1; sp < splits; ++sp) {
      const float v = part_val[int64_t(sp) * N + n];
      const int32_t i = part_idx[int64_t(sp) * N + n];
      if (better(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    }
    idx[n] = bi == INT_MAX ? 0 : bi;
    dist[n] = fmaxf(s + bv, 0.f);
  }
}

}  // namespace kernels

using namespace kernels;

cudaError_t launch_code_norms(Mma mode, const void* cb, int64_t K, int64_t ld, float* qn,
                              cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  const dim3 grid(unsigned((K + 7) / 8));
  switch (mode) {
    case Mma::kBF16: code_norms_kernel<mode::bf16><<<grid, 256, 0, stream>>>(cb, K, ld, qn); break;
    case Mma::kFP16: code_norms_kernel<mode::fp16><<<grid, 256, 0, stream>>>(cb, K, ld, qn); break;
    case Mma::kTF32: code_norms_kernel<mode::tf32><<<grid, 256, 0, stream>>>(cb, K, ld, qn); break;
    case Mma::kTF32x3: code_norms_kernel<mode::tf32x3><<<grid, 256, 0, stream>>>(cb, K, ld, qn); break;
  }
  return cudaGetLastError();
}

// Lets search_kernel<Mode> take `bytes` of dynamic shared memory on the current device
// and prefer shared memory over L1 (it reads global memory through cp.async.cg, which
// skips L1). Function attributes, set once per device and size (the largest asked so
// far), so that later calls, e.g. while a CUDA graph is captured, call nothing.
template <class Mode>
static cudaError_t allow_search_smem(int64_t bytes) {
  constexpr int kMaxDevices = 256;
  static std::atomic<int64_t> allowed[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (bytes <= allowed[device].load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(search_kernel<Mode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(bytes));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(search_kernel<Mode>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             int(cudaSharedmemCarveoutMaxShared));
  if (err != cudaSuccess) return err;
  int64_t prev = allowed[device].load(std::memory_order_relaxed);
  while (prev < bytes && !allowed[device].compare_exchange_weak(prev, bytes)) {
  }
  return cudaSuccess;
}

template <class Mode>
static cudaError_t launch_search_mode(dim3 grid, int64_t smem_bytes, cudaStream_t stream,
                                      const uint8_t* z, const uint8_t* cb, const float* qn,
                                      int64_t N, int64_t K, int64_t row_bytes,
                                      int64_t codes_per_split, int32_t resident,
                                      float* part_val, int32_t* part_idx) {
  const cudaError_t err = allow_search_smem<Mode>(smem_bytes);
  if (err != cudaSuccess) return err;
  search_kernel<Mode><<<grid, kThreads, size_t(smem_bytes), stream>>>(
      z, cb, qn, N, K, row_bytes, codes_per_split, resident, part_val, part_idx);
  return cudaGetLastError();
}

cudaError_t launch_search(Mma mode, const void* z, const void* cb, const float* qn, int64_t N,
                          int64_t K, int64_t ld, int splits, int64_t codes_per_split,
                          int64_t smem_budget, float* part_val, int32_t* part_idx,
                          cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const dim3 grid(unsigned((N + kTileM - 1) / kTileM), unsigned(splits));
  const int64_t row_bytes = ld * mma_elem_bytes(mode);
  const plan::SearchSmem sm = plan::plan_search_smem(row_bytes / kChunkBytes, smem_budget);
  const auto* zb = static_cast<const uint8_t*>(z);
  const auto* cbb = static_cast<const uint8_t*>(cb);
  const int32_t res = int32_t(sm.resident);
  switch (mode) {
    case Mma::kBF16:
      return launch_search_mode<mode::bf16>(grid, sm.bytes, stream, zb, cbb, qn, N, K, row_bytes,
                                            codes_per_split, res, part_val, part_idx);
    case Mma::kFP16:
      return launch_search_mode<mode::fp16>(grid, sm.bytes, stream, zb, cbb, qn, N, K, row_bytes,
                                            codes_per_split, res, part_val, part_idx);
    case Mma::kTF32:
      return launch_search_mode<mode::tf32>(grid, sm.bytes, stream, zb, cbb, qn, N, K, row_bytes,
                                            codes_per_split, res, part_val, part_idx);
    case Mma::kTF32x3:
      return launch_search_mode<mode::tf32x3>(grid, sm.bytes, stream, zb, cbb, qn, N, K,
                                              row_bytes, codes_per_split, res, part_val,
                                              part_idx);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_search_finalize(Mma mode, const void* z, int64_t N, int64_t d, int64_t ld,
                                   int splits, const float* part_val, const int32_t* part_idx,
                                   int64_t* idx, float* dist, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const dim3 grid(unsigned((N + 7) / 8));
  switch (mode) {
    case Mma::kBF16:
      finalize_kernel<mode::bf16><<<grid, 256, 0, stream>>>(z, N, d, ld, splits, part_val,
                                                            part_idx, idx, dist);
      break;
    case Mma::kFP16:
      finalize_kernel<mode::fp16><<<grid, 256, 0, stream>>>(z, N, d, ld, splits, part_val,
                                                            part_idx, idx, dist);
      break;
    case Mma::kTF32:
    case Mma::kTF32x3:
      finalize_kernel<mode::tf32><<<grid, 256, 0, stream>>>(z, N, d, ld, splits, part_val,
                                                            part_idx, idx, dist);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace simvq
