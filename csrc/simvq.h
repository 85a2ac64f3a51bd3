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
