// simvq-kernels: fused nearest-code search, SimVQ quantize and its backward on CPU.
//
// Forward: for each token z_n find argmin_k ||z_n - Q_k||^2 without building the
// N x K distance matrix. Only ||Q_k||^2 - 2 z.Q_k is compared (||z||^2 is constant per
// token) and ||z||^2 is added once at the end for the returned distance. Two paths,
// picked from the dtype and the CPU's instruction set (cpu_config.h; both forcible):
//  - float32 on AVX-512 / AVX2, any d: a register-blocked GEMM with the argmin as its
//    epilogue (32 tokens in lanes x 14 broadcast codes per block on AVX-512, 16 x 6 on
//    AVX2) over packed code panels; the products never leave the registers and no BLAS is called, so the
//    speed does not depend on which kernel a BLAS picks for the CPU
//    (nearest_code_blocked);
//  - float64, or the scalar ISA: tiles of tile_n tokens x tile_k codes, each tile's
//    -2 z.Q^T computed into a per-thread buffer by fma_rows (fma_rows.h: one FMA chain
//    per value in dimension order, no BLAS), reduced into a running (min, argmin) per
//    token before the next tile overwrites it (nearest_code_kernel). The first tile of a token's code range is reduced in one
//    pass (a per-lane argmin); later tiles use the two-pass scheme below.
// Tiles are chosen at run time from the L2 share of a core.
//
// Determinism: the tiling depends on N, K, d and the configuration (ISA, tile) only,
// never on the thread count, so every value is computed with the same operations on
// every run. Threads take whole token tiles, each the next one from a shared counter
// when it finishes one (parallel_tasks: a thread slowed by the machine takes fewer, and
// which thread runs a tile does not change its values); when there are too few token
// tiles to fill the threads, the code range is split at tile boundaries and the partial
// results are merged in code order with a strict '<', so the lowest index wins ties exactly as a
// sequential scan would. ||z||^2 and the returned distance are computed in the same
// task, while the tile's tokens are in cache. Every (token, code) value is formed by the
// same operations wherever the code sits, so exact duplicate codes (-0.0 equal to 0.0)
// tie exactly and the lowest index wins: no per-call pass over the codebook remaps
// duplicates (one did while tile products were BLAS calls; it cost up to 2% of a call).
//
// quantize projects the codebook (basis @ weight^T + bias) with fma_rows too.
//
// Backward: grad_weight = grad_zq^T @ basis[indices] is a gather-GEMM over fixed chunks
// of tokens (fma_rows gathering the basis rows through the indices into small packed
// panels, 128 tokens at a time), grad_bias = sum_n grad_zq over the same token blocks;
// no K x d buffer, no atomics, no BLAS, and the same bits for any CPU, ISA and thread
// count (chunk partials of fixed shapes, added in chunk order).
//
// No path of this file calls a BLAS: a BLAS picks its kernel by CPU vendor, ISA, thread
// count and buffer alignment, so it could not carry the determinism promise.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <limits>
#include <vector>

#include "../simvq.h"
#include "cpu_config.h"
#include "fma_rows.h"

namespace simvq {
namespace {

using cpu::Isa;

// K is limited so that code positions padded to whole blocks still fit in int32.
constexpr int64_t kMaxCodesPad = 1024;

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
// _mm512_min_ps with a zero pass-through (GCC's form reads an undefined vector, which
// -Wmaybe-uninitialized reports): x < m ? x : m, so m when x is NaN or equal
__attribute__((target("avx512f"))) inline __m512 min16(__m512 x, __m512 m) {
  return _mm512_maskz_min_ps(__mmask16(0xFFFF), x, m);
}

__attribute__((target("avx512f"))) float row_min_avx512(const float* c, const float* qn,
                                                        int32_t n) {
  constexpr int W = 16;
  __m512 a0 = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 a1 = a0, a2 = a0, a3 = a0;
  int32_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 = min16(a0, _mm512_add_ps(_mm512_loadu_ps(c + j), _mm512_loadu_ps(qn + j)));
    a1 = min16(a1, _mm512_add_ps(_mm512_loadu_ps(c + j + W),
                                         _mm512_loadu_ps(qn + j + W)));
    a2 = min16(a2, _mm512_add_ps(_mm512_loadu_ps(c + j + 2 * W),
                                         _mm512_loadu_ps(qn + j + 2 * W)));
    a3 = min16(a3, _mm512_add_ps(_mm512_loadu_ps(c + j + 3 * W),
                                         _mm512_loadu_ps(qn + j + 3 * W)));
  }
  float m = _mm512_reduce_min_ps(min16(min16(a0, a1), min16(a2, a3)));
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

// One-pass argmin (value and lowest index), used for a token's first tile, where the
// running best is +inf and the two-pass scheme would always run its second pass. Each
// vector lane keeps its own (min, index) with a strict '<' (so the earliest position in
// the lane wins), and lanes are merged by value, then by lowest index.
void row_argmin_scalar(const float* c, const float* qn, int32_t n, float* m_out,
                       int32_t* j_out) {
  float m = std::numeric_limits<float>::infinity();
  int32_t mj = 0;
  for (int32_t j = 0; j < n; ++j) {
    const float v = c[j] + qn[j];
    if (v < m) {
      m = v;
      mj = j;
    }
  }
  *m_out = m;
  *j_out = mj;
}

#ifdef SIMVQ_X86
__attribute__((target("avx512f"))) void row_argmin_avx512(const float* c, const float* qn,
                                                         int32_t n, float* m_out,
                                                         int32_t* j_out) {
  constexpr int W = 16;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  // two accumulators over alternating vectors: a holds positions j, b positions j + W
  __m512 ba = inf, bb = inf;
  __m512i ia = _mm512_setzero_si512(), ib = _mm512_setzero_si512();
  __m512i pa = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i pb = _mm512_add_epi32(pa, _mm512_set1_epi32(W));
  const __m512i step = _mm512_set1_epi32(2 * W);
  int32_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const __m512 va = _mm512_add_ps(_mm512_loadu_ps(c + j), _mm512_loadu_ps(qn + j));
    const __m512 vb = _mm512_add_ps(_mm512_loadu_ps(c + j + W), _mm512_loadu_ps(qn + j + W));
    const __mmask16 la = _mm512_cmp_ps_mask(va, ba, _CMP_LT_OQ);
    const __mmask16 lb = _mm512_cmp_ps_mask(vb, bb, _CMP_LT_OQ);
    ba = _mm512_mask_mov_ps(ba, la, va);
    ia = _mm512_mask_mov_epi32(ia, la, pa);
    bb = _mm512_mask_mov_ps(bb, lb, vb);
    ib = _mm512_mask_mov_epi32(ib, lb, pb);
    pa = _mm512_add_epi32(pa, step);
    pb = _mm512_add_epi32(pb, step);
  }
  // merge b into a: take b's lane if its value is lower, or equal with a lower index
  const __mmask16 take = _mm512_cmp_ps_mask(bb, ba, _CMP_LT_OQ) |
                         (_mm512_cmp_ps_mask(bb, ba, _CMP_EQ_OQ) &
                          _mm512_cmplt_epi32_mask(ib, ia));
  ba = _mm512_mask_mov_ps(ba, take, bb);
  ia = _mm512_mask_mov_epi32(ia, take, ib);
  float m = _mm512_reduce_min_ps(ba);
  int32_t mj = 0;
  if (m < std::numeric_limits<float>::infinity()) {
    const __mmask16 eq = _mm512_cmp_ps_mask(ba, _mm512_set1_ps(m), _CMP_EQ_OQ);
    mj = _mm512_mask_reduce_min_epi32(eq, ia);
  }
  for (; j < n; ++j) {  // tail: higher positions than every vector lane, so strict '<'
    const float v = c[j] + qn[j];
    if (v < m) {
      m = v;
      mj = j;
    }
  }
  *m_out = m;
  *j_out = mj;
}

// Groups of 32 values (4 vectors): the common path only folds the group's lane-wise
// minimum into a running per-lane minimum and remembers, per lane, the last group
// where that minimum strictly improved (no branch, no per-element index blend). At the
// end, the lanes holding the overall minimum m point to the first group where each of
// them reached m; the lowest position holding m in those groups is the answer (the
// values are recomputed with the same operation, so equality is exact).
__attribute__((target("avx2"))) void row_argmin_avx2(const float* c, const float* qn,
                                                    int32_t n, float* m_out, int32_t* j_out) {
  constexpr int W = 8, G = 4 * W;
  const float inf = std::numeric_limits<float>::infinity();
  __m256 run = _mm256_set1_ps(inf);
  __m256i grp = _mm256_setzero_si256(), gpos = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  int32_t j = 0;
  for (; j + G <= n; j += G) {
    const __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(c + j), _mm256_loadu_ps(qn + j));
    const __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(c + j + W), _mm256_loadu_ps(qn + j + W));
    const __m256 v2 =
        _mm256_add_ps(_mm256_loadu_ps(c + j + 2 * W), _mm256_loadu_ps(qn + j + 2 * W));
    const __m256 v3 =
        _mm256_add_ps(_mm256_loadu_ps(c + j + 3 * W), _mm256_loadu_ps(qn + j + 3 * W));
    const __m256 m = _mm256_min_ps(_mm256_min_ps(v0, v1), _mm256_min_ps(v2, v3));
    const __m256 lt = _mm256_cmp_ps(m, run, _CMP_LT_OQ);
    run = _mm256_min_ps(run, m);
    grp = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(grp), _mm256_castsi256_ps(gpos), lt));
    gpos = _mm256_add_epi32(gpos, one);
  }
  alignas(32) float rv[W];
  alignas(32) int32_t rg[W];
  _mm256_store_ps(rv, run);
  _mm256_store_si256(reinterpret_cast<__m256i*>(rg), grp);
  float m = inf;
  for (int l = 0; l < W; ++l) m = std::min(m, rv[l]);
  int32_t mj = 0;
  if (m < inf) {
    mj = std::numeric_limits<int32_t>::max();
    for (int l = 0; l < W; ++l) {
      if (rv[l] != m) continue;
      for (int u = 0; u < 4; ++u) {  // the lane's first position holding m in its group
        const int32_t p = rg[l] * G + u * W + l;
        if (c[p] + qn[p] == m) {
          mj = std::min(mj, p);
          break;
        }
      }
    }
  }
  for (; j < n; ++j) {  // tail: higher positions than every group, so strict '<'
    const float v = c[j] + qn[j];
    if (v < m) {
      m = v;
      mj = j;
    }
  }
  *m_out = m;
  *j_out = mj;
}
#endif

struct RowArgminF32 {
  float (*row_min)(const float*, const float*, int32_t);
  int32_t (*first_equal)(const float*, const float*, int32_t, float);
  void (*row_argmin)(const float*, const float*, int32_t, float*, int32_t*);
};

// The argmin code for an ISA (cpu::config() has checked that the CPU supports it).
RowArgminF32 row_argmin_f32_for(Isa isa) {
#ifdef SIMVQ_X86
  if (isa == Isa::kAvx512) return {row_min_avx512, first_equal_avx512, row_argmin_avx512};
  if (isa == Isa::kAvx2) return {row_min_avx2, first_equal_avx2, row_argmin_avx2};
#endif
  (void)isa;
  return {row_min_scalar, first_equal_scalar, row_argmin_scalar};
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
inline void update_best(const RowArgminF32& f, const float* c, const float* qn, int32_t n,
                        int64_t k0, float* val, int64_t* idx) {
  if (!(*val < std::numeric_limits<float>::infinity())) {  // first tile: one pass
    float m;
    int32_t j;
    f.row_argmin(c, qn, n, &m, &j);
    if (m < *val) {
      *val = m;
      *idx = k0 + j;
    }
    return;
  }
  const float m = f.row_min(c, qn, n);
  if (m < *val) {
    const int32_t j = f.first_equal(c, qn, n, m);
    if (j >= 0) {
      *val = m;
      *idx = k0 + j;
    }
  }
}
inline void update_best(const RowArgminF32&, const double* c, const double* qn, int32_t n,
                        int64_t k0, double* val, int64_t* idx) {
  double m;
  int32_t j;
  row_argmin_f64(c, qn, n, &m, &j);
  if (m < *val) {
    *val = m;
    *idx = k0 + j;
  }
}

// A per-thread buffer (at least `elems` values; one per Slot), allocated once per thread
// and reused by every call (grown if a call needs more); never zero-filled, since every
// element read was written first (by the tile's gemm, or by pack_token_tile).
template <typename T, int Slot = 0>
T* thread_buffer(int64_t elems) {
  // 64-byte aligned, so that vector loads of whole rows never split across cache lines
  constexpr int64_t kAlign = 64 / sizeof(T);
  thread_local std::unique_ptr<T[]> buf;
  thread_local int64_t size = 0;
  if (size < elems) {
    buf.reset(new T[elems + kAlign]);
    size = elems;
  }
  const auto addr = reinterpret_cast<std::uintptr_t>(buf.get());
  return reinterpret_cast<T*>((addr + 63) & ~std::uintptr_t(63));
}
template <typename T>
T* thread_tile(int64_t elems) {
  return thread_buffer<T, 1>(elems);
}

// Runs f(t) for every t in [0, n) on the intra-op threads, each thread taking the next
// task from a shared counter as it finishes one: a thread slowed by the machine (another
// process, a shared core, a slower core) takes fewer tasks instead of holding the others
// up at the end (a static split gives every thread n / threads of them). Which thread
// runs a task does not change what the task computes, so results stay the same bits.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) f(t);
    });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed))
      f(t);
  });
}

// ||z_n||^2 accumulated in double, in four interleaved partial sums (a fixed order, so
// the same bits every time; one running sum would be a chain of dependent adds). For
// float32 on a CPU with AVX2 the four sums are the lanes of one vector: the squares of
// float32 values are exact in double, so fma(x, x, s) = s + x * x and the bits are the
// same as the scalar loop's.
#ifdef SIMVQ_X86
__attribute__((target("avx2,fma"))) double sq_norm_f32_avx2(const float* x, int64_t d) {
  __m256d acc = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
    acc = _mm256_fmadd_pd(v, v, acc);
  }
  alignas(32) double s[4];
  _mm256_store_pd(s, acc);
  for (; j < d; ++j) s[0] += double(x[j]) * double(x[j]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}
const bool kHaveAvx2Fma = cpu::cpu_supports(Isa::kAvx2);
#endif
// The scalar order of sq_norm for d elements `stride` apart (a channel-first token).
template <typename T>
double sq_norm_strided(const T* x, int64_t d, int64_t stride) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    const T* v = x + j * stride;
    s0 += double(v[0]) * double(v[0]);
    s1 += double(v[stride]) * double(v[stride]);
    s2 += double(v[2 * stride]) * double(v[2 * stride]);
    s3 += double(v[3 * stride]) * double(v[3 * stride]);
  }
  for (; j < d; ++j) s0 += double(x[j * stride]) * double(x[j * stride]);
  return (s0 + s1) + (s2 + s3);
}
template <typename T>
double sq_norm(const T* x, int64_t d) {
#ifdef SIMVQ_X86
  if constexpr (std::is_same_v<T, float>) {
    if (kHaveAvx2Fma) return sq_norm_f32_avx2(x, d);
  }
#endif
  return sq_norm_strided(x, d, 1);
}

// Tokens in z's layout: channel-last (T = 0), element (n, j) at n d + j; or
// channel-first (B, d, T), element (n, j) at (b d + j) T + t with n = b T + t.
struct TokenLayout {
  int64_t d, T;
  bool channel_first() const { return T > 0; }
  int64_t offset(int64_t n) const { return T > 0 ? (n / T) * d * T + n % T : n * d; }
  int64_t stride() const { return T > 0 ? T : 1; }  // between a token's elements
};

// ||z_n||^2 for token n of either layout, in sq_norm's order (the AVX2 form gives the
// scalar form's bits: the squares of float32 values are exact in double).
template <typename T>
double token_sq_norm(const T* z, const TokenLayout& lay, int64_t n) {
  const T* x = z + lay.offset(n);
  return lay.channel_first() ? sq_norm_strided(x, lay.d, lay.stride()) : sq_norm(x, lay.d);
}

// Scans codes [k_begin, k_end) for tokens [n_begin, n_end); writes the partial
// (min of ||Q_k||^2 - 2 z.Q_k, argmin) into val/idx at [n - n_begin].
// The tile buffer has n_end - n_begin rows of tile_k values; qt holds d x tile_k values
// and `zeros` tile_k zeros. Each code tile is packed transposed and scaled by -2 (exact)
// into qt, and tile[i][j] = ||Q_k||^2 + sum_t z[n_begin + i][t] * (-2 q[k][t]) (k = k0 + j)
// is one FMA chain in t order starting from ||Q_k||^2 (fma_rows): the very operations of
// the register-blocked path, so every ISA gives the same values, every code position
// the same bits (exact duplicate codes tie exactly and the lowest index wins).
template <typename T>
void scan_range(const RowArgminF32& f, Isa isa, int64_t tile_k, const T* z, const T* q,
                const T* qn, const T* zeros, int64_t d, int64_t n_begin, int64_t n_end,
                int64_t k_begin, int64_t k_end, T* tile, T* qt, T* val, int64_t* idx) {
  const int64_t bn = n_end - n_begin;
  for (int64_t i = 0; i < bn; ++i) {
    val[i] = std::numeric_limits<T>::infinity();
    idx[i] = k_begin;  // only read if every value is +inf, which finite inputs exclude
  }
  const T* zt = z + n_begin * d;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += tile_k) {
    const int64_t bk = std::min(tile_k, k_end - k0);
    for (int64_t j = 0; j < bk; ++j) {
      const T* row = q + (k0 + j) * d;
      for (int64_t t = 0; t < d; ++t) qt[t * bk + j] = T(-2) * row[t];
    }
    cpu::fma_rows<T>(isa, bn, bk, d, zt, d, 1, qt, bk, nullptr, qn + k0, tile, tile_k);
    for (int64_t i = 0; i < bn; ++i) {  // the norms are in the values already
      update_best(f, tile + i * tile_k, zeros, static_cast<int32_t>(bk), k0, val + i, idx + i);
    }
  }
}

// Returned distance: ||z||^2 (accumulated in double) + min(||Q||^2 - 2 z.Q), >= 0.
template <typename T>
T final_distance(double z_sq_norm, T partial) {
  return static_cast<T>(std::max(0.0, z_sq_norm + double(partial)));
}
template <typename T>
T final_distance(const T* zrow, int64_t d, T partial) {
  return final_distance(sq_norm(zrow, d), partial);
}

// Splits the code range (`units` code tiles or passes) only when the token tiles alone
// cannot keep every thread busy: `count` splits of `per_split` units each. The thread
// count only decides where the range is split; the splits are merged in code order
// (merge_splits), so the result does not depend on it.
struct CodeSplits {
  int64_t count, per_split;
};
CodeSplits split_code_range(int64_t n_tiles, int64_t units) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t count = 1;
  if (n_tiles < 2 * threads) count = std::min<int64_t>(units, (2 * threads + n_tiles - 1) / n_tiles);
  const int64_t per_split = (units + count - 1) / count;
  return {(units + per_split - 1) / per_split, per_split};
}

// Merges per-split partial results (split s of the code range at part_*[s * N + n]) in
// code order with a strict '<' (later splits hold higher indices, so ties keep the
// lower one) and writes the final index and distance of every token.
template <typename T>
void merge_splits(const T* z, const TokenLayout& lay, int64_t N, int64_t splits,
                  const T* part_val, const int64_t* part_idx, int64_t* out_idx, T* out_val) {
  at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      T v = part_val[n];
      int64_t i = part_idx[n];
      for (int64_t s = 1; s < splits; ++s) {
        if (part_val[s * N + n] < v) {
          v = part_val[s * N + n];
          i = part_idx[s * N + n];
        }
      }
      out_val[n] = final_distance(token_sq_norm(z, lay, n), v);
      out_idx[n] = i;
    }
  });
}

// ------------------------------------------------- register-blocked fused search
// float32 on AVX-512 / AVX2 (any d): the tile product is not a BLAS call but a
// register-blocked kernel whose output never leaves the registers. Tokens sit in the
// vector lanes and codes are broadcast: each task's tokens are packed into blocks of MR
// (two vectors), dimension-major, and the codebook once per call into panels of NR
// codes, dimension-major and scaled by -2 (exact), with ||Q||^2 beside them (+inf for
// padding codes). For a block and one panel, MR x NR accumulators start at ||Q||^2 and
// take v = ||Q||^2 + sum_j z_j (-2 Q_j) as FMAs in j order. Each token's running
// (min, position) lives in its lane of two vectors for the whole code tile (registers,
// or a stack slot where the compiler spills one: a load and a store per panel), so the
// epilogue is a vertical min over the panel's NR codes per vector (one op per
// accumulator) and a strict '<' against the running min (seeded with the token's best
// from earlier code tiles); only when some lane improved does it look for the lowest
// code of the panel equal to the new min in those lanes. So each token gets the lowest
// code among equal values, as a scan in code order would. A block streams the packed codes of one code tile (sized to stay in L2:
// NR floats per step, broadcast) while its tokens stay in L1.
//
// Every (token, code) value is formed by the same operations in the same order wherever
// it sits (tile, panel, lane, task), so exact duplicate codes get identical values and
// the result depends on neither the thread count nor the tile; the AVX2 kernel runs the
// same FMAs on 8-lane vectors, so both ISAs give the same values bit for bit. (It
// replaced a layout of 12 broadcast tokens x 32 codes in lanes, 5-12% slower at K >=
// 8192: its code stream was 2.3x wider and its running minima went through memory after
// every panel.) No BLAS is called, so the speed does not depend on which kernel a BLAS
// picks for the CPU (MKL runs its AVX2 code on AMD processors that have AVX-512).
//
// Memory: the packed codebook (K x d floats, rounded up to whole panels) per call; per
// thread, the task's packed tokens (tile_n x d floats, rounded up to whole blocks).
#ifdef SIMVQ_X86
constexpr int kMr512 = 32, kNr512 = 14;  // 28 accumulators + 2 token vectors + 1 broadcast
constexpr int kMr256 = 16, kNr256 = 6;   // 12 accumulators + 2 token vectors + 1 broadcast
// The packed codes are read as one sequential stream from L2; each step prefetches the
// line this many steps ahead into L1 (a prefetch past the end is harmless).
constexpr int kPrefetchAhead = 8;

// dst[p][j][l] = -2 q[k0 + p NR + l][j] for the panels covering codes [k0, k0 + bk), and
// qdst[k] = ||Q_k0+k||^2 (sq_norm, as every path computes it) while the row is in cache;
// padding codes are 0 with ||Q||^2 = +inf, so they never win.
void pack_code_tile(const float* q, int64_t d, int64_t k0, int64_t bk, int nr, float* dst,
                    float* qdst) {
  const int64_t panels = (bk + nr - 1) / nr;
  for (int64_t p = 0; p < panels; ++p) {
    float* pd = dst + p * nr * d;
    for (int l = 0; l < nr; ++l) {
      const int64_t k = p * nr + l;
      if (k < bk) {
        const float* row = q + (k0 + k) * d;
        for (int64_t j = 0; j < d; ++j) pd[j * nr + l] = -2.f * row[j];
        qdst[k] = static_cast<float>(sq_norm(row, d));
      } else {
        for (int64_t j = 0; j < d; ++j) pd[j * nr + l] = 0.f;
        qdst[k] = std::numeric_limits<float>::infinity();
      }
    }
  }
}

// dst[b][j][r] = element j of token n0 + b MR + r for tokens [n0, n1) (either layout);
// rows past n1 repeat the block's first token (their results are dropped). Channel-first,
// a block's tokens are consecutive elements of each dimension's row (a straight copy
// unless the block crosses into the next batch item).
void pack_token_tile(const float* z, const TokenLayout& lay, int64_t n0, int64_t n1, int mr,
                     float* dst) {
  const int64_t d = lay.d, blocks = (n1 - n0 + mr - 1) / mr, stride = lay.stride();
  const float* rows[32];
  TORCH_INTERNAL_ASSERT(mr <= 32, "pack_token_tile: block of ", mr, " rows");
  for (int64_t b = 0; b < blocks; ++b) {
    float* bd = dst + b * mr * d;
    for (int r = 0; r < mr; ++r) {
      const int64_t n = n0 + b * mr + r;
      rows[r] = z + lay.offset(n < n1 ? n : n0 + b * mr);
    }
    for (int64_t j = 0; j < d; ++j, bd += mr)  // contiguous stores
      for (int r = 0; r < mr; ++r) bd[r] = rows[r][j * stride];
  }
}

// The block scan (block_scan_body.inc), once per ISA: AVX-512 blocks of kMr512 tokens
// against panels of kNr512 codes, AVX2 blocks of kMr256 against kNr256, the same FMAs in
// the same order per (token, code).
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
struct V {
  using reg = __m512;
  using ireg = __m512i;
  using mask = __mmask16;
  static constexpr int W = 16, NR = kNr512;
  static reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void istore(int32_t* p, ireg v) { _mm512_storeu_si512(p, v); }
  static ireg iset(int32_t k) { return _mm512_set1_epi32(k); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg min(reg x, reg m) { return min16(x, m); }
  static mask lt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static bool any(mask m) { return m != 0; }
  static mask eq_where(mask m, reg a, reg b) { return _mm512_mask_cmp_ps_mask(m, a, b, _CMP_EQ_OQ); }
  static ireg iblend(ireg i, mask m, int32_t k) { return _mm512_mask_mov_epi32(i, m, iset(k)); }
};
static_assert(2 * V::W == kMr512, "a block is two vectors of tokens");
#include "block_scan_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
struct V {
  using reg = __m256;
  using ireg = __m256i;
  using mask = __m256;  // all-ones lanes
  static constexpr int W = 8, NR = kNr256;
  static reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void istore(int32_t* p, ireg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static ireg iset(int32_t k) { return _mm256_set1_epi32(k); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg min(reg x, reg m) { return _mm256_min_ps(x, m); }
  static mask lt(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static bool any(mask m) { return _mm256_movemask_ps(m) != 0; }
  static mask eq_where(mask m, reg a, reg b) {
    return _mm256_and_ps(m, _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  static ireg iblend(ireg i, mask m, int32_t k) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(i), _mm256_castsi256_ps(iset(k)), m));
  }
};
static_assert(2 * V::W == kMr256, "a block is two vectors of tokens");
#include "block_scan_body.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

// Codes per tile of the register-blocked path: a set tile (SIMVQ_CPU_TILE) is rounded up
// to whole panels; the automatic one keeps the packed code tile within a quarter of the
// L2 share (it is streamed once per token block), at least 8 panels, at most 8192 codes;
// whole panels always (tiles start at panel boundaries).
int64_t blocked_tile_codes(const cpu::KernelConfig& cfg, int64_t d, int nr) {
  if (cfg.tile_from != "auto") return (cfg.tile_k + nr - 1) / nr * nr;
  const int64_t fit = cfg.l2_share / 4 / (d * int64_t(sizeof(float)));
  return std::max<int64_t>(8, std::min<int64_t>(8192, fit) / nr) * nr;
}

// The search for float32 on a vector ISA (any d). The codebook is packed once per call
// (K x d floats rounded up to whole panels); threads take whole token tiles, and the
// code range is split at code-tile boundaries only when there are too few token tiles
// (merged in code order).
void nearest_code_blocked(const cpu::KernelConfig& cfg, const float* z, const TokenLayout& lay,
                          const float* q, int64_t N, int64_t K,
                          int64_t* out_idx, float* out_val) {
  const int64_t d = lay.d;
  const bool wide = cfg.isa == Isa::kAvx512;
  const int mr = wide ? kMr512 : kMr256, nr = wide ? kNr512 : kNr256;
  auto* scan = wide ? isa_avx512::block_scan : isa_avx2::block_scan;
  const int64_t panels = (K + nr - 1) / nr;
  // 64-byte aligned (torch's CPU allocator), so that a panel starts on a cache line
  at::Tensor packed = at::empty({panels * nr * d + panels * nr}, at::kFloat);
  float* codes = packed.data_ptr<float>();
  float* norms = codes + panels * nr * d;
  at::parallel_for(0, panels, 16, [&](int64_t p0, int64_t p1) {
    pack_code_tile(q, d, p0 * nr, std::min(K, p1 * nr) - p0 * nr, nr,
                   codes + p0 * nr * d, norms + p0 * nr);
  });
  // an automatic token tile is rounded up to whole blocks
  const int64_t tile_n = cfg.tile_from == "auto" ? (cfg.tile_n + mr - 1) / mr * mr : cfg.tile_n;
  const int64_t tile_k = blocked_tile_codes(cfg, d, nr);
  const int64_t n_tiles = (N + tile_n - 1) / tile_n;
  const int64_t k_tiles = (K + tile_k - 1) / tile_k;
  const auto [splits, tiles_per_split] = split_code_range(n_tiles, k_tiles);
  std::vector<float> part_val(splits > 1 ? splits * N : 0);
  std::vector<int64_t> part_idx(splits > 1 ? splits * N : 0);

  parallel_tasks(n_tiles * splits, [&](int64_t t) {
    float* tokens = thread_buffer<float, 0>((std::min(tile_n, N) + mr - 1) / mr * mr * d);
    const int64_t nt = t / splits, sp = t % splits;
    const int64_t n0 = nt * tile_n, n1 = std::min(N, n0 + tile_n), bn = n1 - n0;
    const int64_t kb = sp * tiles_per_split * tile_k;
    const int64_t ke = std::min(K, kb + tiles_per_split * tile_k);
    float* val = splits > 1 ? part_val.data() + sp * N + n0 : out_val + n0;
    int64_t* idx = splits > 1 ? part_idx.data() + sp * N + n0 : out_idx + n0;
    for (int64_t i = 0; i < bn; ++i) {
      val[i] = std::numeric_limits<float>::infinity();
      idx[i] = kb;  // only kept if every value is +inf, which finite inputs exclude
    }
    pack_token_tile(z, lay, n0, n1, mr, tokens);
    const int64_t blocks = (bn + mr - 1) / mr;
    for (int64_t k0 = kb; k0 < ke; k0 += tile_k) {  // k0 is a multiple of nr
      const int64_t tp = (std::min(tile_k, ke - k0) + nr - 1) / nr;
      const float* tile_codes = codes + k0 * d;
      const float* tile_norms = norms + k0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int rows = int(std::min<int64_t>(mr, bn - b * mr));
        scan(tokens + b * mr * d, tile_codes, tile_norms, d, tp, k0, rows, val + b * mr,
             idx + b * mr);
      }
    }
    if (splits == 1) {  // the tile's tokens are still in cache
      for (int64_t n = n0; n < n1; ++n)
        out_val[n] = final_distance(token_sq_norm(z, lay, n), out_val[n]);
    }
  });
  if (splits > 1) merge_splits(z, lay, N, splits, part_val.data(), part_idx.data(), out_idx, out_val);
}
#endif

// ||Q_k||^2 from the same values that enter the product, accumulated in double.
template <typename T>
std::vector<T> code_norms(const T* q, int64_t K, int64_t d) {
  std::vector<T> qn(K);
  at::parallel_for(0, K, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) qn[k] = static_cast<T>(sq_norm(q + k * d, d));
  });
  return qn;
}

template <typename T>
void nearest_code_kernel(const cpu::KernelConfig& cfg, const T* z, const T* q, int64_t N,
                         int64_t K, int64_t d, int64_t* out_idx, T* out_val) {
#ifdef SIMVQ_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cfg.isa != Isa::kScalar) {  // float32 on a vector ISA: no BLAS tile products
      nearest_code_blocked(cfg, z, TokenLayout{d, 0}, q, N, K, out_idx, out_val);
      return;
    }
  }
#endif
  const std::vector<T> qn = code_norms(q, K, d);
  const int64_t tile_n = cfg.tile_n, tile_k = cfg.tile_k;
  const RowArgminF32 f = row_argmin_f32_for(cfg.isa);
  const int64_t n_tiles = (N + tile_n - 1) / tile_n;
  const int64_t k_tiles = (K + tile_k - 1) / tile_k;
  const auto [splits, tiles_per_split] = split_code_range(n_tiles, k_tiles);

  std::vector<T> part_val(splits > 1 ? splits * N : 0);
  std::vector<int64_t> part_idx(splits > 1 ? splits * N : 0);
  const std::vector<T> zeros(std::min(tile_k, K), T(0));
  const int64_t tasks = n_tiles * splits;

  parallel_tasks(tasks, [&](int64_t t) {
    T* tile = thread_tile<T>(std::min(tile_n, N) * tile_k);
    T* qt = thread_buffer<T, 2>(d * std::min(tile_k, K));
    const int64_t nt = t / splits, s = t % splits;
    const int64_t n0 = nt * tile_n, n1 = std::min(N, n0 + tile_n);
    const int64_t k0 = s * tiles_per_split * tile_k;
    const int64_t k1 = std::min(K, k0 + tiles_per_split * tile_k);
    T* val = splits > 1 ? part_val.data() + s * N + n0 : out_val + n0;
    int64_t* idx = splits > 1 ? part_idx.data() + s * N + n0 : out_idx + n0;
    scan_range<T>(f, cfg.isa, tile_k, z, q, qn.data(), zeros.data(), d, n0, n1, k0, k1,
                  tile, qt, val, idx);
    if (splits == 1) {  // the tile's tokens are still in cache
      for (int64_t n = n0; n < n1; ++n) out_val[n] = final_distance(z + n * d, d, out_val[n]);
    }
  });

  if (splits > 1) {
    merge_splits(z, TokenLayout{d, 0}, N, splits, part_val.data(), part_idx.data(), out_idx,
                 out_val);
  }
}

void check_nearest_code_args(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_code_shapes(z, codebook);
  SIMVQ_CHECK(z.device().is_cpu(), "the CPU kernel got `z` on ", z.device());
  SIMVQ_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - kMaxCodesPad,
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
  at::Tensor dist = at::empty({N}, z.options());
  if (N == 0) return {idx, dist};
  if (d == 0) {  // every code is at distance 0: the lowest index wins
    idx.zero_();
    dist.zero_();
    return {idx, dist};
  }
  const cpu::KernelConfig cfg = cpu::config();  // one snapshot per call
  AT_DISPATCH_SWITCH(compute, "simvq_nearest_code_cpu",
                     AT_DISPATCH_CASE(at::kFloat,
                                      [&] {
                                        nearest_code_kernel<float>(
                                            cfg, z.data_ptr<float>(), cb.data_ptr<float>(), N, K,
                                            d, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
                                      })
                         AT_DISPATCH_CASE(at::kDouble, [&] {
                           nearest_code_kernel<double>(
                               cfg, z.data_ptr<double>(), cb.data_ptr<double>(), N, K, d,
                               idx.data_ptr<int64_t>(), dist.data_ptr<double>());
                         }));
  return {idx, dist};
}

// grad_weight = g^T @ basis[idx] (d x r) and grad_bias = sum_n g (d), with the same bits
// on every CPU, ISA, thread count and run: the tokens are cut into fixed chunks of
// kBwdChunk (a function of N only); in a chunk, every element of the partial dW is one
// FMA chain over the chunk's tokens in order (fma_rows, gathering the basis rows through
// the indices into packed panels of 128 tokens: no N x r copy, no BLAS), and the chunk
// partials are added in double in chunk order. grad_bias is summed in double, token by
// token, per chunk likewise (fma_rows' a_sums, while the gradient rows are in cache).
// Groups of kBwdGroup chunks run in parallel, bounding the scratch memory to kBwdGroup
// partials.
constexpr int64_t kBwdChunk = 1024;
constexpr int64_t kBwdGroup = 8;
// Channel-first tokens are moved in blocks of this many tokens (move_channel_first), and
// the fused step passes them through row buffers of one block: 8 KiB per buffer at
// d = 64 in float32.
constexpr int64_t kCfBlock = 32;

template <typename T>
void chunk_grad(Isa isa, const T* g, const T* B, const int64_t* idx, int64_t n0, int64_t n1,
                int64_t d, int64_t r, T* dw, double* db) {
  const int64_t m = n1 - n0;
  const T* gc = g + n0 * d;
  // dw[j][i] = sum_n gc[n][j] * B[idx[n0 + n]][i]
  cpu::fma_rows<T>(isa, d, r, m, gc, 1, d, B, r, idx + n0, nullptr, dw, r, db);
}

// The chunked reduction of both backward kernels: tokens cut into fixed chunks of
// kBwdChunk (a function of N only); chunk_body(c, n0, n1, dw_part, db_part) fills chunk
// c's partial dW (d x r, T) and db (d, double) on one thread; groups of kBwdGroup chunks
// run in parallel, and their partials are added in double in chunk order, then scaled:
// the same bits for any thread count. Scratch: kBwdGroup partials.
template <typename T, typename Body>
void reduce_token_chunks(int64_t N, int64_t d, int64_t r, double scale, T* dw_out,
                         T* db_out, const Body& chunk_body) {
  const int64_t dr = d * r;
  std::vector<double> dw(dr, 0.0), db(d, 0.0);
  const int64_t chunks = (N + kBwdChunk - 1) / kBwdChunk;
  const int64_t group = std::min(kBwdGroup, std::max<int64_t>(chunks, 1));
  std::vector<T> part(group * dr);
  std::vector<double> part_db(group * d);
  for (int64_t c0 = 0; c0 < chunks; c0 += group) {
    const int64_t c1 = std::min(chunks, c0 + group);
    parallel_tasks(c1 - c0, [&](int64_t t) {
      const int64_t c = c0 + t;
      chunk_body(c, c * kBwdChunk, std::min(N, (c + 1) * kBwdChunk),
                 part.data() + t * dr, part_db.data() + t * d);
    });
    for (int64_t c = c0; c < c1; ++c) {
      const T* p = part.data() + (c - c0) * dr;
      const double* pb = part_db.data() + (c - c0) * d;
      at::parallel_for(0, dr, 16384, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dw[i] += double(p[i]);
      });
      for (int64_t j = 0; j < d; ++j) db[j] += pb[j];
    }
  }
  for (int64_t i = 0; i < dr; ++i) dw_out[i] = static_cast<T>(scale * dw[i]);
  for (int64_t j = 0; j < d; ++j) db_out[j] = static_cast<T>(scale * db[j]);
}

template <typename T>
void quantize_backward_kernel(Isa isa, const T* g, const T* B, const int64_t* idx, int64_t N,
                              int64_t d, int64_t r, T* dw_out, T* db_out) {
  reduce_token_chunks<T>(N, d, r, 1.0, dw_out, db_out,
                         [&](int64_t, int64_t n0, int64_t n1, T* dw, double* db) {
                           chunk_grad<T>(isa, g, B, idx, n0, n1, d, r, dw, db);
                         });
}

// codebook = basis @ weight^T + bias (K x d) in T, each value one FMA chain over r in
// order starting from the bias (fma_rows), so the codebook has the same bits on every CPU, ISA
// and thread count, and identical basis rows give identical codes.
template <typename T>
void project_codebook(Isa isa, const T* basis, const T* weight, const T* bias, int64_t K,
                      int64_t d, int64_t r, T* out) {
  std::vector<T> wt(r * d);  // weight^T, r x d: row i holds weight[:, i]
  for (int64_t j = 0; j < d; ++j)
    for (int64_t i = 0; i < r; ++i) wt[i * d + j] = weight[j * r + i];
  at::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    cpu::fma_rows<T>(isa, e - b, d, r, basis + b * r, r, 1, wt.data(), d, nullptr, bias,
                     out + b * d, d);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z,
                                                    const at::Tensor& codebook) {
  check_nearest_code_args(z, codebook);
  return nearest_code_impl(z, codebook);
}

// The implicit codebook basis @ weight^T + bias, K x d (the size of the codebook itself,
// never N x K), projected in the compute precision so low-precision inputs are not
// rounded twice.
at::Tensor project_codebook_cpu(const at::Tensor& basis, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::ScalarType compute) {
  const at::Tensor B = basis.to(compute).contiguous();
  const at::Tensor w = weight.to(compute).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(compute).contiguous() : at::Tensor();
  const int64_t K = B.size(0), d = w.size(0), r = B.size(1);
  at::Tensor codebook = at::empty({K, d}, B.options());
  const Isa isa = cpu::config().isa;
  AT_DISPATCH_SWITCH(compute, "simvq_project_codebook_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       project_codebook<float>(isa, B.data_ptr<float>(), w.data_ptr<float>(),
                                               b.defined() ? b.data_ptr<float>() : nullptr, K,
                                               d, r, codebook.data_ptr<float>());
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       project_codebook<double>(isa, B.data_ptr<double>(), w.data_ptr<double>(),
                                                b.defined() ? b.data_ptr<double>() : nullptr,
                                                K, d, r, codebook.data_ptr<double>());
                     }));
  return codebook;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& z, const at::Tensor& basis, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  check_quantize_shapes(z, basis, weight, bias);
  SIMVQ_CHECK(z.device().is_cpu(), "the CPU kernel got `z` on ", z.device());
  const auto compute = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor codebook = project_codebook_cpu(basis, weight, bias, compute);
  auto [idx, dist] = nearest_code_impl(z, codebook);
  at::Tensor zq = codebook.index_select(0, idx).to(z.scalar_type());
  return {zq, idx, dist};
}

// ------------------------------------------------- the layer's training step, fused
// quantize_train: what SimVQ's training forward needs, without zq as a tensor:
//   codebook = basis @ weight^T + bias, idx / dist = nearest codes,
//   out = z + (Q[idx] - z) (the straight-through output, bit for bit as z + sg(zq - z)),
//   sumsq = sum (Q[idx] - z)^2 in double (both commitment losses are sumsq / (N d)).
// quantize_train_backward: dz = d_out - commit_scale (Q[idx] - z);
//   dW = codebook_scale sum_n (Q[idx_n] - z_n) basis[idx_n]^T, db = codebook_scale
//   sum_n (Q[idx_n] - z_n), i.e. quantize_backward of g = codebook_scale (zq - z), with
//   the difference formed per chunk in a per-thread buffer (no N x d temporary).
// Tokens come channel-last, z (N, d), or channel-first, z (B, d, T) with token
// n = b T + t (an image or audio layer's layout, read and written in place: no
// transposed copies around the op); out, d_out and dz have z's layout.
// Both reduce over fixed chunks of kBwdChunk tokens in chunk order (double partials):
// the same bits for any thread count and ISA. float32 / float64 tokens only.
void check_train_tokens(const at::Tensor& z, const at::Tensor& basis) {
  SIMVQ_CHECK(z.device().is_cpu() && basis.device().is_cpu(), "the CPU kernel got `z` on ",
              z.device(), " and `basis` on ", basis.device());
  SIMVQ_CHECK(z.dim() == 2 || z.dim() == 3,
              "`z` must be (N, d) or channel-first (B, d, T), got shape ", z.sizes());
  SIMVQ_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "quantize_train takes float32 or float64 `z`, got ", z.scalar_type());
  SIMVQ_CHECK(basis.scalar_type() == z.scalar_type(), "`basis` must have `z`'s dtype ",
              z.scalar_type(), ", got ", basis.scalar_type());
}

TokenLayout layout_of(const at::Tensor& z) {
  return z.dim() == 3 ? TokenLayout{z.size(1), z.size(2)} : TokenLayout{z.size(1), 0};
}
// N: the tokens in z (N, d) or (B, d, T)
int64_t token_count(const at::Tensor& z) {
  return z.dim() == 3 ? z.size(0) * z.size(2) : z.size(0);
}

#ifdef SIMVQ_X86
// dst[c * ds + r] = src[r * ss + c] for an 8 x 8 block of floats (a pure data move).
__attribute__((target("avx2"))) inline void transpose8x8_f32(const float* src, int64_t ss,
                                                             float* dst, int64_t ds) {
  const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss),
               r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss),
               r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss),
               r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  // pairs of rows interleaved, then quads: u_c holds columns c and c + 4 of rows 0-3 / 4-7
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
               t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
               t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// Rows [n0, n1) of a channel-first tensor `cf` to (ToRows) or from a contiguous
// (n1 - n0) x d buffer, in blocks of kCfBlock tokens: every access is a run of consecutive
// elements, and each channel's next run is prefetched (d streams a power-of-two stride T
// apart are more than the hardware prefetchers follow and keep hitting the same cache
// sets). float32 at a vector ISA (`isa`, the call's configured one: AVX2 or wider)
// moves 8 x 8 blocks with AVX2 transposes, the edges element by element; the scalar ISA
// moves every element alone. A pure data move, so the same bits either way.
template <bool ToRows, typename T>
void move_channel_first(Isa isa, std::conditional_t<ToRows, const T*, T*> cf,
                        const TokenLayout& lay, int64_t n0, int64_t n1,
                        std::conditional_t<ToRows, T*, const T*> rows) {
  constexpr int64_t kBlk = kCfBlock;
  const int64_t d = lay.d, Tn = lay.T;
  bool vec = false;
#ifdef SIMVQ_X86
  vec = std::is_same_v<T, float> && isa != Isa::kScalar && kHaveAvx2Fma;
#else
  (void)isa;
#endif
  const int64_t dv = vec ? d / 8 * 8 : 0;  // channels [0, dv) go by 8 x 8 blocks
  for (int64_t n = n0; n < n1;) {
    const int64_t b = n / Tn, t0 = n % Tn, t1 = std::min(Tn, t0 + (n1 - n));
    auto* cb = cf + b * d * Tn;               // image b: channel j at cb + j Tn
    auto* rb = rows + (n - n0) * d;            // token t of image b at rb + (t - t0) d
    for (int64_t ta = t0; ta < t1; ta += kBlk) {
      const int64_t tb = std::min(t1, ta + kBlk);
      if (tb < t1) {
        for (int64_t j = 0; j < d; ++j) {
          __builtin_prefetch(cb + j * Tn + tb, ToRows ? 0 : 1);
          if (kBlk * sizeof(T) > 64) __builtin_prefetch(cb + j * Tn + tb + 64 / sizeof(T),
                                                        ToRows ? 0 : 1);
        }
      }
      const int64_t tv = vec ? ta + (tb - ta) / 8 * 8 : ta;  // tokens [ta, tv) by blocks
#ifdef SIMVQ_X86
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t t = ta; t < tv; t += 8) {
          for (int64_t j = 0; j < dv; j += 8) {
            if constexpr (ToRows) {
              transpose8x8_f32(cb + j * Tn + t, Tn, rb + (t - t0) * d + j, d);
            } else {
              transpose8x8_f32(rb + (t - t0) * d + j, d, cb + j * Tn + t, Tn);
            }
          }
        }
      }
#endif
      for (int64_t j = 0; j < d; ++j) {  // what the blocks left: the edges
        auto* c = cb + j * Tn;
        for (int64_t t = j < dv ? tv : ta; t < tb; ++t) {
          if constexpr (ToRows) {
            rb[(t - t0) * d + j] = c[t];
          } else {
            c[t] = rb[(t - t0) * d + j];
          }
        }
      }
    }
    n += t1 - t0;
  }
}
template <typename T>
void gather_channel_first(Isa isa, const T* cf, const TokenLayout& lay, int64_t n0,
                          int64_t n1, T* rows) {
  move_channel_first<true, T>(isa, cf, lay, n0, n1, rows);
}
template <typename T>
void scatter_channel_first(Isa isa, const T* rows, const TokenLayout& lay, int64_t n0,
                           int64_t n1, T* cf) {
  move_channel_first<false, T>(isa, cf, lay, n0, n1, rows);
}

// z (N, d) itself, or the channel-first tokens gathered into a new (N, d) tensor.
at::Tensor token_rows(Isa isa, const at::Tensor& z) {
  if (z.dim() == 2) return z;
  const TokenLayout lay = layout_of(z);
  const int64_t N = token_count(z);
  at::Tensor rows = at::empty({N, lay.d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "simvq_token_rows", [&] {
    const scalar_t* src = z.data_ptr<scalar_t>();
    scalar_t* dst = rows.data_ptr<scalar_t>();
    at::parallel_for(0, N, kBwdChunk, [&](int64_t n0, int64_t n1) {
      gather_channel_first(isa, src, lay, n0, n1, dst + n0 * lay.d);
    });
  });
  return rows;
}

// nearest_code_impl for the training step's tokens, either layout. Channel-first float32
// tokens on a vector ISA go to the register-blocked search as they are (its token
// packing reads them in place); the other paths search a gathered (N, d) copy. The same
// values either way, so the same bits. `cfg`: the call's snapshot of the configuration.
std::tuple<at::Tensor, at::Tensor> nearest_code_tokens(const cpu::KernelConfig& cfg,
                                                       const at::Tensor& z,
                                                       const at::Tensor& codebook) {
  const TokenLayout lay = layout_of(z);
  if (!lay.channel_first()) return nearest_code_impl(z, codebook);
  const int64_t N = token_count(z), K = codebook.size(0);
#ifdef SIMVQ_X86
  if (z.scalar_type() == at::kFloat && cfg.isa != Isa::kScalar && N > 0 && lay.d > 0) {
    const at::Tensor cb = codebook.contiguous();
    at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
    at::Tensor dist = at::empty({N}, z.options());
    nearest_code_blocked(cfg, z.data_ptr<float>(), lay, cb.data_ptr<float>(), N, K,
                         idx.data_ptr<int64_t>(), dist.data_ptr<float>());
    return {idx, dist};
  }
#endif
  return nearest_code_impl(token_rows(cfg.isa, z), codebook);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_train_cpu(
    const at::Tensor& z_in, const at::Tensor& basis, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  check_train_tokens(z_in, basis);
  const at::Tensor z = z_in.contiguous();
  const TokenLayout lay = layout_of(z);
  const int64_t d = lay.d, N = token_count(z);
  // the argument checks see an (N, d) tensor's width, dtype and device
  check_quantize_shapes(lay.channel_first() ? at::empty({0, d}, z.options()) : z, basis,
                        weight, bias);
  const at::Tensor codebook = project_codebook_cpu(basis, weight, bias, z.scalar_type());
  const cpu::KernelConfig cfg = cpu::config();  // one snapshot per call
  auto [idx, dist] = nearest_code_tokens(cfg, z, codebook);
  at::Tensor out = at::empty_like(z);
  const int64_t chunks = (N + kBwdChunk - 1) / kBwdChunk;
  std::vector<double> part(std::max<int64_t>(chunks, 1), 0.0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "simvq_quantize_train_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* q = codebook.data_ptr<scalar_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // eight interleaved sums per chunk (a fixed order; independent lanes, so the
        // compiler vectorises the loop without reassociating anything)
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t n0 = c * kBwdChunk, n1 = std::min(N, (c + 1) * kBwdChunk);
        // rows [b0, b1) of the chunk: z rows at zc, output rows at oc (row b0 first)
        auto rows = [&](int64_t b0, int64_t b1, const scalar_t* zc, scalar_t* oc) {
          for (int64_t n = b0; n < b1; ++n) {
            const scalar_t* zr = zc + (n - b0) * d;
            const scalar_t* qr = q + ix[n] * d;
            scalar_t* orow = oc + (n - b0) * d;
            for (int64_t j = 0; j < d; ++j) orow[j] = zr[j] + (qr[j] - zr[j]);
            int64_t j = 0;
            for (; j + 8 <= d; j += 8) {
              for (int l = 0; l < 8; ++l) {
                const double v = double(qr[j + l] - zr[j + l]);
                s[l] += v * v;
              }
            }
            for (; j < d; ++j) {
              const double v = double(qr[j] - zr[j]);
              s[j - (d & ~int64_t(7))] += v * v;
            }
          }
        };
        if (!lay.channel_first()) {
          rows(n0, n1, zp + n0 * d, o + n0 * d);
        } else {
          // channel-first: blocks of kCfBlock tokens are gathered into a small buffer, and
          // their output rows go through another and are scattered (the buffers stay in
          // L1 / L2 whatever the chunk size); the same tokens in the same order
          scalar_t* zb = thread_buffer<scalar_t, 5>(kCfBlock * d);
          scalar_t* ob = thread_buffer<scalar_t, 4>(kCfBlock * d);
          for (int64_t b0 = n0; b0 < n1; b0 += kCfBlock) {
            const int64_t b1 = std::min(n1, b0 + kCfBlock);
            gather_channel_first(cfg.isa, zp, lay, b0, b1, zb);
            rows(b0, b1, zb, ob);
            scatter_channel_first(cfg.isa, ob, lay, b0, b1, o);
          }
        }
        part[c] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      }
    });
  });
  double total = 0;
  for (double p : part) total += p;
  return {out, idx, dist, at::scalar_tensor(total, z.options().dtype(at::kDouble)), codebook};
}

template <typename T>
void train_backward_kernel(Isa isa, const T* g, const T* z, const TokenLayout& lay,
                           const T* q, const T* B, const int64_t* idx, int64_t N, int64_t d,
                           int64_t r, T cz, double cq, T* dz, T* dw_out, T* db_out) {
  const bool cf = lay.channel_first();
  reduce_token_chunks<T>(N, d, r, cq, dw_out, db_out,
                         [&](int64_t, int64_t n0, int64_t n1, T* dw, double* pdb) {
    T* diff = thread_buffer<T, 3>(kBwdChunk * d);
    // rows [b0, b1) of the chunk: z, d_out and dz rows at zc, gc, dzc (row b0 first)
    auto rows = [&](int64_t b0, int64_t b1, const T* zc, const T* gc, T* dzc) {
      for (int64_t n = b0; n < b1; ++n) {
        const T* zr = zc + (n - b0) * d;
        const T* qr = q + idx[n] * d;
        const T* gr = gc + (n - b0) * d;
        T* dr_ = diff + (n - n0) * d;
        T* dzr = dzc + (n - b0) * d;
        for (int64_t j = 0; j < d; ++j) {
          const T v = qr[j] - zr[j];
          dr_[j] = v;
          dzr[j] = gr[j] - cz * v;
        }
      }
    };
    if (!cf) {
      rows(n0, n1, z + n0 * d, g + n0 * d, dz + n0 * d);
    } else {
      // channel-first: blocks of kCfBlock tokens of z and d_out are gathered into small
      // buffers and their dz rows scattered from a third (L1 / L2-sized, whatever the
      // chunk size); the same tokens in the same order, so the same sums
      T* zb = thread_buffer<T, 4>(kCfBlock * d);
      T* gb = thread_buffer<T, 5>(kCfBlock * d);
      T* dzb = thread_buffer<T, 6>(kCfBlock * d);
      for (int64_t b0 = n0; b0 < n1; b0 += kCfBlock) {
        const int64_t b1 = std::min(n1, b0 + kCfBlock);
        gather_channel_first(isa, z, lay, b0, b1, zb);
        gather_channel_first(isa, g, lay, b0, b1, gb);
        rows(b0, b1, zb, gb, dzb);
        scatter_channel_first(isa, dzb, lay, b0, b1, dz);
      }
    }
    // dw[j][i] = sum_n diff[n][j] * B[idx[n]][i], one FMA chain per element; the bias's
    // partial sum over the same rows in order, in double
    cpu::fma_rows<T>(isa, d, r, n1 - n0, diff, 1, d, B, r, idx + n0, nullptr, dw, r, pdb);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_train_backward_cpu(
    const at::Tensor& d_out, const at::Tensor& z_in, const at::Tensor& basis,
    const at::Tensor& codebook, const at::Tensor& indices, double commit_scale,
    double codebook_scale) {
  check_train_tokens(z_in, basis);
  SIMVQ_CHECK(d_out.sizes() == z_in.sizes() && d_out.scalar_type() == z_in.scalar_type(),
              "`d_out` must match `z` ", z_in.sizes(), " ", z_in.scalar_type(), ", got ",
              d_out.sizes(), " ", d_out.scalar_type());
  SIMVQ_CHECK(d_out.device().is_cpu() && basis.device().is_cpu() && codebook.device().is_cpu() &&
                  indices.device().is_cpu(),
              "the CPU kernel got `d_out`, `basis`, `codebook`, `indices` on ", d_out.device(),
              ", ", basis.device(), ", ", codebook.device(), ", ", indices.device());
  const TokenLayout lay = layout_of(z_in);
  const int64_t d = lay.d, N = token_count(z_in);
  SIMVQ_CHECK(codebook.dim() == 2 && codebook.size(0) == basis.size(0) &&
                  codebook.size(1) == d && codebook.scalar_type() == z_in.scalar_type(),
              "`codebook` must be (K, d) = (", basis.size(0), ", ", d, ") in ",
              z_in.scalar_type(), ", got ", codebook.sizes(), " ", codebook.scalar_type());
  SIMVQ_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && indices.size(0) == N,
              "`indices` must be int64 (", N, ",), got ", indices.sizes(), " ",
              indices.scalar_type());
  const at::Tensor z = z_in.contiguous(), g = d_out.contiguous(), q = codebook.contiguous();
  const at::Tensor B = basis.contiguous(), ix = indices.contiguous();
  const int64_t r = B.size(1), K = B.size(0);
  if (N > 0) {
    const auto [lo, hi] = at::aminmax(ix);
    SIMVQ_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < K, "`indices` must lie in [0, ",
                K, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  at::Tensor dz = at::empty_like(z);
  at::Tensor dW = at::empty({d, r}, z.options());
  at::Tensor db = at::empty({d}, z.options());
  const Isa isa = cpu::config().isa;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "simvq_quantize_train_backward_cpu", [&] {
    train_backward_kernel<scalar_t>(isa, g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), lay,
                                    q.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                                    ix.data_ptr<int64_t>(), N, d, r,
                                    static_cast<scalar_t>(commit_scale), codebook_scale,
                                    dz.data_ptr<scalar_t>(), dW.data_ptr<scalar_t>(),
                                    db.data_ptr<scalar_t>());
  });
  return {dz, dW, db};
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
  SIMVQ_CHECK(grad_zq.device().is_cpu() && basis.device().is_cpu() &&
                  indices.device().is_cpu(),
              "the CPU kernel got tensors on another device");
  const auto compute = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_zq.to(compute).contiguous();
  const at::Tensor B = basis.to(compute).contiguous();
  const at::Tensor ix = indices.contiguous();
  const int64_t N = g.size(0), d = g.size(1), r = B.size(1), K = B.size(0);
  if (N > 0) {
    const auto [lo, hi] = at::aminmax(ix);
    SIMVQ_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < K, "`indices` must lie in [0, ",
                K, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  at::Tensor dW = at::empty({d, r}, g.options());
  at::Tensor db = at::empty({d}, g.options());
  const Isa isa = cpu::config().isa;
  AT_DISPATCH_SWITCH(compute, "simvq_quantize_backward_cpu",
                     AT_DISPATCH_CASE(at::kFloat,
                                      [&] {
                                        quantize_backward_kernel<float>(
                                            isa, g.data_ptr<float>(), B.data_ptr<float>(),
                                            ix.data_ptr<int64_t>(), N, d, r,
                                            dW.data_ptr<float>(), db.data_ptr<float>());
                                      })
                         AT_DISPATCH_CASE(at::kDouble, [&] {
                           quantize_backward_kernel<double>(
                               isa, g.data_ptr<double>(), B.data_ptr<double>(),
                               ix.data_ptr<int64_t>(), N, d, r, dW.data_ptr<double>(),
                               db.data_ptr<double>());
                         }));
  return {dW.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace simvq

// The fused training step of the SimVQ layer (simvq_kernels/nn.py, through the cpu
// backend): plain (catch-all) kernels, called for CPU tensors only.
TORCH_LIBRARY_FRAGMENT(simvq, m) {
  // z (N, d) or channel-first (B, d, T), basis (K, r), weight (d, r), bias (d,) or None,
  // float32 or float64 -> out = z + (Q[idx] - z) in z's layout, indices (N,), distances
  //   (N,), sum (Q[idx] - z)^2 (float64 scalar), codebook Q (K, d)
  m.def("quantize_train(Tensor z, Tensor basis, Tensor weight, Tensor? bias) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)",
        &simvq::quantize_train_cpu);
  // d_out, z, basis, codebook, indices, commit_scale, codebook_scale ->
  //   dz = d_out - commit_scale (Q[idx] - z), dW, db of g = codebook_scale (Q[idx] - z)
  m.def("quantize_train_backward(Tensor d_out, Tensor z, Tensor basis, Tensor codebook, "
        "Tensor indices, float commit_scale, float codebook_scale) -> (Tensor, Tensor, Tensor)",
        &simvq::quantize_train_backward_cpu);
}

TORCH_LIBRARY_IMPL(simvq, CPU, m) {
  m.impl("nearest_code", &simvq::nearest_code_cpu);
  m.impl("quantize", &simvq::quantize_cpu);
  m.impl("quantize_backward", &simvq::quantize_backward_cpu);
}
