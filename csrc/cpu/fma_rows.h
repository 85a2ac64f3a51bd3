// simvq-kernels: a small matrix product with a fixed reduction order, for the CPU paths
// whose results are promised bit-identical (the backward's dW, the SimVQ projection and
// the search's tile products for float64 and the scalar ISA).
//
//   out[m * ldo + j] = init[j] + sum_{t = 0..T-1} a[m * a_m + t * a_t] * row_t[j]
//   row_t = rows + (gather ? gather[t] : t) * ld_rows
//
// for m in [0, M), j in [0, J). Every output element is ONE chain of fused multiply-adds
// in increasing t, starting from init[j] (+0 without init). The
// vector code (AVX-512, AVX2 + FMA, or scalar fma) only decides how many elements are
// computed side by side, never the operations on one element, so the bits are the same
// on every ISA, every register blocking and every thread split. No BLAS is called: a
// BLAS picks its kernel by CPU vendor, ISA, thread count and even buffer alignment, so
// its bits cannot carry a determinism promise.
//
// With a_sums, also a_sums[m] = sum_{t} double(a[m * a_m + t * a_t]) (the backward's
// grad_bias partials): one chain of double additions per m in increasing t from +0, the
// same bits on every ISA (the ISA only decides how many m are added side by side).
//
// With gather, the rows are gathered once per block of tokens into packed panels that
// the register block streams from L1 (see fma_rows_body.inc); the chains are the same.
//
// out must not overlap a, rows, init, gather or a_sums (the packed path stores partial
// values in out between blocks of tokens and reads them back).
//
// Single-threaded; callers split M (or independent calls) over threads.
#pragma once
#include <cstdint>

#include "cpu_config.h"

namespace simvq {
namespace cpu {

template <typename T>
void fma_rows(Isa isa, int64_t M, int64_t J, int64_t T_len, const T* a, int64_t a_m,
              int64_t a_t, const T* rows, int64_t ld_rows, const int64_t* gather,
              const T* init, T* out, int64_t ldo, double* a_sums = nullptr);

// The floating-point rate of fused multiply-adds on this thread at `isa`: runs
// `iterations` rounds of 12 independent vector FMA chains (enough to cover the FMA
// latency times the number of FMA units on current x86 cores) and returns the number
// of floating-point operations done (2 per lane per FMA). The caller times it.
double fma_peak_work(Isa isa, int64_t iterations);

}  // namespace cpu
}  // namespace simvq
