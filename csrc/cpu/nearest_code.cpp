// simvq-kernels: fused nearest-code search, SimVQ quantize and its backward on CPU.
//
// Forward: for each token z_n find argmin_k ||z_n - Q_k||^2 without building the
// N x K distance matrix. Work is cut into tiles of BLOCK_N tokens x BLOCK_K codes;
// each tile's -2 z.Q^T is one cache-resident single-threaded sgemm into a per-thread
// buffer, and the buffer is reduced into a running (min, argmin) per token before the
// next tile overwrites it. Only ||Q_k||^2 - 2 z.Q_k is compared (||z||^2 is constant
// per token) and ||z||^2 is added once at the end for the returned distance.
//
// Determinism: the tiling depends on N and K only, never on the thread count, so
// every tile's sgemm has the same shape and inputs on every run. Threads take whole
// token tiles; when there are too few token tiles to fill the threads, the code range
// is split at tile boundaries and the partial results are merged in code order with a
// strict '<', so the lowest index wins ties exactly as a sequential scan would.
//
// Backward: grad_weight = grad_zq^T @ basis[indices] is a gather-GEMM over chunks of
// tokens (memory O(chunk * r)), grad_bias = sum_n grad_zq; no K x d buffer, no atomics.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <limits>
#include <vector>

#include "../simvq.h"

// The BLAS that torch links (MKL on x86-64 wheels) exports the Fortran gemm symbols.
// They are declared weak: where a torch build does not export them, the tile product
// falls back to ATen's addmm on the same tiles (same tiling, more call overhead).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace simvq {
namespace {

bool have_fortran_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Row-major tile[i][j] = alpha * a[i] . b[j] for a (m x k, row stride k) and
// b (n x k, row stride k); tile row stride ldc. In BLAS's column-major terms this is
// C' (n x m) = alpha * op(B') * op(A') with B' = b^T stored as (k x n).
void tile_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, const float* b,
               float* c, int64_t ldc) {
  const int M = int(n), Nn = int(m), Kk = int(k), lda = int(k), ldb = int(k), ldc_ = int(ldc);
  const float beta = 0.f;
  sgemm_("T", "N", &M, &Nn, &Kk, &alpha, b, &lda, a, &ldb, &beta, c, &ldc_);
}
void tile_gemm(int64_t m, int64_t n, int64_t k, double alpha, const double* a,
               const double* b, double* c, int64_t ldc) {
  const int M = int(n), Nn = int(m), Kk = int(k), lda = int(k), ldb = int(k), ldc_ = int(ldc);
  const double beta = 0.;
  dgemm_("T", "N", &M, &Nn, &Kk, &alpha, b, &lda, a, &ldb, &beta, c, &ldc_);
}
template <typename T>
void tile_gemm_aten(int64_t m, int64_t n, int64_t k, T alpha, const T* a, const T* b, T* c,
                    int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor A = at::from_blob(const_cast<T*>(a), {m, k}, opts);
  at::Tensor B = at::from_blob(const_cast<T*>(b), {n, k}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(C, A, B.t());
  C.mul_(alpha);
}

constexpr int64_t kBlockN = 256;   // tokens per tile
constexpr int64_t kBlockK = 1024;  // codes per tile (tile buffer: 1 MiB of fp32, L2-resident)

// Row argmin of v[j] = c[j] + qn[j] over j in [0, n), lowest j on ties, split in
// two passes: row_min (a pure min reduction, cheap to vectorise) and, only when that
// min beats the token's running best from earlier tiles (rarely, after the first few
// tiles), first_equal, which finds the lowest j whose recomputed value equals it. The
// recomputation uses the same operation on the same operands, so equality is exact.
// The vector versions are picked at run time from what the processor supports.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SIMVQ_X86 1
#include <immintrin.h>
#endif

float row_min_scalar(const float* c, const float* qn, int32_t n) {
  float m = std::numeric_limits<float>::infinity();
  for (int32_t j = 0; j < n; ++j) m = std::min(m, c[j] + qn[j]);
  return m;
}

int32_t first_equal_scalar(const float* c, const float* qn, int32_t n, float m) {
  for (int32_t j = 0; j < n; ++j)
    if (c[j] + qn[j] == m) return j;
  return -1;
}

#ifdef SIMVQ_X86
__attribute__((target("avx512f"))) float row_min_avx512(const float* c, const float* qn,
                                                        int32_t n) {
  constexpr int W = 16;
  __m512 a0 = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 a1 = a0, a2 = a0, a3 = a0;
  int32_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 = _mm512_min_ps(a0, _mm512_add_ps(_mm512_loadu_ps(c + j), _mm512_loadu_ps(qn + j)));
    a1 = _mm512_min_ps(a1, _mm512_add_ps(_mm512_loadu_ps(c + j + W),
                                         _mm512_loadu_ps(qn + j + W)));
    a2 = _mm512_min_ps(a2, _mm512_add_ps(_mm512_loadu_ps(c + j + 2 * W),
                                         _mm512_loadu_ps(qn + j + 2 * W)));
    a3 = _mm512_min_ps(a3, _mm512_add_ps(_mm512_loadu_ps(c + j + 3 * W),
                                         _mm512_loadu_ps(qn + j + 3 * W)));
  }
  float m = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_min_ps(a0, a1), _mm512_min_ps(a2, a3)));
  for (; j < n; ++j) m = std::min(m, c[j] + qn[j]);
  return m;
}

__attribute__((target("avx512f"))) int32_t first_equal_avx512(const float* c,
                                                              const float* qn, int32_t n,
                                                              float m) {
  constexpr int W = 16;
  const __m512 mv = _mm512_set1_ps(m);
  int32_t j = 0;
  for (; j + W <= n; j += W) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + j), _mm512_loadu_ps(qn + j));
    const __mmask16 eq = _mm512_cmp_ps_mask(v, mv, _CMP_EQ_OQ);
    if (eq) return j + __builtin_ctz(static_cast<unsigned>(eq));
  }
  for (; j < n; ++j)
    if (c[j] + qn[j] == m) return j;
  return -1;
}

__attribute__((target("avx2"))) float row_min_avx2(const float* c, const float* qn,
                                                   int32_t n) {
  constexpr int W = 8;
  __m256 a0 = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 a1 = a0, a2 = a0, a3 = a0;
  int32_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 = _mm256_min_ps(a0, _mm256_add_ps(_mm256_loadu_ps(c + j), _mm256_loadu_ps(qn + j)));
    a1 = _mm256_min_ps(a1, _mm256_add_ps(_mm256_loadu_ps(c + j + W),
                                         _mm256_loadu_ps(qn + j + W)));
    a2 = _mm256_min_ps(a2, _mm256_add_ps(_mm256_loadu_ps(c + j + 2 * W),
                                         _mm256_loadu_ps(qn + j + 2 * W)));
    a3 = _mm256_min_ps(a3, _mm256_add_ps(_mm256_loadu_ps(c + j + 3 * W),
                                         _mm256_loadu_ps(qn + j + 3 * W)));
  }
  alignas(32) float t[W];
  _mm256_store_ps(t, _mm256_min_ps(_mm256_min_ps(a0, a1), _mm256_min_ps(a2, a3)));
  float m = std::numeric_limits<float>::infinity();
  for (int l = 0; l < W; ++l) m = std::min(m, t[l]);
  for (; j < n; ++j) m = std::min(m, c[j] + qn[j]);
  return m;
}

__attribute__((target("avx2"))) int32_t first_equal_avx2(const float* c, const float* qn,
                                                         int32_t n, float m) {
  constexpr int W = 8;
  const __m256 mv = _mm256_set1_ps(m);
  int32_t j = 0;
  for (; j + W <= n; j += W) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(c + j), _mm256_loadu_ps(qn + j));
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(v, mv, _CMP_EQ_OQ));
    if (eq) return j + __builtin_ctz(static_cast<unsigned>(eq));
  }
  for (; j < n; ++j)
    if (c[j] + qn[j] == m) return j;
  return -1;
}
#endif

struct RowArgminF32 {
  float (*row_min)(const float*, const float*, int32_t);
  int32_t (*first_equal)(const float*, const float*, int32_t, float);
};

RowArgminF32 pick_row_argmin_f32() {
#ifdef SIMVQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {row_min_avx512, first_equal_avx512};
  if (__builtin_cpu_supports("avx2")) return {row_min_avx2, first_equal_avx2};
#endif
  return {row_min_scalar, first_equal_scalar};
}

const RowArgminF32& row_argmin_f32_impl() {
  static const RowArgminF32 impl = pick_row_argmin_f32();
  return impl;
}

void row_argmin_f64(const double* c, const double* qn, int32_t n, double* best_val,
                    int32_t* best_idx) {
  double m = std::numeric_limits<double>::infinity();
  int32_t mi = std::numeric_limits<int32_t>::max();
  for (int32_t j = 0; j < n; ++j) {
    const double v = c[j] + qn[j];
    if (v < m) {
      m = v;
      mi = j;
    }
  }
  *best_val = m;
  *best_idx = mi;
}

// Folds one tile row into the running best (val, idx); strict '<' because earlier
// tiles hold lower indices.
inline void update_best(const float* c, const float* qn, int32_t n, int64_t k0, float* val,
                        int64_t* idx) {
  const RowArgminF32& f = row_argmin_f32_impl();
  const float m = f.row_min(c, qn, n);
  if (m < *val) {
    const int32_t j = f.first_equal(c, qn, n, m);
    if (j >= 0) {
      *val = m;
      *idx = k0 + j;
    }
  }
}
inline void update_best(const double* c, const double* qn, int32_t n, int64_t k0,
                        double* val, int64_t* idx) {
  double m;
  int32_t j;
  row_argmin_f64(c, qn, n, &m, &j);
  if (m < *val) {
    *val = m;
    *idx = k0 + j;
  }
}

// Scans codes [k_begin, k_end) for tokens [n_begin, n_end); writes the partial
// (min of ||Q_k||^2 - 2 z.Q_k, argmin) into val/idx at [n - n_begin].
template <typename T>
void scan_range(const T* z, const T* q, const T* qn, int64_t d, int64_t n_begin,
                int64_t n_end, int64_t k_begin, int64_t k_end, T* tile, T* val,
                int64_t* idx) {
  const int64_t bn = n_end - n_begin;
  for (int64_t i = 0; i < bn; ++i) {
    val[i] = std::numeric_limits<T>::infinity();
    idx[i] = k_begin;  // only read if every value is +inf, which finite inputs exclude
  }
  // A one-token tile would be a matrix-vector product, and BLAS's gemv computes the
  // last (bk mod 4) codes in another summation order than the others, so exact
  // duplicate codes would get different values and a later copy could win the tie.
  // Multiply two copies of the token instead: the gemm path treats every code alike.
  const T* zt = z + n_begin * d;
  int64_t bm = bn;
  std::vector<T> zpad;
  if (bn == 1) {
    zpad.resize(2 * d);
    std::copy(zt, zt + d, zpad.begin());
    std::copy(zt, zt + d, zpad.begin() + d);
    zt = zpad.data();
    bm = 2;  // the tile buffer has kBlockN >= 2 rows
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, k_end - k0);
    // tile[i][j] = -2 * z[n_begin + i] . q[k0 + j] (the scaling by 2 is exact)
    if (have_fortran_blas()) {
      tile_gemm(bm, bk, d, T(-2), zt, q + k0 * d, tile, kBlockK);
    } else {
      tile_gemm_aten<T>(bm, bk, d, T(-2), zt, q + k0 * d, tile, kBlockK);
    }
    for (int64_t i = 0; i < bn; ++i) {
      update_best(tile + i * kBlockK, qn + k0, static_cast<int32_t>(bk), k0, val + i,
                  idx + i);
    }
  }
}

template <typename T>
void nearest_code_kernel(const T* z, const T* q, int64_t N, int64_t K, int64_t d,
                         int64_t* out_idx, T* out_val) {
  // ||Q_k||^2 from the same values that enter the product, accumulated in double.
  std::vector<T> qn(K);
  at::parallel_for(0, K, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += double(q[k * d + j]) * double(q[k * d + j]);
      qn[k] = static_cast<T>(s);
    }
  });

  const int64_t n_tiles = (N + kBlockN - 1) / kBlockN;
  const int64_t k_tiles = (K + kBlockK - 1) / kBlockK;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Split the code range only when token tiles alone cannot keep every thread busy.
  int64_t splits = 1;
  if (n_tiles < 2 * threads) {
    splits = std::min<int64_t>(k_tiles, (2 * threads + n_tiles - 1) / n_tiles);
  }
  const int64_t tiles_per_split = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;

  std::vector<T> part_val(splits > 1 ? splits * N : 0);
  std::vector<int64_t> part_idx(splits > 1 ? splits * N : 0);
  const int64_t tasks = n_tiles * splits;

  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<T> tile(kBlockN * kBlockK);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t nt = t / splits, s = t % splits;
      const int64_t n0 = nt * kBlockN, n1 = std::min(N, n0 + kBlockN);
      const int64_t k0 = s * tiles_per_split * kBlockK;
      const int64_t k1 = std::min(K, k0 + tiles_per_split * kBlockK);
      T* val = splits > 1 ? part_val.data() + s * N + n0 : out_val + n0;
      int64_t* idx = splits > 1 ? part_idx.data() + s * N + n0 : out_idx + n0;
      scan_range<T>(z, q, qn.data(), d, n0, n1, k0, k1, tile.data(), val, idx);
    }
  });

  if (splits > 1) {
    at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        T v = part_val[n];
        int64_t i = part_idx[n];
        for (int64_t s = 1; s < splits; ++s) {
          if (part_val[s * N + n] < v) {  // strict: later splits hold higher indices
            v = part_val[s * N + n];
            i = part_idx[s * N + n];
          }
        }
        out_val[n] = v;
        out_idx[n] = i;
      }
    });
  }
}

// Exact duplicate codes tie exactly in exact arithmetic, but BLAS may round their
// products differently (a code's position in a tile picks the micro-kernel and its
// summation order), so a later copy could win. After the search, every pick is mapped
// to the lowest index holding a bitwise-identical row (-0.0 counted as 0.0), which is
// what 'ties go to the lowest index' means. O(K * d) hashing, no effect without
// duplicates.
template <typename T>
void remap_to_first_duplicate(const T* q, int64_t K, int64_t d, int64_t* idx, int64_t N) {
  std::vector<uint64_t> hash(K);
  at::parallel_for(0, K, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      uint64_t h = 1469598103934665603ull;
      for (int64_t j = 0; j < d; ++j) {
        T v = q[k * d + j] + T(0);  // -0.0 + 0.0 == +0.0
        uint64_t bits = 0;
        std::memcpy(&bits, &v, sizeof(T));
        h = (h ^ bits) * 1099511628211ull;
      }
      hash[k] = h;
    }
  });
  auto same = [&](int64_t a, int64_t b) {
    for (int64_t j = 0; j < d; ++j)
      if (!(q[a * d + j] == q[b * d + j])) return false;
    return true;
  };
  std::unordered_map<uint64_t, std::vector<int64_t>> reps;
  reps.reserve(K);
  std::vector<int64_t> first(K);
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    auto& list = reps[hash[k]];
    first[k] = k;
    for (int64_t r : list) {
      if (same(r, k)) {
        first[k] = r;
        any = true;
        break;
      }
    }
    if (first[k] == k) list.push_back(k);
  }
  if (!any) return;
  for (int64_t n = 0; n < N; ++n) idx[n] = first[idx[n]];
}

void check_nearest_code_args(const at::Tensor& z, const at::Tensor& codebook) {
  SIMVQ_CHECK_DIM(z, 2);
  SIMVQ_CHECK_DIM(codebook, 2);
  SIMVQ_CHECK_FLOAT(z);
  SIMVQ_CHECK_SAME_DTYPE(z, codebook);
  SIMVQ_CHECK_SAME_DEVICE(z, codebook);
  SIMVQ_CHECK(z.device().is_cpu(), "the CPU kernel got `z` on ", z.device());
  SIMVQ_CHECK(z.size(1) == codebook.size(1), "width mismatch: `z` has d=", z.size(1),
              " but `codebook` has d=", codebook.size(1));
  SIMVQ_CHECK(codebook.size(0) >= 1, "`codebook` is empty (K=0); it needs at least one code");
  SIMVQ_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - kBlockK,
              "`codebook` has K=", codebook.size(0), " codes; at most 2^31 - 1025 are supported");
}

// Search in float32 (bf16/fp16 inputs are widened exactly) or float64.
std::tuple<at::Tensor, at::Tensor> nearest_code_impl(const at::Tensor& z_in,
                                                     const at::Tensor& cb_in) {
  const auto compute = z_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor z = z_in.to(compute).contiguous();
  const at::Tensor cb = cb_in.to(compute).contiguous();
  const int64_t N = z.size(0), K = cb.size(0), d = z.size(1);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor val = at::empty({N}, z.options());
  if (N > 0) {
    if (d == 0) {  // every code is at distance 0: the lowest index wins
      idx.zero_();
      val.zero_();
    } else {
      AT_DISPATCH_SWITCH(compute, "simvq_nearest_code_cpu",
                         AT_DISPATCH_CASE(at::kFloat,
                                          [&] {
                                            nearest_code_kernel<float>(
                                                z.data_ptr<float>(), cb.data_ptr<float>(), N, K,
                                                d, idx.data_ptr<int64_t>(),
                                                val.data_ptr<float>());
                                          })
                             AT_DISPATCH_CASE(at::kDouble, [&] {
                               nearest_code_kernel<double>(
                                   z.data_ptr<double>(), cb.data_ptr<double>(), N, K, d,
                                   idx.data_ptr<int64_t>(), val.data_ptr<double>());
                             }));
      if (compute == at::kDouble) {
        remap_to_first_duplicate<double>(cb.data_ptr<double>(), K, d, idx.data_ptr<int64_t>(), N);
      } else {
        remap_to_first_duplicate<float>(cb.data_ptr<float>(), K, d, idx.data_ptr<int64_t>(), N);
      }
    }
  }
  // Returned distance: ||z||^2 (accumulated in double) + min(||Q||^2 - 2 z.Q), >= 0.
  at::Tensor zn = z.to(at::kDouble).square().sum(1);
  at::Tensor dist = (zn + val.to(at::kDouble)).clamp_min_(0).to(compute);
  return {idx, dist};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z,
                                                    const at::Tensor& codebook) {
  check_nearest_code_args(z, codebook);
  return nearest_code_impl(z, codebook);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& z, const at::Tensor& basis, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  SIMVQ_CHECK_DIM(z, 2);
  SIMVQ_CHECK_DIM(basis, 2);
  SIMVQ_CHECK_DIM(weight, 2);
  SIMVQ_CHECK_FLOAT(z);
  SIMVQ_CHECK_SAME_DTYPE(z, basis);
  SIMVQ_CHECK_SAME_DTYPE(z, weight);
  SIMVQ_CHECK_SAME_DEVICE(z, basis);
  SIMVQ_CHECK_SAME_DEVICE(z, weight);
  SIMVQ_CHECK(z.device().is_cpu(), "the CPU kernel got `z` on ", z.device());
  SIMVQ_CHECK(weight.size(0) == z.size(1), "`weight` must be (d, r) with d=", z.size(1),
              " (the width of `z`), got shape ", weight.sizes());
  SIMVQ_CHECK(weight.size(1) == basis.size(1), "`weight` must be (d, r) with r=",
              basis.size(1), " (the width of `basis`), got shape ", weight.sizes());
  SIMVQ_CHECK(basis.size(0) >= 1, "`basis` is empty (K=0); it needs at least one code");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    SIMVQ_CHECK_DIM(b, 1);
    SIMVQ_CHECK_SAME_DTYPE(z, b);
    SIMVQ_CHECK_SAME_DEVICE(z, b);
    SIMVQ_CHECK(b.size(0) == z.size(1), "`bias` must have d=", z.size(1),
                " elements, got ", b.size(0));
  }
  const auto compute = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The implicit codebook, K x d (the size of the codebook itself, never N x K),
  // projected in the compute precision so low-precision inputs are not rounded twice.
  // With d = 1 the product would be a gemv over the basis rows, which rounds the last
  // (K mod 4) rows differently, so identical basis rows would give different codes:
  // project two copies of the weight row (gemm path) and keep the first column.
  at::Tensor w = weight.to(compute);
  at::Tensor b = bias.has_value() ? bias->to(compute) : at::Tensor();
  const bool pad = w.size(0) == 1;
  if (pad) {
    w = at::cat({w, w});
    if (b.defined()) b = at::cat({b, b});
  }
  at::Tensor codebook = b.defined() ? at::addmm(b, basis.to(compute), w.t())
                                    : at::mm(basis.to(compute), w.t());
  if (pad) codebook = codebook.slice(1, 0, 1).contiguous();
  auto [idx, dist] = nearest_code_impl(z, codebook);
  at::Tensor zq = codebook.index_select(0, idx).to(z.scalar_type());
  return {zq, idx, dist};
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cpu(const at::Tensor& grad_zq,
                                                         const at::Tensor& basis,
                                                         const at::Tensor& indices,
                                                         const at::Tensor& weight) {
  SIMVQ_CHECK_DIM(grad_zq, 2);
  SIMVQ_CHECK_DIM(basis, 2);
  SIMVQ_CHECK_DIM(indices, 1);
  SIMVQ_CHECK(indices.scalar_type() == at::kLong, "`indices` must be int64, got ",
              indices.scalar_type());
  SIMVQ_CHECK(indices.size(0) == grad_zq.size(0), "`indices` has ", indices.size(0),
              " entries but `grad_zq` has ", grad_zq.size(0), " rows");
  SIMVQ_CHECK(weight.size(0) == grad_zq.size(1) && weight.size(1) == basis.size(1),
              "`weight` must be (d, r) = (", grad_zq.size(1), ", ", basis.size(1),
              "), got ", weight.sizes());
  const auto compute = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_zq.to(compute).contiguous();
  const at::Tensor B = basis.to(compute).contiguous();
  const int64_t N = g.size(0), d = g.size(1), r = B.size(1);
  at::Tensor dW = at::zeros({d, r}, g.options());
  // Gather-GEMM in token chunks: memory O(chunk * r), sequential and deterministic.
  constexpr int64_t kChunk = 8192;
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    const int64_t n1 = std::min(N, n0 + kChunk);
    at::Tensor rows = B.index_select(0, indices.slice(0, n0, n1));
    dW.addmm_(g.slice(0, n0, n1).t(), rows);
  }
  at::Tensor db = g.sum(0);
  return {dW.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace simvq

TORCH_LIBRARY_IMPL(simvq, CPU, m) {
  m.impl("nearest_code", &simvq::nearest_code_cpu);
  m.impl("quantize", &simvq::quantize_cpu);
  m.impl("quantize_backward", &simvq::quantize_backward_cpu);
}
