// simvq-kernels: fma_rows and the FMA peak loop (fma_rows.h), one body
// (fma_rows_body.inc) compiled for each instruction set: AVX-512F, AVX2 + FMA, and
// scalar fused multiply-adds (std::fma, which is exactly rounded wherever it runs).
#include "fma_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SIMVQ_FMA_X86 1
#include <immintrin.h>
#endif

namespace simvq {
namespace cpu {
namespace {

// ------------------------------------------------------------------ scalar
namespace scalar_isa {
template <typename E>
struct Scalar {
  using T = E;
  using reg = E;
  static constexpr int W = 1, MR = 4, NV = 4, MR2 = MR, NV2 = NV;
  static reg zero() { return E(0); }
  static reg bcast(E x) { return x; }
  static reg load(const E* p) { return *p; }
  static reg load_n(const E* p, int) { return *p; }
  static void store(E* p, reg v) { *p = v; }
  static void store_n(E* p, reg v, int) { *p = v; }
  static reg add(reg a, reg b) { return a + b; }
  static reg fma(reg a, reg b, reg c) { return std::fma(a, b, c); }
};
using VF = Scalar<float>;
using VD = Scalar<double>;
#include "fma_rows_body.inc"
}  // namespace scalar_isa

#ifdef SIMVQ_FMA_X86
// ------------------------------------------------------------------ AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_isa {
inline __m256i lanes_below(int n) {  // lanes [0, n) set, for maskload / maskstore
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i lanes_below_pd(int n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
struct VF {
  using T = float;
  using reg = __m256;
  // 12 accumulators of 16 ymm registers, as 4 x 3 vectors or (MR2 x NV2) 6 x 2
  static constexpr int W = 8, MR = 4, NV = 3, MR2 = 6, NV2 = 2;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg bcast(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, reg v, int n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
};
struct VD {
  using T = double;
  using reg = __m256d;
  static constexpr int W = 4, MR = 4, NV = 3, MR2 = 6, NV2 = 2;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg bcast(double x) { return _mm256_set1_pd(x); }
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static reg load_n(const double* p, int n) { return _mm256_maskload_pd(p, lanes_below_pd(n)); }
  static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static void store_n(double* p, reg v, int n) { _mm256_maskstore_pd(p, lanes_below_pd(n), v); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
};
#include "fma_rows_body.inc"
}  // namespace avx2_isa
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512F
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512_isa {
inline __mmask16 mask16(int n) { return __mmask16((1u << n) - 1u); }
inline __mmask8 mask8(int n) { return __mmask8((1u << n) - 1u); }
struct VF {
  using T = float;
  using reg = __m512;
  // 24 accumulators of 32 zmm registers
  static constexpr int W = 16, MR = 6, NV = 4, MR2 = MR, NV2 = NV;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg bcast(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask16(n), p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, mask16(n), v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
};
struct VD {
  using T = double;
  using reg = __m512d;
  static constexpr int W = 8, MR = 6, NV = 4, MR2 = MR, NV2 = NV;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg bcast(double x) { return _mm512_set1_pd(x); }
  static reg load(const double* p) { return _mm512_loadu_pd(p); }
  static reg load_n(const double* p, int n) { return _mm512_maskz_loadu_pd(mask8(n), p); }
  static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static void store_n(double* p, reg v, int n) { _mm512_mask_storeu_pd(p, mask8(n), v); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
};
#include "fma_rows_body.inc"
}  // namespace avx512_isa
#pragma GCC pop_options
#endif

}  // namespace

template <typename T>
void fma_rows(Isa isa, int64_t M, int64_t J, int64_t T_len, const T* a, int64_t a_m,
              int64_t a_t, const T* rows, int64_t ld_rows, const int64_t* gather,
              const T* init, T* out, int64_t ldo, double* a_sums) {
  if (M <= 0) return;
  if (J <= 0) {  // no outputs, but the sums of a are still asked for
    if (a_sums) scalar_isa::row_sums_impl<T>(M, T_len, a, a_m, a_t, a_sums, false);
    return;
  }
  constexpr bool f32 = std::is_same_v<T, float>;
#ifdef SIMVQ_FMA_X86
  if (isa == Isa::kAvx512) {
    using V = std::conditional_t<f32, avx512_isa::VF, avx512_isa::VD>;
    avx512_isa::fma_rows_impl<V>(M, J, T_len, a, a_m, a_t, rows, ld_rows, gather, init, out, ldo, a_sums);
    return;
  }
  if (isa == Isa::kAvx2) {
    using V = std::conditional_t<f32, avx2_isa::VF, avx2_isa::VD>;
    avx2_isa::fma_rows_impl<V>(M, J, T_len, a, a_m, a_t, rows, ld_rows, gather, init, out, ldo, a_sums);
    return;
  }
#endif
  using V = std::conditional_t<f32, scalar_isa::VF, scalar_isa::VD>;
  scalar_isa::fma_rows_impl<V>(M, J, T_len, a, a_m, a_t, rows, ld_rows, gather, init, out, ldo,
                               a_sums);
}

template void fma_rows<float>(Isa, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                              const float*, int64_t, const int64_t*, const float*, float*,
                              int64_t, double*);
template void fma_rows<double>(Isa, int64_t, int64_t, int64_t, const double*, int64_t,
                               int64_t, const double*, int64_t, const int64_t*,
                               const double*, double*, int64_t, double*);

double fma_peak_work(Isa isa, int64_t iterations) {
  TORCH_CHECK(cpu_supports(isa), "fma_peak: this CPU does not run ", isa_name(isa));
#ifdef SIMVQ_FMA_X86
  if (isa == Isa::kAvx512) return avx512_isa::fma_peak_impl<avx512_isa::VF>(iterations);
  if (isa == Isa::kAvx2) return avx2_isa::fma_peak_impl<avx2_isa::VF>(iterations);
#endif
  return scalar_isa::fma_peak_impl<scalar_isa::VF>(iterations);
}

namespace {
Isa isa_from_name(const std::string& isa, const char* op) {
  Isa which;
  if (isa == "avx512") {
    which = Isa::kAvx512;
  } else if (isa == "avx2") {
    which = Isa::kAvx2;
  } else if (isa == "scalar") {
    which = Isa::kScalar;
  } else {
    TORCH_CHECK(false, op, ": `isa`='", isa, "' is not one of: scalar, avx2, avx512");
  }
  TORCH_CHECK(cpu_supports(which), op, ": `isa`=", isa, " but this CPU does not run it");
  return which;
}

// The benchmark's peak probe: `iterations` rounds of the FMA loop on every thread of
// torch's intra-op pool at once; returns the floating-point operations done in all.
double fma_peak_op(const std::string& isa, int64_t iterations) {
  const Isa which = isa_from_name(isa, "fma_peak");
  TORCH_CHECK(iterations > 0, "fma_peak: `iterations` must be positive, got ", iterations);
  const int64_t threads = at::get_num_threads();
  std::vector<double> flops(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) flops[i] = fma_peak_work(which, iterations);
  });
  double total = 0;
  for (double f : flops) total += f;
  return total;
}
// fma_rows itself, for the tests (every branch of it, on every ISA this CPU runs): a is
// (M, T) with any non-negative strides (a_m = a.stride(0), a_t = a.stride(1)); rows is
// (R, J) with unit column stride (ld_rows = rows.stride(0)); gather (T,) int64 indexes
// rows, or None (rows t = 0..T-1); init (J,) or None. Returns out, a (M, J + out_pad)
// buffer filled with NaN before the call (ldo = J + out_pad, so the test sees that no
// column past J is written), and the double sums of a's rows ((M,), or empty without
// `sums`).
std::tuple<at::Tensor, at::Tensor> fma_rows_op(const at::Tensor& a, const at::Tensor& rows,
                                               const std::optional<at::Tensor>& gather,
                                               const std::optional<at::Tensor>& init,
                                               int64_t out_pad, bool sums,
                                               const std::string& isa) {
  const Isa which = isa_from_name(isa, "_fma_rows");
  TORCH_CHECK(a.device().is_cpu() && rows.device().is_cpu(), "_fma_rows: CPU tensors only");
  TORCH_CHECK(a.dim() == 2 && rows.dim() == 2, "_fma_rows: `a` and `rows` must be 2-D, got ",
              a.sizes(), " and ", rows.sizes());
  TORCH_CHECK(a.scalar_type() == rows.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "_fma_rows: `a` and `rows` must both be float32 or both float64, got ",
              a.scalar_type(), " and ", rows.scalar_type());
  TORCH_CHECK(a.stride(0) >= 0 && a.stride(1) >= 0, "_fma_rows: `a` needs non-negative strides");
  TORCH_CHECK(rows.size(1) <= 1 || rows.stride(1) == 1,
              "_fma_rows: `rows` needs unit column stride, got strides ", rows.strides());
  TORCH_CHECK(out_pad >= 0, "_fma_rows: `out_pad` must be >= 0, got ", out_pad);
  const int64_t M = a.size(0), T_len = a.size(1), J = rows.size(1);
  const int64_t* g = nullptr;
  if (gather) {
    TORCH_CHECK(gather->scalar_type() == at::kLong && gather->dim() == 1 &&
                    gather->size(0) == T_len && gather->is_contiguous(),
                "_fma_rows: `gather` must be contiguous int64 of shape (", T_len, ",), got ",
                gather->scalar_type(), " ", gather->sizes());
    if (T_len > 0) {
      TORCH_CHECK(gather->min().item<int64_t>() >= 0 &&
                      gather->max().item<int64_t>() < rows.size(0),
                  "_fma_rows: `gather` must index the ", rows.size(0), " rows");
    }
    g = gather->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(rows.size(0) >= T_len, "_fma_rows: without `gather`, `rows` needs ", T_len,
                " rows, got ", rows.size(0));
  }
  if (init) {
    TORCH_CHECK(init->scalar_type() == a.scalar_type() && init->dim() == 1 &&
                    init->size(0) == J && init->is_contiguous(),
                "_fma_rows: `init` must be contiguous, shape (", J, ",), dtype of `a`");
  }
  const int64_t ldo = J + out_pad;
  at::Tensor out = at::full({M, ldo}, NAN, a.options());
  at::Tensor s = at::zeros({sums ? M : 0}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "_fma_rows", [&] {
    fma_rows<scalar_t>(which, M, J, T_len, a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                       rows.data_ptr<scalar_t>(), rows.stride(0), g,
                       init ? init->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                       ldo, sums ? s.data_ptr<double>() : nullptr);
  });
  return {out, s};
}
}  // namespace

}  // namespace cpu
}  // namespace simvq

TORCH_LIBRARY_FRAGMENT(simvq, m) {
  // _fma_rows(a, rows, gather, init, out_pad, sums, isa) -> (out, sums): the fixed-order
  // product under the CPU backward and projection (csrc/cpu/fma_rows.h), exposed for the
  // tests only; not part of the library's API.
  m.def("_fma_rows(Tensor a, Tensor rows, Tensor? gather, Tensor? init, int out_pad, "
        "bool sums, str isa) -> (Tensor, Tensor)", &simvq::cpu::fma_rows_op);
  // fma_peak(isa, iterations) -> floating-point operations done: a loop of independent
  // FMA chains in `isa`'s widest vectors on every intra-op thread (time it to get the
  // machine's FMA peak; python -m simvq_kernels.bench reports its rows against it).
  m.def("fma_peak(str isa, int iterations) -> float", &simvq::cpu::fma_peak_op);
}
