// The tile epilogues of the CPU engine: turn a Gram tile G = A B^T of centred rows into squared
// distances and reduce f(D) (or build f'(D) matrices) in one vectorised pass over all bandwidths.
//
// Compiled once per CPU capability (epilogue.cpp, avx2/epilogue_avx2.cpp) into the namespace
// perturbdiff::cpu::<capability>; epilogue_dispatch.h picks one at run time.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

// SIMD overloads of kernel_math.h's primitives. They must be declared before kernel_math.h so its
// templates find them (the formulas there are written once for scalars and vectors).
namespace perturbdiff::math {
template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& v) { return v.exp(); }
template <typename T>
inline at::vec::Vectorized<T> vsqrt(const at::vec::Vectorized<T>& v) { return v.sqrt(); }
template <typename T>
inline at::vec::Vectorized<T> vrsqrt(const at::vec::Vectorized<T>& v) { return v.rsqrt(); }
template <typename T>
inline at::vec::Vectorized<T> vmax(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline at::vec::Vectorized<T> where_ge(const at::vec::Vectorized<T>& d, const at::vec::Vectorized<T>& t,
                                       const at::vec::Vectorized<T>& value) {
  return at::vec::Vectorized<T>::blendv(at::vec::Vectorized<T>(T(0)), value, d >= t);
}
}  // namespace perturbdiff::math

#include "kernel_math.h"

namespace perturbdiff::cpu {

// One Gram tile: rows x cols, row-major with leading dimension ld, overwritten by the epilogue.
template <typename T>
struct Tile {
  T* gram;
  int64_t rows, cols, ld;
  const T* row_norm;  // |a_p|^2
  const T* col_norm;  // |b_q|^2
  const T* row_w;     // per-row weights
  const T* col_w;     // per-column weights (null: all ones)
  bool diagonal;      // rows and columns are the same cells: (p, p) is a self-pair, D = 0 exactly
  const T* row_cells;  // the packed (centred) rows [rows, genes] and columns [cols, genes], used to
  const T* col_cells;  // recompute distances the norm expansion cannot resolve (near-duplicates)
  int64_t genes;
};

// Entry points of one capability's epilogue (kernel chosen at run time, templates inside).
template <typename T>
struct EpilogueTable {
  // Returns sum_p w_p sum_q w_q f(D_pq), self-pairs left out when exclude_diag. When saved is not
  // null, also writes saved[p * ld_saved + q] = scale w_p w_q f'(D_pq) (self-pairs 0).
  double (*pair_sum)(Kernel, const RadialParams<T>&, const Tile<T>&, bool exclude_diag, T* saved,
                     int64_t ld_saved, T scale);
  // Overwrites the tile with M_pq = scale w_p w_q f'(D_pq) (self-pairs 0) and adds its row and column
  // sums into row_sum / col_sum (either may be null).
  void (*pair_grad)(Kernel, const RadialParams<T>&, const Tile<T>&, T scale, double* row_sum,
                    double* col_sum);
  // col_sum[q] += sum_p w_p f(D_pq) (kernel mean embeddings).
  void (*col_sum)(Kernel, const RadialParams<T>&, const Tile<T>&, double* col_sum);
  // dst[r] = src[r] - center for rows [0, rows) of [rows, genes] matrices, norm[r] = |dst[r]|^2 (norm
  // may be null: no norms).
  void (*pack_centered)(const T* src, const T* center, int64_t rows, int64_t genes, T* dst, T* norm);
  // out[j] += sum_e v[e] rows[slot[e] * ld + j] for j < n: a sparse row's entries in the densified rows
  // of the other operand (csr.h's DenseRows), each output loaded and stored once.
  void (*add_rows)(const T* v, const int64_t* slot, int64_t count, const T* rows, int64_t ld, int64_t n, T* out);
  // sum_q sqrt(max((-2 gram[q] + sq_p) + sq_q[q], 0)) over q < n, in double: a Gram row's Euclidean
  // distances summed (kernel_math.h's squared_distance).
  double (*distance_sum)(const T* gram, T sq_p, const T* sq_q, int64_t n);
};

}  // namespace perturbdiff::cpu
