// simvq-kernels: CUDA-core (no tensor core) kernels: the float64 path of the CUDA
// backend, and the exact-fp32 projection.
//
// A simple tiled kernel family: 64 x 64 output tiles per block of 16 x 16 threads, 4 x 4
// outputs per thread, the reduction dimension in chunks of 16 through shared memory.
// Every output is a sum in increasing k with one FMA per term, whatever its position,
// so identical rows give identical values (ties: lowest index), and the search keeps a
// running (min, argmin) per token exactly as the tensor-core kernels do.
//
// float32 projections use this kernel too (not tf32 tensor cores, whatever torch's fp32
// matmul precision): the codebook is then exact to fp32 accumulation, as on the CPU,
// and it costs K*r*d FMAs, small next to the search's N*K*d when N >> r.
#include <climits>
#include <cstdint>

#include "kernels.h"

namespace simvq {
namespace cuda {
namespace kernels {

constexpr int kT = 64, kKc = 16, kThr = 256;

// acc[i][j] += sum over k in [k0, k0 + 16) of A[m0 + ty + 16 i][k] * B[n0 + tx + 16 j][k]
// (rows beyond m_end / n_end and columns beyond kdim read as 0).
template <typename T>
__device__ __forceinline__ void simt_chunk(T (&As)[kT][kKc + 1], T (&Bs)[kT][kKc + 1],
                                           const T* __restrict__ a, int64_t lda, int64_t m0,
                                           int64_t m_end, const T* __restrict__ b, int64_t ldb,
                                           int64_t n0, int64_t n_end, int64_t k0, int64_t kdim,
                                           T (&acc)[4][4]) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int e = tid + kThr * q, row = e / kKc, col = e % kKc;
    const int64_t k = k0 + col;
    const int64_t am = m0 + row, bn = n0 + row;
    As[row][col] = (am < m_end && k < kdim) ? a[am * lda + k] : T(0);
    Bs[row][col] = (bn < n_end && k < kdim) ? b[bn * ldb + k] : T(0);
  }
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < kKc; ++kk) {
    T av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = As[ty + 16 * i][kk];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[tx + 16 * j][kk];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(256) norms_f64_kernel(const double* __restrict__ cb, int64_t K,
                                                        int64_t d, int64_t ld,
                                                        double* __restrict__ qn) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double s = 0.0;
  for (int64_t j = 0; j < d; ++j) s = fma(cb[k * ld + j], cb[k * ld + j], s);
  qn[k] = s;
}

__global__ void __launch_bounds__(kThr) search_f64_kernel(
    const double* __restrict__ z, int64_t ldz, const double* __restrict__ cb, int64_t ldc,
    const double* __restrict__ qn, int64_t N, int64_t K, int64_t d, int64_t codes_per_split,
    double* __restrict__ part_val, int32_t* __restrict__ part_idx) {
  __shared__ double As[kT][kKc + 1], Bs[kT][kKc + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = int64_t(blockIdx.x) * kT, s = blockIdx.y;
  const int64_t kbeg = s * codes_per_split;
  const int64_t kend = kbeg + codes_per_split < K ? kbeg + codes_per_split : K;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  double best_v[4];
  int32_t best_i[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best_v[i] = inf;
    best_i[i] = INT_MAX;
  }
  for (int64_t n0 = kbeg; n0 < kend; n0 += kT) {
    double acc[4][4] = {};
    for (int64_t k0 = 0; k0 < d; k0 += kKc)
      simt_chunk<double>(As, Bs, z, ldz, m0, N, cb, ldc, n0, kend, k0, d, acc);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // columns in increasing order: strict '<'
      const int64_t col = n0 + tx + 16 * j;
      if (col >= kend) continue;
      const double qv = qn[col];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const double v = fma(-2.0, acc[i][j], qv);
        if (v < best_v[i]) {
          best_v[i] = v;
          best_i[i] = int32_t(col);
        }
      }
    }
  }
  // the 16 threads of a row (tx = 0..15 share a half-warp): lowest index on ties
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const double v = __shfl_xor_sync(0xffffffffu, best_v[i], o);
      const int32_t ix = __shfl_xor_sync(0xffffffffu, best_i[i], o);
      if (v < best_v[i] || (v == best_v[i] && ix < best_i[i])) {
        best_v[i] = v;
        best_i[i] = ix;
      }
    }
    const int64_t n = m0 + ty + 16 * i;
    if (tx == 0 && n < N) {
      part_val[s * N + n] = best_v[i];
      part_idx[s * N + n] = best_i[i];
    }
  }
}

__global__ void __launch_bounds__(256) finalize_f64_kernel(
    const double* __restrict__ z, int64_t ldz, int64_t N, int64_t d, int splits,
    const double* __restrict__ part_val, const int32_t* __restrict__ part_idx,
    int64_t* __restrict__ idx, double* __restrict__ dist) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  double zn = 0.0;
  for (int64_t j = 0; j < d; ++j) zn = fma(z[n * ldz + j], z[n * ldz + j], zn);
  double bv = part_val[n];
  int32_t bi = part_idx[n];
  for (int sp = 1; sp < splits; ++sp) {
    const double v = part_val[int64_t(sp) * N + n];
    const int32_t i = part_idx[int64_t(sp) * N + n];
    if (v < bv || (v == bv && i < bi)) {
      bv = v;
      bi = i;
    }
  }
  idx[n] = bi == INT_MAX ? 0 : bi;
  const double r = zn + bv;
  dist[n] = r > 0.0 ? r : 0.0;
}

template <typename T>
__global__ void __launch_bounds__(kThr) project_simt_kernel(
    const T* __restrict__ basis, int64_t ldb, const T* __restrict__ weight, int64_t ldw,
    int64_t K, int64_t d, int64_t r, const T* __restrict__ bias, T* __restrict__ q,
    int64_t ldq) {
  __shared__ T As[kT][kKc + 1], Bs[kT][kKc + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = int64_t(blockIdx.x) * kT, n0 = int64_t(blockIdx.y) * kT;
  T acc[4][4] = {};
  for (int64_t k0 = 0; k0 < r; k0 += kKc)
    simt_chunk<T>(As, Bs, basis, ldb, m0, K, weight, ldw, n0, d, k0, r, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = m0 + ty + 16 * i, c = n0 + tx + 16 * j;
      if (k < K && c < ldq) q[k * ldq + c] = c < d ? acc[i][j] + (bias != nullptr ? bias[c] : T(0)) : T(0);
    }
}

}  // namespace kernels

using namespace kernels;

cudaError_t launch_search_f64(const double* z, int64_t ldz, const double* cb, int64_t ldc,
                              int64_t N, int64_t K, int64_t d, double* qn, int splits,
                              int64_t codes_per_split, double* part_val, int32_t* part_idx,
                              int64_t* idx, double* dist, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  norms_f64_kernel<<<unsigned((K + 255) / 256), 256, 0, stream>>>(cb, K, d, ldc, qn);
  search_f64_kernel<<<dim3(unsigned((N + kT - 1) / kT), unsigned(splits)), dim3(16, 16), 0,
                      stream>>>(z, ldz, cb, ldc, qn, N, K, d, codes_per_split, part_val,
                                part_idx);
  finalize_f64_kernel<<<unsigned((N + 255) / 256), 256, 0, stream>>>(
      z, ldz, N, d, splits, part_val, part_idx, idx, dist);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_project_simt(const T* basis, int64_t ldb, const T* weight, int64_t ldw,
                                int64_t K, int64_t d, int64_t r, const T* bias, T* q,
                                int64_t ldq, cudaStream_t stream) {
  if (K == 0 || ldq == 0) return cudaSuccess;
  project_simt_kernel<T><<<dim3(unsigned((K + kT - 1) / kT), unsigned((ldq + kT - 1) / kT)),
                           dim3(16, 16), 0, stream>>>(basis, ldb, weight, ldw, K, d, r, bias, q,
                                                      ldq);
  return cudaGetLastError();
}

cudaError_t launch_project_f64(const double* basis, int64_t ldb, const double* weight,
                               int64_t ldw, int64_t K, int64_t d, int64_t r,
                               const double* bias, double* q, int64_t ldq,
                               cudaStream_t stream) {
  return launch_project_simt<double>(basis, ldb, weight, ldw, K, d, r, bias, q, ldq, stream);
}

cudaError_t launch_project_f32(const float* basis, int64_t ldb, const float* weight,
                               int64_t ldw, int64_t K, int64_t d, int64_t r, const float* bias,
                               float* q, int64_t ldq, cudaStream_t stream) {
  return launch_project_simt<float>(basis, ldb, weight, ldw, K, d, r, bias, q, ldq, stream);
}

}  // namespace cuda
}  // namespace simvq
