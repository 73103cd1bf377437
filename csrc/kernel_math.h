// The radial kernels as functions of the squared distance D: value f(D) and derivative f'(D) = df/dD,
// averaged over a bandwidth list. This is the only place the kernel math lives in C++/CUDA; the
// CPU epilogue instantiates it on at::vec::Vectorized, the CUDA kernels on float/double.
//
// Semantics follow perturbdiff/ops/reference.py exactly:
//   rbf        f = mean_b exp(-D / (2 s_b^2))
//   laplacian  f = mean_b exp(-sqrt(max(D, 1e-8)) / s_b)
//   imq        f = mean_b (1 + D / s_b^2)^(-1/2)
//   energy     f = -sqrt(max(D, 1e-8))
// The square root is clamped like geomloss: value sqrt(1e-8) below the clamp and zero gradient
// there (torch's clamp_min passes the gradient where D >= clamp).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PD_HOST_DEVICE inline
#endif

namespace perturbdiff {

enum class Kernel : int { RBF = 0, Laplacian = 1, IMQ = 2, Energy = 3 };

constexpr int kMaxBandwidths = 16;
constexpr double kSqrtClamp = 1e-8;

// Squared distances by the norm expansion |a|^2 + |b|^2 - 2 a.b lose about eps (|a|^2 + |b|^2) to
// cancellation; below this fraction of |a|^2 + |b|^2 (1e5 eps) every backend recomputes D directly.
// Those pairs are (near-)duplicate cells, where the sqrt of laplacian/energy would magnify the error.
template <typename T>
PD_HOST_DEVICE constexpr T unresolved_distance_fraction() {
  return sizeof(T) == sizeof(float) ? T(1.1920929e-2) : T(2.220446049250313e-11);
}

// Per-bandwidth constants folded so the epilogue only multiplies and adds:
// rbf a_b = -1/(2 s^2), laplacian a_b = -1/s, imq a_b = 1/s^2 (energy has none).
template <typename T>
struct RadialParams {
  int count;
  T inv_count;
  T a[kMaxBandwidths];
};

// Scalar primitives. The CPU epilogue adds overloads with the same names for Vectorized<T>, so the
// formulas below are written once for both.
namespace math {
PD_HOST_DEVICE float vexp(float v) { return expf(v); }
PD_HOST_DEVICE double vexp(double v) { return exp(v); }
PD_HOST_DEVICE float vsqrt(float v) { return sqrtf(v); }
PD_HOST_DEVICE double vsqrt(double v) { return sqrt(v); }
PD_HOST_DEVICE float vrsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / sqrtf(v);
#endif
}
PD_HOST_DEVICE double vrsqrt(double v) { return 1.0 / sqrt(v); }
template <typename T>
PD_HOST_DEVICE T vmax(T a, T b) { return a > b ? a : b; }
// `value` where d >= threshold, else 0.
template <typename T>
PD_HOST_DEVICE T where_ge(T d, T threshold, T value) { return d >= threshold ? value : T(0); }
}  // namespace math

// |a - b|^2 from the Gram entry a.b and the squared norms by the norm expansion of
// evaluate/distribution.py, max((-2 a.b + |a|^2) + |b|^2, 0) (the evaluator's sparse kernels). V is a
// scalar or a SIMD vector type.
template <typename V>
PD_HOST_DEVICE V squared_distance(V gram, V sq_a, V sq_b) {
  return math::vmax(V(-2) * gram + sq_a + sq_b, V(0));
}

// f(D). V is a scalar or a SIMD vector type, T its element type.
template <Kernel K, typename V, typename T>
PD_HOST_DEVICE V radial_value(const RadialParams<T>& p, V d) {
  using namespace math;
  if constexpr (K == Kernel::Energy) {
    return V(T(0)) - vsqrt(vmax(d, V(T(kSqrtClamp))));
  } else {
    V r = d;
    if constexpr (K == Kernel::Laplacian) r = vsqrt(vmax(d, V(T(kSqrtClamp))));
    V acc(T(0));
    for (int b = 0; b < p.count; ++b) {
      if constexpr (K == Kernel::IMQ) {
        acc = acc + vrsqrt(V(T(1)) + d * V(p.a[b]));
      } else {
        acc = acc + vexp(r * V(p.a[b]));
      }
    }
    return acc * V(p.inv_count);
  }
}

// f(D) and f'(D) in one pass (the exponentials are shared).
template <Kernel K, typename V, typename T>
PD_HOST_DEVICE void radial_value_and_grad(const RadialParams<T>& p, V d, V& f, V& g) {
  using namespace math;
  const V clamp = V(static_cast<T>(kSqrtClamp));
  if constexpr (K == Kernel::Energy) {
    V r = vsqrt(vmax(d, clamp));
    f = V(T(0)) - r;
    g = where_ge(d, clamp, V(T(-0.5)) / r);
  } else if constexpr (K == Kernel::IMQ) {
    V fs(T(0)), gs(T(0));
    for (int b = 0; b < p.count; ++b) {
      V a(p.a[b]);
      V t = V(T(1)) + d * a;
      V s = vrsqrt(t);
      fs = fs + s;
      gs = gs + a * s / t;  // d/dD (1 + a D)^(-1/2) = -a/2 (1 + a D)^(-3/2)
    }
    f = fs * V(p.inv_count);
    g = gs * V(T(-0.5) * p.inv_count);
  } else {
    V r = d;
    if constexpr (K == Kernel::Laplacian) r = vsqrt(vmax(d, clamp));
    V fs(T(0)), gs(T(0));
    for (int b = 0; b < p.count; ++b) {
      V a(p.a[b]);
      V e = vexp(r * a);
      fs = fs + e;
      gs = gs + a * e;
    }
    f = fs * V(p.inv_count);
    if constexpr (K == Kernel::Laplacian) {
      // d/dD exp(a sqrt(D)) = a exp(a sqrt(D)) / (2 sqrt(D)); zero below the clamp.
      g = where_ge(d, clamp, gs * V(T(0.5) * p.inv_count) / r);
    } else {
      g = gs * V(p.inv_count);
    }
  }
}

// f'(D) alone (the backward by recomputation).
template <Kernel K, typename V, typename T>
PD_HOST_DEVICE V radial_grad(const RadialParams<T>& p, V d) {
  V f, g;
  radial_value_and_grad<K>(p, d, f, g);
  return g;
}

}  // namespace perturbdiff
