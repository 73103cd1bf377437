// CPU kernel of perturbdiff::distance_to: each cell's mean Euclidean distance to the cells of a
// reference set, E_c |x - c| of cell-eval's e-distance (the reference being the control cells).
// Cells are rows of [S | D] as in within_distance (S sparse genes as CSR, D dense genes); the
// reference comes as its sparse part transposed (CSR [genes, m], the right operand of Gustavson's
// product), its dense part [m, d] and its squared norms.
//
// Blocks of rows: a block's Gram rows against the whole reference are its dense part times the
// reference's (at::mm) plus the sparse products (into the same rows, one column tile of csr.h's after
// another so that the reference rows a tile reads stay in L2; Gustavson's for the reference's sparse
// genes, the epilogue table's add_rows for the genes stored in a large fraction of its cells), reduced
// at once to distance sums by the norm expansion of evaluate/distribution.py; the Gram block (kBlockRows x m)
// stays in L2 and is never handed back. Row sums in double; threads own disjoint rows, so the
// result is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "cpu/csr.h"

namespace perturbdiff::cpu {
namespace {

constexpr int64_t kBlockRows = 256;

at::Tensor distance_to_cpu(const at::Tensor& ptr_, const at::Tensor& idx_, const at::Tensor& val_,
                           const at::Tensor& dense_, const at::Tensor& sq_, const at::Tensor& ref_ptr_,
                           const at::Tensor& ref_idx_, const at::Tensor& ref_val_, const at::Tensor& ref_dense_,
                           const at::Tensor& ref_sq_) {
  for (const at::Tensor* t : {&ptr_, &idx_, &val_, &sq_, &ref_ptr_, &ref_idx_, &ref_val_, &ref_sq_})
    TORCH_CHECK_VALUE(t->dim() == 1, "distance_to: the CSR parts and squared norms must be 1-d, got ", t->sizes());
  TORCH_CHECK_VALUE(ptr_.size(0) >= 1 && ref_ptr_.size(0) >= 1, "distance_to: row pointers need at least one entry");
  TORCH_CHECK_VALUE(idx_.size(0) == val_.size(0) && ref_idx_.size(0) == ref_val_.size(0),
                    "distance_to: column indices and values differ in length");
  const int64_t n = ptr_.size(0) - 1, cols = ref_ptr_.size(0) - 1, m = ref_sq_.size(0);
  TORCH_CHECK_VALUE(sq_.size(0) == n, "distance_to: sq must hold one squared norm per cell (", n, "), got ",
                    sq_.size(0));
  TORCH_CHECK_VALUE(dense_.dim() == 2 && dense_.size(0) == n, "distance_to: dense must be [", n,
                    ", genes] (one row per cell), got ", dense_.sizes());
  TORCH_CHECK_VALUE(ref_dense_.dim() == 2 && ref_dense_.size(0) == m && ref_dense_.size(1) == dense_.size(1),
                    "distance_to: ref_dense must be [", m, ", ", dense_.size(1),
                    "] (one row per reference cell, the cells' dense genes), got ", ref_dense_.sizes());
  const auto type = val_.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble, "distance_to: values must be float32 or float64, got ",
                   type);
  for (const at::Tensor* t : {&dense_, &sq_, &ref_val_, &ref_dense_, &ref_sq_})
    TORCH_CHECK_TYPE(t->scalar_type() == type, "distance_to: every value tensor must be ", type, ", got ",
                     t->scalar_type());
  const auto index_type = csr_index_type("distance_to", {&ptr_, &idx_, &ref_ptr_, &ref_idx_});
  const at::Tensor ptr = ptr_.contiguous(), idx = idx_.contiguous(), val = val_.contiguous(),
                   dense = dense_.contiguous(), sq = sq_.contiguous(), ref_ptr = ref_ptr_.contiguous(),
                   ref_idx = ref_idx_.contiguous(), ref_val = ref_val_.contiguous(),
                   ref_dense = ref_dense_.contiguous(), ref_sq = ref_sq_.contiguous();
  at::Tensor out = at::empty({n}, val.options());

  AT_DISPATCH_INDEX_TYPES(index_type, "distance_to", [&] {
    const index_t *pp = ptr.data_ptr<index_t>(), *ip = idx.data_ptr<index_t>(), *rpp = ref_ptr.data_ptr<index_t>(),
                  *rip = ref_idx.data_ptr<index_t>();
    check_csr("distance_to", "the cells' sparse part", pp, n, ip, idx.size(0), cols);
    check_csr("distance_to", "the reference's transposed sparse part", rpp, cols, rip, ref_idx.size(0), m);
    const int64_t tile = tile_columns(pp, n, ip, cols);
    AT_DISPATCH_FLOATING_TYPES(type, "distance_to", [&] {
      const scalar_t *vp = val.data_ptr<scalar_t>(), *rvp = ref_val.data_ptr<scalar_t>();
      const scalar_t *sqp = sq.data_ptr<scalar_t>(), *rsq = ref_sq.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const DenseRows<scalar_t> ref_rows(rpp, rip, rvp, cols, m);
      // Blocks handed out one at a time: cells differ in stored values (cell types, perturbations), so an
      // even split of the rows leaves one thread with most of the work.
      const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        RowTiles<index_t> tiles;
        SplitEntries<scalar_t, index_t> split;
        for (int64_t b = next++; b < blocks; b = next++) {
          const int64_t r0 = b * kBlockRows, r1 = std::min(r0 + kBlockRows, n);
          at::Tensor gram = dense_gram(dense.narrow(0, r0, r1 - r0), ref_dense);
          scalar_t* g = gram.data_ptr<scalar_t>();
          tiles.start(pp, ip, r0, r1);
          for (int64_t g0 = 0; g0 < cols; g0 += tile)
            for (int64_t p = r0; p < r1; ++p)
              add_product_row(ip, vp, tiles.take(p, g0 + tile), rpp, rip, rvp, ref_rows, split,
                              g + (p - r0) * m);
          for (int64_t p = r0; p < r1; ++p) {
            const double total = distance_sum(g + (p - r0) * m, sqp[p], rsq, m);
            op[p] = static_cast<scalar_t>(m > 0 ? total / static_cast<double>(m) : std::nan(""));
          }
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("distance_to", &perturbdiff::cpu::distance_to_cpu); }
