// simvq-kernels: the tensor-core core shared by the search and backward kernels.
//
// Both kernels form C[m][n] = sum_k A[m][k] * B[n][k] for a 128 x 128 block tile with
// 8 warps (2 along m x 4 along n, 64 x 32 outputs per warp) from shared-memory tiles
// stored as [row][word]: 16 words (64 bytes) of the reduction dimension per row and
// chunk, rows padded to 20 words so that the fragment loads below hit 32 distinct banks.
// A 32-bit word holds two bf16/fp16 values (lower k in the low half) or one fp32 value.
//
// mma.sync (sm_80+): m16n8k16 for bf16/fp16, m16n8k8 for tf32; the fragment addresses
// of the two shapes coincide in words, so one loader serves both.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

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
constexpr int kWords = kChunkBytes / 4;  // 16 words of the reduction dim per row and chunk
constexpr int kLdw = kWords + 4;         // padded row (20 words)
constexpr int kWarpM = 64, kWarpN = 32;  // outputs per warp
constexpr int kMF = kWarpM / 16, kNF = kWarpN / 8;
constexpr int kStageWords = kTileM * kLdw;  // one operand's tile for one chunk

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

// Chunk c (64 bytes of each row) of 128 rows of `a` starting at row a0 (rows >= a_end
// read as 0) and of 128 rows of `b` starting at b0 (rows >= b_end read as 0), into one
// stage, as 16-byte cp.async pieces (512 per operand, 2 per thread each). Rows of
// `row_bytes` bytes (a multiple of 64), 16-byte aligned.
__device__ __forceinline__ void load_chunk_async(uint32_t* __restrict__ As,
                                                 uint32_t* __restrict__ Bs,
                                                 const uint8_t* __restrict__ a, int64_t a0,
                                                 int64_t a_end, const uint8_t* __restrict__ b,
                                                 int64_t b0, int64_t b_end, int64_t row_bytes,
                                                 int64_t c, int tid) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int q = tid + h * kThreads, row = q >> 2, seg = q & 3;
    const int64_t off = c * kChunkBytes + seg * 16;
    const int64_t ar = a0 + row, br = b0 + row;
    cp_async16(&As[row * kLdw + seg * 4], a + (ar < a_end ? ar : 0) * row_bytes + off,
               ar < a_end ? 16 : 0);
    cp_async16(&Bs[row * kLdw + seg * 4], b + (br < b_end ? br : 0) * row_bytes + off,
               br < b_end ? 16 : 0);
  }
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
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < kWords / 8; ++ks) {
    uint32_t a[kMF][4], b[kNF][2];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
      const uint32_t* p = As + (wm * kWarpM + mf * 16 + g) * kLdw + ks * 8 + t;
      a[mf][0] = p[0];
      a[mf][1] = p[8 * kLdw];
      a[mf][2] = p[4];
      a[mf][3] = p[8 * kLdw + 4];
    }
#pragma unroll
    for (int nf = 0; nf < kNF; ++nf) {
      const uint32_t* p = Bs + (wn * kWarpN + nf * 8 + g) * kLdw + ks * 8 + t;
      b[nf][0] = p[0];
      b[nf][1] = p[4];
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
