// simvq-kernels: the CUDA implementations of the simvq:: ops (ATen side).
//
// Argument checks, operand preparation (contiguous rows, zero-padded to the kernels'
// 64-byte chunk where needed), allocation through PyTorch's caching allocator, the
// current stream and a device guard; the kernels are in nearest_code.cu, project.cu,
// quantize_backward.cu (tensor cores: bf16, fp16, fp32 as tf32 or 3xTF32) and simt.cu
// (CUDA cores: float64, and the fp32 projection). No host synchronisation anywhere, so the ops
// can be captured in a CUDA graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <mutex>

#include "../simvq.h"
#include "kernels.h"
#include "plan.h"

namespace simvq {
namespace {

using cuda::Mma;

constexpr int kMaxDevices = 256;

// How fp32 products are formed: tf32 unless torch.get_float32_matmul_precision() is
// "highest", then 3xTF32 (about fp32 accuracy).
Mma mma_mode(at::ScalarType t, bool allow_tf32, const char* name) {
  switch (t) {
    case at::kBFloat16: return Mma::kBF16;
    case at::kHalf: return Mma::kFP16;
    case at::kFloat: return allow_tf32 ? Mma::kTF32 : Mma::kTF32x3;
    default:  // float64 has its own path (simt.cu); other floating types (float8) end here
      SIMVQ_CHECK(false, "the CUDA backend takes `", name,
                  "` as float64, float32, bfloat16 or float16, got ", t);
  }
  return Mma::kTF32x3;
}

bool fp32_allows_tf32() {
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

// Rows of x with a row length that is a multiple of the 64-byte chunk, zero-padded,
// contiguous and 16-byte aligned; returns x itself when it already is.
at::Tensor chunk_rows(const at::Tensor& x) {
  const int64_t per_chunk = cuda::kChunkBytes / int64_t(x.element_size());
  const int64_t w = x.size(1);
  const int64_t ld = std::max<int64_t>(per_chunk, (w + per_chunk - 1) / per_chunk * per_chunk);
  if (ld == w && x.is_contiguous() &&
      reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) {
    return x;
  }
  at::Tensor out = at::zeros({x.size(0), ld}, x.options());
  out.narrow(1, 0, w).copy_(x);
  return out;
}

// What the launch plans need to know of a device, asked once per device (cached ints:
// nothing is called while a CUDA graph is being captured after the first use).
struct DeviceShape {
  int sms = 0;
  int smem_per_sm = 0;          // bytes of shared memory per SM
  int smem_per_block_optin = 0;  // the most one block may have (opted in)
  int smem_reserved = 0;        // bytes the system reserves per block
};

const DeviceShape& device_shape(int device) {
  static DeviceShape cache[kMaxDevices] = {};
  static std::once_flag once[kMaxDevices];
  SIMVQ_CHECK(device >= 0 && device < kMaxDevices, "unexpected CUDA device index ", device);
  std::call_once(once[device], [device] {  // (an exception leaves it to the next call)
    DeviceShape s;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.smem_per_sm,
                                          cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.smem_per_block_optin,
                                          cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.smem_reserved,
                                          cudaDevAttrReservedSharedMemoryPerBlock, device));
    cache[device] = s;
  });
  return cache[device];
}

void check_cuda(const at::Tensor& x, const char* name) {
  SIMVQ_CHECK(x.is_cuda(), "the CUDA kernel got `", name, "` on ", x.device());
}

void check_nearest_code_args(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_code_shapes(z, codebook);
  check_cuda(z, "z");
  SIMVQ_CHECK(codebook.size(0) <= int64_t(std::numeric_limits<int32_t>::max()) - cuda::kTileN,
              "`codebook` has K=", codebook.size(0), " codes; at most 2^31 - 129 are supported");
}

// Splits of the code range so that the grid is a whole number of waves, or close
// (plan::plan_code_splits; the result does not depend on the split): (splits, codes
// per split, a multiple of `tile`), for a kernel that runs `blocks_per_sm` blocks per SM.
std::pair<int64_t, int64_t> code_splits(int64_t N, int64_t K, int64_t tile, int blocks_per_sm,
                                        int device) {
  const int64_t slots = int64_t(device_shape(device).sms) * blocks_per_sm;
  const cuda::plan::SplitPlan p = cuda::plan::plan_code_splits(slots, N, K, tile);
  return {p.splits, p.per};
}

// Row-major rows with unit column stride (a copy only when needed).
at::Tensor unit_stride_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(x.size(1), 1)) ? x : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor> search_f64(const at::Tensor& z_in, const at::Tensor& cb_in,
                                              at::Tensor idx, at::Tensor dist) {
  const at::Tensor z = unit_stride_rows(z_in), cb = unit_stride_rows(cb_in);
  const int64_t N = z.size(0), K = cb.size(0), d = z.size(1);
  // (the float64 kernel: 64 x 64 tiles, planned as 2 blocks per SM)
  const auto [splits, per] = code_splits(N, K, 64, 2, z.get_device());
  at::Tensor qn = at::empty({K}, z.options());
  at::Tensor part_val = at::empty({splits, N}, z.options());
  at::Tensor part_idx = at::empty({splits, N}, z.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_search_f64(
      z.data_ptr<double>(), z.stride(0), cb.data_ptr<double>(), cb.stride(0), N, K, d,
      qn.data_ptr<double>(), int(splits), per, part_val.data_ptr<double>(),
      part_idx.data_ptr<int32_t>(), idx.data_ptr<int64_t>(), dist.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return {idx, dist};
}

// The search on a codebook already in z's dtype (checked, on z's device).
std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& z_in, const at::Tensor& cb_in) {
  const bool f64 = z_in.scalar_type() == at::kDouble;
  const int64_t N = z_in.size(0), K = cb_in.size(0), d = z_in.size(1);
  at::Tensor idx = at::empty({N}, z_in.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z_in.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (N == 0) return {idx, dist};
  if (d == 0) {  // every code is at distance 0: the lowest index wins
    idx.zero_();
    dist.zero_();
    return {idx, dist};
  }
  if (f64) return search_f64(z_in, cb_in, idx, dist);
  const Mma mode = mma_mode(z_in.scalar_type(), fp32_allows_tf32(), "z");
  // (a codebook that is already padded, as quantize's projection writes it, is used as is)
  const at::Tensor z = chunk_rows(z_in);
  const at::Tensor cb = chunk_rows(cb_in);
  const int64_t ld = z.size(1);
  TORCH_INTERNAL_ASSERT(cb.size(1) == ld);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  at::Tensor qn = at::empty({K}, z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_code_norms(mode, cb.data_ptr(), K, ld, qn.data_ptr<float>(),
                                         stream));
  const int bps = cuda::search_blocks_per_sm(mode);
  const auto [splits, codes_per_split] = code_splits(N, K, cuda::kTileM, bps, z.get_device());
  const DeviceShape& dev = device_shape(z.get_device());
  const int64_t smem_budget = cuda::plan::smem_budget(dev.smem_per_sm, dev.smem_per_block_optin,
                                                      dev.smem_reserved, bps);

  at::Tensor part_val = at::empty({splits, N}, z.options().dtype(at::kFloat));
  at::Tensor part_idx = at::empty({splits, N}, z.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_search(mode, z.data_ptr(), cb.data_ptr(), qn.data_ptr<float>(), N,
                                     K, ld, int(splits), codes_per_split, smem_budget,
                                     part_val.data_ptr<float>(), part_idx.data_ptr<int32_t>(),
                                     stream));
  C10_CUDA_CHECK(cuda::launch_search_finalize(mode, z.data_ptr(), N, d, ld, int(splits),
                                              part_val.data_ptr<float>(),
                                              part_idx.data_ptr<int32_t>(),
                                              idx.data_ptr<int64_t>(), dist.data_ptr<float>(),
                                              stream));
  return {idx, dist};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z,
                                                     const at::Tensor& codebook) {
  check_nearest_code_args(z, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  return search(z, codebook);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(
    const at::Tensor& z, const at::Tensor& basis, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  check_quantize_shapes(z, basis, weight, bias);
  check_cuda(z, "z");
  SIMVQ_CHECK(basis.size(0) <= int64_t(std::numeric_limits<int32_t>::max()) - cuda::kTileN,
              "`basis` has K=", basis.size(0), " codes; at most 2^31 - 129 are supported");
  const c10::cuda::CUDAGuard guard(z.device());
  if (z.scalar_type() == at::kDouble) {  // CUDA cores, one DFMA per term in k order
    const at::Tensor B = basis.contiguous(), W = weight.contiguous();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    at::Tensor q = at::empty({basis.size(0), z.size(1)}, z.options());
    C10_CUDA_CHECK(cuda::launch_project_f64(
        B.data_ptr<double>(), B.size(1), W.data_ptr<double>(), W.size(1), B.size(0),
        z.size(1), B.size(1), b.defined() ? b.data_ptr<double>() : nullptr,
        q.data_ptr<double>(), z.size(1), c10::cuda::getCurrentCUDAStream().stream()));
    auto [idx, dist] = search(z, q);
    at::Tensor zq = q.index_select(0, idx);
    return {zq, idx, dist};
  }
  const Mma mode = mma_mode(z.scalar_type(), fp32_allows_tf32(), "z");
  // The implicit codebook Q = B W^T + b (K x d, never N x K), formed by our own kernels
  // (position-independent rounding: identical basis rows give identical codes) with
  // fp32 accumulation, rounded once to z's dtype and zero-padded to the search's chunk;
  // the search multiplies exactly these values and zq is gathered from them. bf16/fp16:
  // tensor cores (exact products); fp32: CUDA-core FMAs, exact to fp32 accumulation
  // whatever torch's fp32 matmul precision (which governs the search only).
  const int64_t K = basis.size(0), d = z.size(1);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t per_chunk = cuda::kChunkBytes / int64_t(z.element_size());
  const int64_t ldq = std::max<int64_t>(per_chunk, (d + per_chunk - 1) / per_chunk * per_chunk);
  at::Tensor q = at::empty({K, ldq}, z.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (d == 0) {  // no columns: nothing to project (and no weight rows to read)
    q.zero_();
  } else if (z.scalar_type() == at::kFloat) {
    const at::Tensor B = unit_stride_rows(basis), W = unit_stride_rows(weight);
    C10_CUDA_CHECK(cuda::launch_project_f32(
        B.data_ptr<float>(), B.stride(0), W.data_ptr<float>(), W.stride(0), K, d, B.size(1),
        b.defined() ? b.data_ptr<float>() : nullptr, q.data_ptr<float>(), ldq, stream));
  } else {
    const at::Tensor B = chunk_rows(basis), W = chunk_rows(weight);
    C10_CUDA_CHECK(cuda::launch_project(mode, B.data_ptr(), W.data_ptr(), K, d, B.size(1),
                                        b.defined() ? b.data_ptr() : nullptr, q.data_ptr(),
                                        ldq, stream));
  }
  auto [idx, dist] = search(z, q);
  q = q.narrow(1, 0, d);
  at::Tensor zq = q.index_select(0, idx);
  return {zq, idx, dist};
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cuda(const at::Tensor& grad_zq,
                                                          const at::Tensor& basis,
                                                          const at::Tensor& indices,
                                                          const at::Tensor& weight) {
  SIMVQ_CHECK_DIM(grad_zq, 2);
  SIMVQ_CHECK_DIM(basis, 2);
  SIMVQ_CHECK_DIM(indices, 1);
  SIMVQ_CHECK_DIM(weight, 2);
  SIMVQ_CHECK_FLOAT(grad_zq);
  SIMVQ_CHECK_FLOAT(basis);
  SIMVQ_CHECK_FLOAT(weight);
  SIMVQ_CHECK(indices.scalar_type() == at::kLong, "`indices` must be int64, got ",
              indices.scalar_type());
  SIMVQ_CHECK(indices.size(0) == grad_zq.size(0), "`indices` has ", indices.size(0),
              " entries but `grad_zq` has ", grad_zq.size(0), " rows");
  SIMVQ_CHECK(weight.size(0) == grad_zq.size(1) && weight.size(1) == basis.size(1),
              "`weight` must be (d, r) = (", grad_zq.size(1), ", ", basis.size(1), "), got ",
              weight.sizes());
  SIMVQ_CHECK_SAME_DEVICE(grad_zq, weight);
  SIMVQ_CHECK_SAME_DEVICE(basis, weight);
  SIMVQ_CHECK_SAME_DEVICE(indices, weight);
  check_cuda(weight, "weight");
  const at::ScalarType wt = weight.scalar_type();
  const c10::cuda::CUDAGuard guard(weight.device());
  if (wt == at::kDouble) {  // a gather of N x r rows (never K x d) and cuBLAS DGEMM
    const at::Tensor g = grad_zq.to(wt);
    const int64_t K = basis.size(0), r = basis.size(1);
    // As in the tensor-core path, an index outside [0, K) makes the gradients NaN: no
    // out-of-range gather (index_select would raise a device-side assert, which ends
    // the process's CUDA context) and no host synchronisation to check the indices.
    const at::Tensor bad = (indices < 0).logical_or_(indices >= K);
    at::Tensor X = at::ones({indices.size(0), r + 1}, g.options());
    if (K > 0 && r > 0) {
      X.narrow(1, 0, r).copy_(basis.to(wt).index_select(0, indices.masked_fill(bad, 0)));
    }
    X.masked_fill_(bad.unsqueeze(1), std::numeric_limits<double>::quiet_NaN());
    const at::Tensor P = at::mm(g.t(), X);  // (d, r + 1): column r is grad_bias
    return {P.narrow(1, 0, r).contiguous(), P.select(1, r).contiguous()};
  }
  // fp32 gradients always use 3xTF32 (about fp32 accuracy), like the 'triton' backend.
  const Mma mode = mma_mode(wt, false, "weight");
  const at::Tensor g = grad_zq.to(wt).contiguous();
  const at::Tensor B = basis.to(wt).contiguous();
  const at::Tensor ix = indices.contiguous();
  const int64_t N = g.size(0), d = g.size(1), r = B.size(1), K = B.size(0);
  at::Tensor dW = at::empty({d, r}, weight.options());
  at::Tensor db = at::empty({d}, weight.options());
  if (N == 0 || d == 0) {
    dW.zero_();
    db.zero_();
    return {dW, db};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Tokens are split over blocks so that about 256 blocks run; a function of the shape
  // only (the partials are added in split order), and at most 256 MiB of partials.
  const int64_t tok = cuda::kChunkBytes / int64_t(g.element_size()) * 8;  // >= 8 chunks
  const int64_t tiles =
      ((d + cuda::kTileM - 1) / cuda::kTileM) * cuda::plan::backward_col_tiles(r);
  int64_t splits = std::max<int64_t>(1, (256 + tiles - 1) / tiles);
  splits = std::min<int64_t>(splits, (N + tok - 1) / tok);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t(1) << 26) / (d * (r + 1))));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  const int64_t per = (N + splits - 1) / splits;
  splits = (N + per - 1) / per;
  at::Tensor part = at::empty({splits, d, r + 1}, g.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_backward_partials(mode, g.data_ptr(), d, B.data_ptr(), r,
                                                ix.data_ptr<int64_t>(), N, K, d, r, int(splits),
                                                per, part.data_ptr<float>(), stream));
  const int out_dtype = wt == at::kFloat ? 0 : (wt == at::kBFloat16 ? 1 : 2);
  C10_CUDA_CHECK(cuda::launch_backward_finalize(part.data_ptr<float>(), int(splits), d, r,
                                                out_dtype, dW.data_ptr(), db.data_ptr(),
                                                stream));
  return {dW, db};
}

}  // namespace simvq

TORCH_LIBRARY_IMPL(simvq, CUDA, m) {
  m.impl("nearest_code", &simvq::nearest_code_cuda);
  m.impl("quantize", &simvq::quantize_cuda);
  m.impl("quantize_backward", &simvq::quantize_backward_cuda);
}
