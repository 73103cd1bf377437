// Argument parsing and validation shared by the CPU and CUDA kernels of the perturbdiff:: ops.
// The Python API validates user input first; these checks guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>

#include "kernel_math.h"

namespace perturbdiff {

inline Kernel parse_kernel(const std::string& name) {
  if (name == "rbf") return Kernel::RBF;
  if (name == "laplacian") return Kernel::Laplacian;
  if (name == "imq") return Kernel::IMQ;
  if (name == "energy") return Kernel::Energy;
  TORCH_CHECK_VALUE(false, "perturbdiff: unknown kernel '", name,
                    "'; expected one of rbf, laplacian, imq, energy");
}

template <typename T>
RadialParams<T> radial_params(Kernel kernel, c10::ArrayRef<double> bandwidths) {
  TORCH_CHECK_VALUE(!bandwidths.empty() && bandwidths.size() <= static_cast<size_t>(kMaxBandwidths),
                    "perturbdiff: between 1 and ", kMaxBandwidths, " bandwidths are supported, got ",
                    bandwidths.size());
  RadialParams<T> p{};
  p.count = kernel == Kernel::Energy ? 1 : static_cast<int>(bandwidths.size());
  p.inv_count = T(1) / T(p.count);
  for (int b = 0; b < p.count; ++b) {
    const double s = bandwidths[b];
    TORCH_CHECK_VALUE(s > 0 && s < INFINITY, "perturbdiff: bandwidths must be positive and finite, got ", s);
    switch (kernel) {
      case Kernel::RBF: p.a[b] = static_cast<T>(-0.5 / (s * s)); break;
      case Kernel::Laplacian: p.a[b] = static_cast<T>(-1.0 / s); break;
      case Kernel::IMQ: p.a[b] = static_cast<T>(1.0 / (s * s)); break;
      case Kernel::Energy: p.a[b] = T(0); break;
    }
  }
  return p;
}

inline void check_shape(const at::Tensor& t, const char* name, c10::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "perturbdiff: ", name, " must have shape ", expected,
                    ", got ", t.sizes());
}

// Shapes, dtypes and devices of pairwise_mmd / pairwise_mmd_backward's tensor arguments.
inline void check_pairwise_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xw,
                                const at::Tensor& yw, const at::Tensor& coef, const at::Tensor& center) {
  TORCH_CHECK_VALUE(x.dim() == 3 && y.dim() == 3, "perturbdiff: x and y must be [B, S, G], got ",
                    x.sizes(), " and ", y.sizes());
  const int64_t B = x.size(0), G = x.size(2);
  TORCH_CHECK_VALUE(y.size(0) == B && y.size(2) == G, "perturbdiff: y ", y.sizes(),
                    " does not match x ", x.sizes(), " in sets or genes");
  TORCH_CHECK_VALUE(x.size(1) > 0 && y.size(1) > 0, "perturbdiff: empty set");
  check_shape(xw, "xw", {B, x.size(1)});
  check_shape(yw, "yw", {B, y.size(1)});
  check_shape(coef, "coef", {B, 3});
  check_shape(center, "center", {B, G});
  for (const at::Tensor* t : {&y, &xw, &yw, &coef, &center}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "perturbdiff: all tensors must be ",
                     x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "perturbdiff: all tensors must be on ", x.device(),
                      ", got ", t->device());
  }
}

// Shapes, dtypes and devices of kme / kme_backward's tensor arguments.
inline void check_kme_args(const at::Tensor& x, const at::Tensor& xw, const at::Tensor& z,
                           const at::Tensor& center) {
  TORCH_CHECK_VALUE(x.dim() == 3 && z.dim() == 3, "perturbdiff: x and z must be [B, S, G], got ",
                    x.sizes(), " and ", z.sizes());
  const int64_t B = x.size(0), G = x.size(2);
  TORCH_CHECK_VALUE(z.size(0) == B && z.size(2) == G, "perturbdiff: z ", z.sizes(),
                    " does not match x ", x.sizes(), " in sets or genes");
  check_shape(xw, "xw", {B, x.size(1)});
  check_shape(center, "center", {B, G});
  for (const at::Tensor* t : {&xw, &z, &center}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "perturbdiff: all tensors must be ",
                     x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "perturbdiff: all tensors must be on ", x.device(),
                      ", got ", t->device());
  }
}

}  // namespace perturbdiff
