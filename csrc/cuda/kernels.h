// simvq-kernels: the CUDA kernels' launch interface (no ATen here, so that the .cu
// files compile without torch's headers; csrc/cuda/ops.cpp does the ATen side).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace simvq {
namespace cuda {

// How the tensor cores multiply: bf16/fp16 operands with fp32 accumulation; fp32
// operands rounded to tf32 (torch.get_float32_matmul_precision() != "highest"); or
// fp32 operands split as hi + lo in tf32 and multiplied as hi*hi + hi*lo + lo*hi
// (3xTF32, about fp32 accuracy, for "highest").
enum class Mma : int { kBF16 = 0, kFP16 = 1, kTF32 = 2, kTF32x3 = 3 };

// Bytes per element of the operands for a mode.
inline int mma_elem_bytes(Mma m) { return (m == Mma::kBF16 || m == Mma::kFP16) ? 2 : 4; }

// Tiles of the search and backward kernels (both: 128 x 128 outputs per block of 256
// threads; the reduction dimension in chunks of 64 bytes per row).
constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kChunkBytes = 64;

// Blocks per SM the tensor-core kernels are built for (their __launch_bounds__): two for
// bf16/fp16 (at most 128 registers), one for the tf32 modes (their fragments are
// converted in registers). The search's grid and shared-memory plans assume these.
constexpr int search_blocks_per_sm(Mma m) {
  return (m == Mma::kBF16 || m == Mma::kFP16) ? 2 : 1;
}

// q[k][j] = sum_i basis[k][i] * weight[j][i] + bias[j] (fp32 accumulation, bias added in
// fp32, one rounding to the inputs' dtype) for k < K, j < d, and 0 for d <= j < ldq.
// basis: K x ldr, weight: d x ldr (ldr a multiple of the 64-byte chunk, zero-padded,
// 16-byte aligned rows); bias: d elements or nullptr; q: K x ldq. Same element type for
// all: bf16 or fp16 (kBF16 / kFP16; other modes return cudaErrorInvalidValue).
cudaError_t launch_project(Mma mode, const void* basis, const void* weight, int64_t K,
                           int64_t d, int64_t ldr, const void* bias, void* q, int64_t ldq,
                           cudaStream_t stream);

// ||Q_k||^2 (fp32) from exactly the values the product uses (tf32-rounded for kTF32).
// cb: K rows of `ld` elements (ld a multiple of the 64-byte chunk), d valid columns.
cudaError_t launch_code_norms(Mma mode, const void* cb, int64_t K, int64_t ld, float* qn,
                              cudaStream_t stream);

// Partial search: block (m, s) scans codes [s * codes_per_split, ...) for tokens
// [m * kTileM, ...) and writes the best (||Q_k||^2 - 2 z.Q_k, k) per token to
// part_val[s * N + n], part_idx[s * N + n]; ties: lowest k. z: N x ld, cb: K x ld (ld a
// multiple of the 64-byte chunk, zero-padded; 16-byte aligned rows). smem_budget: the
// dynamic shared memory a block may take (plan::smem_budget for the device and
// search_blocks_per_sm(mode)), at least 32 KiB.
cudaError_t launch_search(Mma mode, const void* z, const void* cb, const float* qn, int64_t N,
                          int64_t K, int64_t ld, int splits, int64_t codes_per_split,
                          int64_t smem_budget, float* part_val, int32_t* part_idx,
                          cudaStream_t stream);

// Merges the splits in order (strict '<': lowest index on ties) and writes idx (int64)
// and dist = max(0, ||z||^2 + best) (fp32). z: N x ld of the mode's element type, d
// valid columns (||z||^2 from the stored values).
cudaError_t launch_search_finalize(Mma mode, const void* z, int64_t N, int64_t d, int64_t ld,
                                   int splits, const float* part_val, const int32_t* part_idx,
                                   int64_t* idx, float* dist, cudaStream_t stream);

// Backward partials: block (i, j, s) forms, over tokens [s * tokens_per_split, ...),
// part[s][i][j] = sum_n g[n][i] * basis[idx[n]][j] for i < d, j < r, and the blocks
// with j = 0 part[s][i][r] = sum_n g[n][i] (grad_bias); plan::backward_col_tiles(r)
// column tiles. g: N x d (row stride ldg), basis: K x r (row stride ldb), element type
// of the mode. An index outside [0, K) makes its contribution to every element NaN (no
// out-of-bounds read).
cudaError_t launch_backward_partials(Mma mode, const void* g, int64_t ldg, const void* basis,
                                     int64_t ldb, const int64_t* idx, int64_t N, int64_t K,
                                     int64_t d,
                                     int64_t r, int splits, int64_t tokens_per_split,
                                     float* part, cudaStream_t stream);

// dW[i][j] = sum_s part[s][i][j] (j < r), db[i] = sum_s part[s][i][r], in split order
// (double accumulation); out_dtype: 0 float32, 1 bfloat16, 2 float16.
cudaError_t launch_backward_finalize(const float* part, int splits, int64_t d, int64_t r,
                                     int out_dtype, void* dW, void* db, cudaStream_t stream);

// float64 (csrc/cuda/simt.cu, CUDA cores): the whole search (norms into qn (K), splits
// as above with double partials, then idx and dist = max(0, ||z||^2 + best)).
cudaError_t launch_search_f64(const double* z, int64_t ldz, const double* cb, int64_t ldc,
                              int64_t N, int64_t K, int64_t d, double* qn, int splits,
                              int64_t codes_per_split, double* part_val, int32_t* part_idx,
                              int64_t* idx, double* dist, cudaStream_t stream);
// The projection on CUDA cores, one FMA per term in k order (float64, and float32 at
// fp32 accuracy): q[k][j] = basis[k] . weight[j] + bias[j] for j < d, 0 for d <= j < ldq.
// basis K x r, weight d x r (row strides ldb, ldw), bias d elements or nullptr.
cudaError_t launch_project_f64(const double* basis, int64_t ldb, const double* weight,
                               int64_t ldw, int64_t K, int64_t d, int64_t r,
                               const double* bias, double* q, int64_t ldq,
                               cudaStream_t stream);
cudaError_t launch_project_f32(const float* basis, int64_t ldb, const float* weight,
                               int64_t ldw, int64_t K, int64_t d, int64_t r, const float* bias,
                               float* q, int64_t ldq, cudaStream_t stream);

}  // namespace cuda
}  // namespace simvq
