// simvq-kernels: the tensor-core core shared by the search, projection and backward
// kernels.
//
// They form C[m][n] = sum_k A[m][k] * B[n][k] for a 128 x 128 block tile with 8 warps
// (2 along m x 4 along n, 64 x 32 outputs per warp) from shared-memory tiles stored as
// [row][word]: 16 words (64 bytes) of the reduction dimension per row and chunk, rows
// unpadded, 16-byte segments XOR-swizzled per row (plan.h: conflict-free cp.async
// writes and ldmatrix reads). A 32-bit word holds two bf16/fp16 values (lower k in the
// low half) or one fp32 value.
//
// mma.sync (sm_80+): m16n8k16 for bf16/fp16, m16n8k8 for tf32. Fragments are read with
// ldmatrix.x4 (6 per 16 MMAs): ldmatrix moves 32-bit words (lane l gets row l/4, word
// l%4 of each 8 x 4-word matrix), which is the fragment layout of both shapes in words
// (bf16: k pair 2t, 2t+1 in word t; tf32: k = t), so one loader serves both.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "plan.h"

namespace simvq {
namespace cuda {
namespace dev {

// Template tags for the kernels, so that their names read e.g.
// simvq::cuda::kernels::search_kernel<simvq::cuda::mode::bf16> in cuobjdump.
}  // namespace dev
namespace mode {
struct bf16 { static constexpr Mma kMode = Mma::kBF16; };
struct fp16 { static constexpr Mma kMode = Mma::kFP16; };
struct tf32 { static constexpr Mma kMode = Mma::kTF32; };
struct tf32x3 { static constexpr Mma kMode = Mma::kTF32x3; };
}  // namespace mode
namespace dev {

constexpr int kThreads = 256;
constexpr int kWords = plan::kRowWords;  // 16 words of the reduction dim per row and chunk
constexpr int kWarpM = 64, kWarpN = 32;  // outputs per warp
constexpr int kMF = kWarpM / 16, kNF = kWarpN / 8;
constexpr int kStageWords = plan::kTileWords;  // one operand's tile for one chunk
static_assert(kTileM == plan::kRows && kTileN == plan::kRows, "tiles are 128 rows");
static_assert(kChunkBytes == plan::kRowWords * 4, "a chunk is one tile row");

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 fills the 16 bytes with 0.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8 x 4-word matrices from shared memory; lanes 8i..8i+7 give the rows of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint32_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// Chunk c (64 bytes of each row) of 128 rows of `a` starting at row a0 (rows >= a_end
// read as 0) into the swizzled tile T, as 16-byte cp.async pieces (512, 2 per thread).
// Rows of `row_bytes` bytes (a multiple of 64), 16-byte aligned. No commit.
__device__ __forceinline__ void load_tile_async(uint32_t* __restrict__ T,
                                                const uint8_t* __restrict__ a, int64_t a0,
                                                int64_t a_end, int64_t row_bytes, int64_t c,
                                                int tid) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int q = tid + h * kThreads, row = plan::copy_row(q), seg = plan::copy_seg(q);
    const int64_t ar = a0 + row;
    cp_async16(&T[plan::seg_offset(row, seg)],
               a + (ar < a_end ? ar : 0) * row_bytes + c * kChunkBytes + seg * 16,
               ar < a_end ? 16 : 0);
  }
}

// Chunk c of 128 rows of `a` (from a0) and of `b` (from b0) into one stage; commits.
__device__ __forceinline__ void load_chunk_async(uint32_t* __restrict__ As,
                                                 uint32_t* __restrict__ Bs,
                                                 const uint8_t* __restrict__ a, int64_t a0,
                                                 int64_t a_end, const uint8_t* __restrict__ b,
                                                 int64_t b0, int64_t b_end, int64_t row_bytes,
                                                 int64_t c, int tid) {
  load_tile_async(As, a, a0, a_end, row_bytes, c, tid);
  load_tile_async(Bs, b, b0, b_end, row_bytes, c, tid);
  cp_async_commit();
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

template <Mma M>
__device__ __forceinline__ void mma_op(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (M == Mma::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (M == Mma::kFP16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// acc[mf][nf][4] += A_tile(warp rows) * B_tile(warp cols)^T over one 16-word chunk.
// Accumulator layout (both shapes): e = 0, 1 -> row g, cols 2t, 2t+1; e = 2, 3 -> row
// g + 8; g = lane / 4, t = lane % 4, rows wm*64 + mf*16, cols wn*32 + nf*8.
template <Mma M>
__device__ __forceinline__ void mma_chunk(const uint32_t* __restrict__ As,
                                          const uint32_t* __restrict__ Bs,
                                          float (&acc)[kMF][kNF][4], int wm, int wn,
                                          int lane) {
#pragma unroll
  for (int ks = 0; ks < kWords / 8; ++ks) {
    uint32_t a[kMF][4], b[kNF][2];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
      const int row = plan::ldsm_a_row(wm * kWarpM + mf * 16, lane);
      ldsm_x4(a[mf], As + plan::seg_offset(row, plan::ldsm_a_seg(ks, lane)));
    }
#pragma unroll
    for (int np = 0; np < kNF / 2; ++np) {
      const int row = plan::ldsm_b_row(wn * kWarpN + np * 16, lane);
      uint32_t r[4];
      ldsm_x4(r, Bs + plan::seg_offset(row, plan::ldsm_b_seg(ks, lane)));
      b[2 * np][0] = r[0];
      b[2 * np][1] = r[1];
      b[2 * np + 1][0] = r[2];
      b[2 * np + 1][1] = r[3];
    }
    if constexpr (M == Mma::kBF16 || M == Mma::kFP16) {
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) mma_op<M>(acc[mf][nf], a[mf], b[nf]);
    } else if constexpr (M == Mma::kTF32) {
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[mf][e] = to_tf32(__uint_as_float(a[mf][e]));
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
        for (int e = 0; e < 2; ++e) b[nf][e] = to_tf32(__uint_as_float(b[nf][e]));
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) mma_op<M>(acc[mf][nf], a[mf], b[nf]);
    } else {  // 3xTF32: x = hi + lo; small products first, then hi*hi
      uint32_t alo[kMF][4], blo[kNF][2];
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = __uint_as_float(a[mf][e]);
          a[mf][e] = to_tf32(x);
          alo[mf][e] = to_tf32(x - __uint_as_float(a[mf][e]));
        }
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = __uint_as_float(b[nf][e]);
          b[nf][e] = to_tf32(x);
          blo[nf][e] = to_tf32(x - __uint_as_float(b[nf][e]));
        }
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) {
          mma_op<M>(acc[mf][nf], alo[mf], b[nf]);
          mma_op<M>(acc[mf][nf], a[mf], blo[nf]);
          mma_op<M>(acc[mf][nf], a[mf], b[nf]);
        }
    }
  }
}

}  // namespace dev
}  // namespace cuda
}  // namespace simvq
