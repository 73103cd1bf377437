// The CUDA epilogue: one thread block per row of a chunk of Gram matrices (cuBLAS made them), each
// thread striding over the columns; D from the norm expansion, f / f' from kernel_math.h, and a
// fixed-shape tree reduction in double per row (no atomics: results are reproducible).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "kernel_math.h"

namespace perturbdiff::cuda {

constexpr int kThreads = 256;

// A chunk of `sets` Gram matrices [R, C] (rows r0.. of each set) and where the per-set row and
// column data live. Per-set arrays are indexed (set0 + s) * stride + index; null weights mean 1.
template <typename T>
struct RowsArgs {
  T* gram;  // [sets, R, C]; overwritten with M in grad mode
  int64_t sets, R, C, set0, r0, rows_total;
  const T* row_norm;
  const T* col_norm;
  const T* row_w;
  const T* col_w;
  int64_t row_stride, col_stride;  // of norms and weights (rows / columns per set)
  const T* row_cells;              // centred cells [.., genes], to recompute unresolved distances
  const T* col_cells;
  int64_t genes;
  const T* coef;       // [B, 3] block coefficients, or null (all 1)
  int64_t split;       // rows / columns at or past this index are block 1 (y)
  bool self_pairs;     // row r0 + p and column p are the same cell
  bool exclude_diag;   // value mode: leave self-pairs out
  const T* set_scale;  // grad mode: per-set factor (upstream gradient), or null
  T scale;             // grad mode: constant factor
  T* saved;            // value mode: optional [B, rows_total, C] output of -c w_p w_q f'(D)
  double* row_out;     // [B, rows_total]: value: w_p sum_q c w_q f; grad: sum_q M_pq
};

template <typename T>
__device__ T direct_distance(const T* a, const T* b, int64_t genes) {
  double s = 0.0;
  for (int64_t k = 0; k < genes; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(b[k]);
    s += d * d;
  }
  return static_cast<T>(s);
}

// kGrad false: row sums of c w w f(D) (and the saved f' matrix); true: M = scale c w w f'(D) in place.
template <typename T, Kernel K, bool kGrad>
__global__ void __launch_bounds__(kThreads) rows_epilogue(RowsArgs<T> a, RadialParams<T> prm) {
  const int64_t s = blockIdx.x / a.R, p = blockIdx.x % a.R;
  const int64_t set = a.set0 + s, row = a.r0 + p;
  T* g = a.gram + (s * a.R + p) * a.C;
  const T np = a.row_norm[set * a.row_stride + row];
  const T wp = a.row_w ? a.row_w[set * a.row_stride + row] : T(1);
  const int row_block = row >= a.split;
  const T factor = a.scale * (a.set_scale ? a.set_scale[set] : T(1));
  double acc = 0.0;
  for (int64_t q = threadIdx.x; q < a.C; q += blockDim.x) {
    const bool self = a.self_pairs && q == row;
    const T nq = a.col_norm[set * a.col_stride + q];
    const T wq = a.col_w ? a.col_w[set * a.col_stride + q] : T(1);
    T d = self ? T(0) : math::vmax(np + nq - T(2) * g[q], T(0));
    // Zero-weight pairs (padding rows are all duplicates) contribute nothing: no recompute.
    if (!self && wp != T(0) && wq != T(0) && d < unresolved_distance_fraction<T>() * (np + nq)) {
      d = direct_distance(a.row_cells + (set * a.row_stride + row) * a.genes,
                          a.col_cells + (set * a.col_stride + q) * a.genes, a.genes);
    }
    const T c = a.coef ? a.coef[set * 3 + row_block + (q >= a.split)] : T(1);
    T f, fd;
    radial_value_and_grad<K>(prm, d, f, fd);
    if constexpr (kGrad) {
      const T m = self ? T(0) : factor * c * wp * wq * fd;
      g[q] = m;
      acc += m;
    } else {
      if (!(self && a.exclude_diag)) acc += static_cast<double>(c * wq * f);
      if (a.saved) a.saved[(set * a.rows_total + row) * a.C + q] = self ? T(0) : -c * wp * wq * fd;
    }
  }
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    a.row_out[set * a.rows_total + row] = kGrad ? partial[0] : static_cast<double>(wp) * partial[0];
  }
}

template <typename T, bool kGrad>
void launch_rows_epilogue(Kernel kernel, const RowsArgs<T>& a, const RadialParams<T>& prm) {
  const int64_t blocks = a.sets * a.R;
  if (blocks == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (kernel) {
    case Kernel::RBF: rows_epilogue<T, Kernel::RBF, kGrad><<<blocks, kThreads, 0, stream>>>(a, prm); break;
    case Kernel::Laplacian:
      rows_epilogue<T, Kernel::Laplacian, kGrad><<<blocks, kThreads, 0, stream>>>(a, prm);
      break;
    case Kernel::IMQ: rows_epilogue<T, Kernel::IMQ, kGrad><<<blocks, kThreads, 0, stream>>>(a, prm); break;
    case Kernel::Energy: rows_epilogue<T, Kernel::Energy, kGrad><<<blocks, kThreads, 0, stream>>>(a, prm); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(set0, sets, r0, rows) over chunks of a [B, rows, cols] Gram computation so that one
// chunk holds at most kGramBudget elements: several whole sets at a time, or row blocks of one set.
constexpr int64_t kGramBudget = int64_t(1) << 26;

template <typename Fn>
void for_each_chunk(int64_t B, int64_t rows, int64_t cols, const Fn& fn) {
  if (rows * cols <= kGramBudget) {
    const int64_t step = std::max<int64_t>(1, kGramBudget / std::max<int64_t>(1, rows * cols));
    for (int64_t b = 0; b < B; b += step) fn(b, std::min(step, B - b), int64_t(0), rows);
    return;
  }
  const int64_t step = std::max<int64_t>(1, kGramBudget / cols);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < rows; r += step) fn(b, int64_t(1), r, std::min(step, rows - r));
}

}  // namespace perturbdiff::cuda
