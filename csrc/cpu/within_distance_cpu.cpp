// CPU kernel of perturbdiff::within_distance: the mean Euclidean distance over all pairs of cells
// within each segment (a perturbation's cells), E|x - x'| of cell-eval's e-distance, and every
// cell's squared norm. Cells are rows of [S | D]: a CSR part S [n, cols] (the evaluator's sparse
// genes) and a dense part D [n, d] (its genes stored in most cells), so that each segment's Gram
// matrix G = S_s S_s^T + D_s D_s^T costs one small GEMM plus scattered multiply-adds over stored
// values only.
//
// Per segment, on one thread: D_s D_s^T by at::mm; a local column-major copy of S_s (counting sort,
// rows ascending within each column); then Gustavson's product for the upper triangle only: row p
// adds v * S[q, k] for the stored (k, v) of row p and the stored S[q, k] with q >= p, found from a
// per-column cursor that only moves forward (rows are visited in order), so duplicate column
// indices in a row are summed like the dense matrix's. Distances follow the norm expansion of
// evaluate/distribution.py: D_pq = max((-2 G_pq + |p|^2) + |q|^2, 0), self-pairs 0; each unordered
// pair counts twice, summed in double in a fixed order (reproducible).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/csr.h"

namespace perturbdiff::cpu {
namespace {

template <typename scalar_t, typename index_t>
double segment_mean_distance(const index_t* ptr, const index_t* idx, const scalar_t* val, const at::Tensor& dense,
                             int64_t a, int64_t b, int64_t cols, scalar_t* sq_out) {
  const int64_t n = b - a;
  if (n == 0) return std::nan("");
  // Upper triangle (and diagonal) of the segment's Gram matrix, starting from the dense genes' part.
  at::Tensor gram = dense.size(1) > 0 ? at::mm(dense.narrow(0, a, n), dense.narrow(0, a, n).t()).contiguous()
                                      : at::zeros({n, n}, dense.options());
  scalar_t* g = gram.data_ptr<scalar_t>();

  // Column-major copy of the segment's stored values: rows (local) and values per column.
  const index_t base = ptr[a];
  const int64_t nnz = ptr[b] - base;
  std::vector<int64_t> col_ptr(cols + 1, 0);
  for (int64_t e = base; e < base + nnz; ++e) ++col_ptr[idx[e] + 1];
  for (int64_t k = 0; k < cols; ++k) col_ptr[k + 1] += col_ptr[k];
  std::vector<int64_t> cursor(col_ptr.begin(), col_ptr.end() - 1);
  std::vector<int64_t> col_row(nnz);
  std::vector<scalar_t> col_val(nnz);
  for (int64_t p = 0; p < n; ++p) {
    for (index_t e = ptr[a + p]; e < ptr[a + p + 1]; ++e) {
      const int64_t slot = cursor[idx[e]]++;
      col_row[slot] = p;
      col_val[slot] = val[e];
    }
  }
  // cursor[k]: the first entry of column k whose row is >= the current row.
  std::copy(col_ptr.begin(), col_ptr.end() - 1, cursor.begin());
  for (int64_t p = 0; p < n; ++p) {
    scalar_t* row = g + p * n;
    for (index_t e = ptr[a + p]; e < ptr[a + p + 1]; ++e) {
      const int64_t k = idx[e];
      const int64_t end = col_ptr[k + 1];
      int64_t q = cursor[k];
      while (q < end && col_row[q] < p) ++q;
      cursor[k] = q;
      const scalar_t v = val[e];
      for (; q < end; ++q) row[col_row[q]] += v * col_val[q];
    }
  }
  for (int64_t p = 0; p < n; ++p) sq_out[a + p] = g[p * n + p];

  const scalar_t* sq = sq_out + a;
  double total = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    const scalar_t* row = g + p * n;
    double acc = 0.0;
    for (int64_t q = p + 1; q < n; ++q) {
      const scalar_t d = scalar_t(-2) * row[q] + sq[p] + sq[q];
      acc += std::sqrt(static_cast<double>(d > scalar_t(0) ? d : scalar_t(0)));
    }
    total += acc;
  }
  return 2.0 * total / (static_cast<double>(n) * static_cast<double>(n));
}

std::tuple<at::Tensor, at::Tensor> within_distance_cpu(const at::Tensor& ptr_, const at::Tensor& idx_,
                                                       const at::Tensor& val_, const at::Tensor& dense_,
                                                       const at::Tensor& offsets_, int64_t cols) {
  for (const at::Tensor* t : {&ptr_, &idx_, &val_, &offsets_})
    TORCH_CHECK_VALUE(t->dim() == 1, "within_distance: ptr, idx, val and offsets must be 1-d, got ", t->sizes());
  TORCH_CHECK_VALUE(ptr_.size(0) >= 1, "within_distance: row pointers need at least one entry");
  TORCH_CHECK_VALUE(idx_.size(0) == val_.size(0), "within_distance: column indices and values differ in length");
  TORCH_CHECK_VALUE(cols >= 0, "within_distance: cols must be >= 0, got ", cols);
  const int64_t n = ptr_.size(0) - 1;
  TORCH_CHECK_VALUE(dense_.dim() == 2 && dense_.size(0) == n, "within_distance: dense must be [", n,
                    ", genes] (one row per cell), got ", dense_.sizes());
  TORCH_CHECK_TYPE(offsets_.scalar_type() == at::kLong, "within_distance: offsets must be int64");
  TORCH_CHECK_TYPE(val_.scalar_type() == dense_.scalar_type() &&
                       (val_.scalar_type() == at::kFloat || val_.scalar_type() == at::kDouble),
                   "within_distance: val and dense must both be float32 or both float64, got ",
                   val_.scalar_type(), " and ", dense_.scalar_type());
  const auto index_type = csr_index_type("within_distance", {&ptr_, &idx_});
  const at::Tensor ptr = ptr_.contiguous(), idx = idx_.contiguous(), val = val_.contiguous(),
                   dense = dense_.contiguous(), offsets = offsets_.contiguous();
  const int64_t segments = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(segments >= 0, "within_distance: offsets need at least one entry");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[segments] == n, "within_distance: offsets must run from 0 to the ",
                    "number of cells (", n, "), got ", off[0], " to ", off[segments]);
  for (int64_t s = 0; s < segments; ++s)
    TORCH_CHECK_VALUE(off[s] <= off[s + 1], "within_distance: offsets decrease at segment ", s);

  at::Tensor mean = at::empty({segments}, val.options());
  at::Tensor sq = at::empty({n}, val.options());
  AT_DISPATCH_INDEX_TYPES(index_type, "within_distance", [&] {
    const index_t *pp = ptr.data_ptr<index_t>(), *ip = idx.data_ptr<index_t>();
    check_csr("within_distance", "the sparse part", pp, n, ip, idx.size(0), cols);
    AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "within_distance", [&] {
      const scalar_t* vp = val.data_ptr<scalar_t>();
      scalar_t *mp = mean.data_ptr<scalar_t>(), *sp = sq.data_ptr<scalar_t>();
      // One segment per task: segments own disjoint rows of sq and entries of mean.
      at::parallel_for(0, segments, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s)
          mp[s] = static_cast<scalar_t>(
              segment_mean_distance<scalar_t, index_t>(pp, ip, vp, dense, off[s], off[s + 1], cols, sp));
      });
    });
  });
  return {mean, sq};
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("within_distance", &perturbdiff::cpu::within_distance_cpu); }
