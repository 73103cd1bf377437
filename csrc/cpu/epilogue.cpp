// Vectorised tile epilogues (see epilogue.h). This file is compiled twice: as is (portable SIMD
// emulation of at::vec, namespace DEFAULT) and through avx2/epilogue_avx2.cpp with AVX2 + FMA.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include "cpu/epilogue.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/epilogue_dispatch.h"

namespace perturbdiff::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Sum of a vector's lanes in double (lane partial sums are short, the row total is not).
template <typename T>
double lane_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += lanes[i];
  return s;
}

// Self-pairs get D = 0 exactly: with G_pp = |a_p|^2 the expansion |a|^2 + |a|^2 - 2 G_pp is 0.
template <typename T>
void zero_self_distances(const Tile<T>& t) {
  if (!t.diagonal) return;
  for (int64_t p = 0; p < t.rows; ++p) t.gram[p * t.ld + p] = t.row_norm[p];
}

template <typename T>
constexpr T kRecomputeBelow = unresolved_distance_fraction<T>();

template <typename T>
T direct_distance(const T* a, const T* b, int64_t genes) {
  double s = 0.0;
  for (int64_t k = 0; k < genes; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(b[k]);
    s += d * d;
  }
  return static_cast<T>(s);
}

// D for lanes [q, q + n) of row p (n < size() only in the tail). Self-pairs (D = 0 exactly) and lanes
// with zero column weight (padding rows are all duplicates) are never recomputed.
template <typename T>
Vec<T> distances(const Tile<T>& t, int64_t p, const T* g, const Vec<T>& row_norm, int64_t q, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const bool full = n == W;
  Vec<T> gq = full ? Vec<T>::loadu(g + q) : Vec<T>::loadu(g + q, n);
  Vec<T> nq = full ? Vec<T>::loadu(t.col_norm + q) : Vec<T>::loadu(t.col_norm + q, n);
  Vec<T> d = at::vec::maximum(row_norm + nq - Vec<T>(T(2)) * gq, Vec<T>(T(0)));
  const Vec<T> unresolved = d < Vec<T>(kRecomputeBelow<T>) * (row_norm + nq);
  if (unresolved.zero_mask() == (1 << W) - 1) return d;  // the common case: no lane needs it
  T lanes[W];
  d.store(lanes);
  for (int64_t l = 0; l < n; ++l) {
    const bool self_pair = t.diagonal && q + l == p;  // D = 0 by construction
    const bool counts = t.col_w == nullptr || t.col_w[q + l] != T(0);
    if (!self_pair && counts && lanes[l] < kRecomputeBelow<T> * (t.row_norm[p] + t.col_norm[q + l])) {
      lanes[l] = direct_distance(t.row_cells + p * t.genes, t.col_cells + (q + l) * t.genes, t.genes);
    }
  }
  return Vec<T>::loadu(lanes);
}

template <typename T>
Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T, Kernel K>
double pair_sum_impl(const RadialParams<T>& prm, const Tile<T>& t, bool exclude_diag, T* saved,
                     int64_t ld_saved, T scale) {
  constexpr int64_t W = Vec<T>::size();
  zero_self_distances(t);
  const double self_value = static_cast<double>(radial_value<K, T, T>(prm, T(0)));
  double total = 0.0;
  for (int64_t p = 0; p < t.rows; ++p) {
    if (t.row_w[p] == T(0)) {  // contributes nothing (and its saved row is zero)
      if (saved != nullptr) std::fill(saved + p * ld_saved, saved + p * ld_saved + t.cols, T(0));
      continue;
    }
    const T* g = t.gram + p * t.ld;
    const Vec<T> np(t.row_norm[p]);
    Vec<T> acc(T(0));
    if (saved == nullptr) {
      for (int64_t q = 0; q < t.cols; q += W) {
        const int64_t n = std::min(W, t.cols - q);
        acc = acc + load(t.col_w + q, n) * radial_value<K>(prm, distances(t, p, g, np, q, n));
      }
    } else {
      T* s = saved + p * ld_saved;
      const Vec<T> sw(scale * t.row_w[p]);
      for (int64_t q = 0; q < t.cols; q += W) {
        const int64_t n = std::min(W, t.cols - q);
        Vec<T> f, d_f;
        radial_value_and_grad<K>(prm, distances(t, p, g, np, q, n), f, d_f);
        const Vec<T> wq = load(t.col_w + q, n);
        acc = acc + wq * f;
        (sw * wq * d_f).store(s + q, static_cast<int>(n));
      }
      if (t.diagonal) s[p] = T(0);
    }
    double row = lane_sum(acc);
    if (t.diagonal && exclude_diag) row -= static_cast<double>(t.col_w[p]) * self_value;
    total += static_cast<double>(t.row_w[p]) * row;
  }
  return total;
}

template <typename T, Kernel K>
void pair_grad_impl(const RadialParams<T>& prm, const Tile<T>& t, T scale, double* row_sum,
                    double* col_sum) {
  constexpr int64_t W = Vec<T>::size();
  zero_self_distances(t);
  for (int64_t p = 0; p < t.rows; ++p) {
    T* g = t.gram + p * t.ld;
    if (t.row_w[p] == T(0)) {
      std::fill(g, g + t.cols, T(0));
      continue;
    }
    const Vec<T> np(t.row_norm[p]);
    const Vec<T> sw(scale * t.row_w[p]);
    for (int64_t q = 0; q < t.cols; q += W) {
      const int64_t n = std::min(W, t.cols - q);
      const Vec<T> m = sw * load(t.col_w + q, n) * radial_grad<K>(prm, distances(t, p, g, np, q, n));
      m.store(g + q, static_cast<int>(n));
    }
    if (t.diagonal) g[p] = T(0);
    if (row_sum != nullptr) {
      double s = 0.0;
      for (int64_t q = 0; q < t.cols; ++q) s += g[q];
      row_sum[p] += s;
    }
    if (col_sum != nullptr) {
      for (int64_t q = 0; q < t.cols; ++q) col_sum[q] += g[q];
    }
  }
}

template <typename T, Kernel K>
void col_sum_impl(const RadialParams<T>& prm, const Tile<T>& t, double* col_sum) {
  constexpr int64_t W = Vec<T>::size();
  zero_self_distances(t);
  for (int64_t p = 0; p < t.rows; ++p) {
    T* g = t.gram + p * t.ld;
    if (t.row_w[p] == T(0)) continue;
    const Vec<T> np(t.row_norm[p]);
    const Vec<T> wp(t.row_w[p]);
    for (int64_t q = 0; q < t.cols; q += W) {
      const int64_t n = std::min(W, t.cols - q);
      (wp * radial_value<K>(prm, distances(t, p, g, np, q, n))).store(g + q, static_cast<int>(n));
    }
    for (int64_t q = 0; q < t.cols; ++q) col_sum[q] += g[q];
  }
}

// Squared norms are summed in vector lanes over blocks of kNormBlock values, the blocks in double:
// about as accurate as the BLAS Gram entries the norms are combined with, at SIMD speed.
constexpr int64_t kNormBlock = 256;

template <typename T>
void pack_centered(const T* src, const T* center, int64_t rows, int64_t genes, T* dst, T* norm) {
  constexpr int64_t W = Vec<T>::size();
  const bool with_norm = norm != nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * genes;
    T* out = dst + r * genes;
    double total = 0.0;
    for (int64_t k0 = 0; k0 < genes; k0 += kNormBlock) {
      const int64_t k1 = std::min(genes, k0 + kNormBlock);
      Vec<T> acc(T(0));
      for (int64_t k = k0; k < k1; k += W) {
        const int64_t n = std::min(W, k1 - k);
        const Vec<T> v = load(in + k, n) - load(center + k, n);  // tail lanes load as 0
        v.store(out + k, static_cast<int>(n));
        if (with_norm) acc = at::vec::fmadd(v, v, acc);
      }
      if (with_norm) total += lane_sum(acc);
    }
    if (with_norm) norm[r] = static_cast<T>(total);
  }
}

// Columns of out are taken kAddRowsBlock vectors at a time, accumulated in registers over all entries.
constexpr int64_t kAddRowsBlock = 8;

// add_rows over columns [j0, j0 + K W) and, when Partial, the r < W columns after them through the vector
// that ends at column n (n >= W; its first W - r lanes are counted already and kept): one pass over the
// entries with K (+ 1) independent accumulators. The columns past the last block of a row go this way
// rather than one vector per pass, which waits on each multiply-add (within_distance, whose rows have every
// length, took ~5 % longer so).
template <typename T, int64_t K, bool Partial>
void add_columns(const T* v, const int64_t* slot, int64_t count, const T* rows, int64_t ld, int64_t j0, int64_t n,
                 T* out) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t last = n - W;
  Vec<T> acc[K + Partial];
  for (int64_t b = 0; b < K; ++b) acc[b] = Vec<T>::loadu(out + j0 + b * W);
  if constexpr (Partial) acc[K] = Vec<T>(T(0));
  for (int64_t e = 0; e < count; ++e) {
    const Vec<T> ve(v[e]);
    const T* r = rows + slot[e] * ld;
    for (int64_t b = 0; b < K; ++b) acc[b] = at::vec::fmadd(ve, Vec<T>::loadu(r + j0 + b * W), acc[b]);
    if constexpr (Partial) acc[K] = at::vec::fmadd(ve, Vec<T>::loadu(r + last), acc[K]);
  }
  for (int64_t b = 0; b < K; ++b) acc[b].store(out + j0 + b * W);
  if constexpr (Partial) {
    const Vec<T> now = Vec<T>::loadu(out + last);
    Vec<T>::set(now + acc[K], now, j0 + K * W - last).store(out + last);
  }
}

// The columns [j0, n) left after the full blocks (fewer than kAddRowsBlock vectors): add_columns with K =
// their full vectors, chosen at run time.
template <typename T, int64_t K = 0>
void add_tail(const T* v, const int64_t* slot, int64_t count, const T* rows, int64_t ld, int64_t j0, int64_t n,
              T* out) {
  constexpr int64_t W = Vec<T>::size();
  if constexpr (K < kAddRowsBlock) {
    if ((n - j0) / W != K) return add_tail<T, K + 1>(v, slot, count, rows, ld, j0, n, out);
    if ((n - j0) % W != 0) return add_columns<T, K, true>(v, slot, count, rows, ld, j0, n, out);
    if constexpr (K > 0) add_columns<T, K, false>(v, slot, count, rows, ld, j0, n, out);
  }
}

template <typename T>
void add_rows(const T* v, const int64_t* slot, int64_t count, const T* rows, int64_t ld, int64_t n, T* out) {
  constexpr int64_t W = Vec<T>::size(), B = kAddRowsBlock;
  if (n < W) {  // shorter than one vector: column by column
    for (int64_t j = 0; j < n; ++j) {
      T total = out[j];
      for (int64_t e = 0; e < count; ++e) total += v[e] * rows[slot[e] * ld + j];
      out[j] = total;
    }
    return;
  }
  int64_t j = 0;
  for (; j + B * W <= n; j += B * W) add_columns<T, B, false>(v, slot, count, rows, ld, j, n, out);
  add_tail<T>(v, slot, count, rows, ld, j, n, out);
}

// Square roots are the cost here (several cycles each, vectorised or not): float64 rows go four lanes at a
// time, the last part through one partial vector (distance_to ~9 % faster than with a scalar sum); float32
// ones are summed one by one in double (their lanes would sum in float).
template <typename T>
double distance_sum(const T* gram, T sq_p, const T* sq_q, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    constexpr int64_t W = Vec<T>::size();
    const Vec<T> row(sq_p), zero(T(0));
    const auto root = [&](int64_t at, int64_t lanes) {
      return squared_distance(load(gram + at, lanes), row, load(sq_q + at, lanes)).sqrt();
    };
    Vec<T> acc[2] = {zero, zero};  // two chains: the adds wait on the roots less
    int64_t q = 0;
    for (; q + 2 * W <= n; q += 2 * W) {
      acc[0] = acc[0] + root(q, W);
      acc[1] = acc[1] + root(q + W, W);
    }
    for (; q < n; q += W) {
      const int64_t lanes = std::min(W, n - q);
      acc[0] = acc[0] + Vec<T>::set(zero, root(q, lanes), lanes);  // lanes past n count 0
    }
    return lane_sum(acc[0] + acc[1]);
  } else {
    double total = 0.0;
    for (int64_t q = 0; q < n; ++q) total += std::sqrt(static_cast<double>(squared_distance(gram[q], sq_p, sq_q[q])));
    return total;
  }
}

// Run-time kernel -> compile-time template instance.
#define PD_KERNEL_SWITCH(kernel, IMPL, ...)                                 \
  switch (kernel) {                                                          \
    case Kernel::RBF: return IMPL<T, Kernel::RBF>(__VA_ARGS__);              \
    case Kernel::Laplacian: return IMPL<T, Kernel::Laplacian>(__VA_ARGS__);  \
    case Kernel::IMQ: return IMPL<T, Kernel::IMQ>(__VA_ARGS__);              \
    case Kernel::Energy: return IMPL<T, Kernel::Energy>(__VA_ARGS__);        \
  }

template <typename T>
double pair_sum(Kernel k, const RadialParams<T>& prm, const Tile<T>& t, bool exclude_diag, T* saved,
                int64_t ld_saved, T scale) {
  PD_KERNEL_SWITCH(k, pair_sum_impl, prm, t, exclude_diag, saved, ld_saved, scale)
  return 0.0;
}

template <typename T>
void pair_grad(Kernel k, const RadialParams<T>& prm, const Tile<T>& t, T scale, double* row_sum,
               double* col_sum) {
  PD_KERNEL_SWITCH(k, pair_grad_impl, prm, t, scale, row_sum, col_sum)
}

template <typename T>
void col_sum(Kernel k, const RadialParams<T>& prm, const Tile<T>& t, double* out) {
  PD_KERNEL_SWITCH(k, col_sum_impl, prm, t, out)
}
#undef PD_KERNEL_SWITCH

}  // namespace

const EpilogueTable<float>& epilogue_float() {
  static const EpilogueTable<float> table{&pair_sum<float>, &pair_grad<float>, &col_sum<float>,
                                          &pack_centered<float>, &add_rows<float>,
                                          &distance_sum<float>};
  return table;
}

const EpilogueTable<double>& epilogue_double() {
  static const EpilogueTable<double> table{&pair_sum<double>, &pair_grad<double>, &col_sum<double>,
                                           &pack_centered<double>, &add_rows<double>,
                                           &distance_sum<double>};
  return table;
}

}  // namespace perturbdiff::cpu::CPU_CAPABILITY
