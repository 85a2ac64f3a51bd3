// simvq-kernels: shared declarations for the C++ ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

// Argument checks in the style of flash-attention: short, and the message names
// the argument and says what to change.
#define SIMVQ_CHECK(cond, ...) TORCH_CHECK(cond, "simvq_kernels: ", __VA_ARGS__)
#define SIMVQ_CHECK_FLOAT(x)                                                     \
  SIMVQ_CHECK((x).is_floating_point(), "`" #x "` must be a floating-point tensor, got ", \
              (x).scalar_type())
#define SIMVQ_CHECK_DIM(x, n)                                                    \
  SIMVQ_CHECK((x).dim() == (n), "`" #x "` must be a ", n, "-D tensor, got shape ", \
              (x).sizes())
#define SIMVQ_CHECK_SAME_DEVICE(x, y)                                            \
  SIMVQ_CHECK((x).device() == (y).device(), "`" #x "` is on ", (x).device(),    \
              " but `" #y "` is on ", (y).device(), "; move both to one device")
#define SIMVQ_CHECK_SAME_DTYPE(x, y)                                             \
  SIMVQ_CHECK((x).scalar_type() == (y).scalar_type(), "`" #x "` has dtype ",    \
              (x).scalar_type(), " but `" #y "` has dtype ", (y).scalar_type(), \
              "; cast one of them")

namespace simvq {

// The checks every implementation of the schemas makes (ranks, dtypes, devices, widths,
// a non-empty codebook); each backend adds its own device kind and size limit.
inline void check_nearest_code_shapes(const at::Tensor& z, const at::Tensor& codebook) {
  SIMVQ_CHECK_DIM(z, 2);
  SIMVQ_CHECK_DIM(codebook, 2);
  SIMVQ_CHECK_FLOAT(z);
  SIMVQ_CHECK_SAME_DTYPE(z, codebook);
  SIMVQ_CHECK_SAME_DEVICE(z, codebook);
  SIMVQ_CHECK(z.size(1) == codebook.size(1), "width mismatch: `z` has d=", z.size(1),
              " but `codebook` has d=", codebook.size(1));
  SIMVQ_CHECK(codebook.size(0) >= 1, "`codebook` is empty (K=0); it needs at least one code");
}

inline void check_quantize_shapes(const at::Tensor& z, const at::Tensor& basis,
                                  const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  SIMVQ_CHECK_DIM(z, 2);
  SIMVQ_CHECK_DIM(basis, 2);
  SIMVQ_CHECK_DIM(weight, 2);
  SIMVQ_CHECK_FLOAT(z);
  SIMVQ_CHECK_SAME_DTYPE(z, basis);
  SIMVQ_CHECK_SAME_DTYPE(z, weight);
  SIMVQ_CHECK_SAME_DEVICE(z, basis);
  SIMVQ_CHECK_SAME_DEVICE(z, weight);
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
    SIMVQ_CHECK(b.size(0) == z.size(1), "`bias` must have d=", z.size(1), " elements, got ",
                b.size(0));
  }
}

// CPU implementations (csrc/cpu/nearest_code.cpp).
std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z,
                                                    const at::Tensor& codebook);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& z, const at::Tensor& basis, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> quantize_backward_cpu(const at::Tensor& grad_zq,
                                                         const at::Tensor& basis,
                                                         const at::Tensor& indices,
                                                         const at::Tensor& weight);

}  // namespace simvq
