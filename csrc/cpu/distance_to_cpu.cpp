// CPU kernel of perturbdiff::distance_to: each cell's mean Euclidean distance to the cells of a
// reference set, E_c |x - c| of cell-eval's e-distance (the reference being the control cells).
// Cells are rows of [S | D] as in within_distance (S sparse genes as CSR, D dense genes); the
// reference comes as its sparse part transposed (CSR [genes, m], the right operand of Gustavson's
// product), its dense part [m, d] and its squared norms.
//
// Blocks of rows: a block's Gram rows against the whole reference are its dense part times the
// reference's (at::mm) plus the sparse products (into the same rows, one column tile of csr.h's after
// another so that the reference rows a tile reads stay in L2; Gustavson's for the reference's sparse
// genes, the epilogue table's add_rows for the genes stored in a large fraction of its cells; genes
// stored in more of the cells than of the reference go by the reference's values, ReferenceSide), reduced
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

// The genes of the sparse part whose products go by the reference's stored values rather than the
// cells': those stored in more of the cells than of the reference cells (a model's predictions are
// often stored nearly everywhere, the controls they meet are not). The cells' values in them are copied
// dense, gene-major, kCells cells at a time, and each reference cell's entries in them add those rows
// (the epilogue table's add_rows) into a [m, kCells] block, added transposed to the Gram rows: cost ~
// stored reference values x cells instead of stored cell values x reference cells (or Gustavson's
// scattered multiply-adds). Chosen per gene by the cost rule of csr.h's DenseRows (costs in dense-row
// multiply-adds per pair of cells: a stored value meeting a dense row costs 1, a scattered pair
// kScatterCost) plus the copy's cost, and only when they save at least kMinShare of the call's products
// (the transposed block and the calls per tile cost a few cycles per pair of cells: at 2,000 and 18,080
// genes the evaluator's real cells, which would save 1-4 %, ran up to 10 % slower with it; its predicted
// cells, which save ~14 %, ran 10-20 % faster). The choice steers the cost only: values equal either way
// to rounding.
template <typename scalar_t, typename index_t>
class ReferenceSide {
 public:
  static constexpr int64_t kCells = 32;          // one register block of add_rows (float64)
  static constexpr int64_t kCopyGenes = 2048;    // genes per tile of the copy: 512 KB of float64, in L2
  static constexpr int64_t kDensityRows = 1024;  // cells the densities are estimated from
  static constexpr double kScatterCost = 1.0 / kDenseRowFraction;  // DenseRows' break-even
  static constexpr double kCopyCost = 32.0;   // per stored cell value copied and cleared, over m pairs
  static constexpr double kMinShare = 0.05;

  // Scratch of one thread.
  struct Scratch {
    std::vector<scalar_t> copy, acc;
    RowTiles<index_t> rows;
  };

  // pp, ip: the cells' sparse part (n rows); rpp, rip, rvp: the reference's, transposed ([cols, m]);
  // dense_genes: the genes of the dense parts (multiplied by at::mm); tile: csr.h's column tile of the
  // cells (>= cols: their rows are walked whole).
  ReferenceSide(const index_t* pp, const index_t* ip, int64_t n, const index_t* rpp, const index_t* rip,
                const scalar_t* rvp, int64_t cols, int64_t m, int64_t dense_genes, int64_t tile)
      : m_(m), chosen_(cols, 0), slot_(cols, 0) {
    if (n == 0 || m == 0) return;
    const int64_t rows = std::min(n, kDensityRows);
    std::vector<int64_t> stored(cols, 0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = i * n / rows;  // evenly spaced
      for (index_t e = pp[p]; e < pp[p + 1]; ++e) ++stored[ip[e]];
    }
    double saving = 0.0, total = static_cast<double>(dense_genes);
    int64_t count = 0;
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t ref_stored = rpp[k + 1] - rpp[k];
      const double dx = static_cast<double>(stored[k]) / static_cast<double>(rows);
      const double dr = static_cast<double>(ref_stored) / static_cast<double>(m);
      const double now = dense_enough(ref_stored, m) ? dx : kScatterCost * dx * dr;
      const double gain = now - dr - kCopyCost * dx / static_cast<double>(m);
      chosen_[k] = gain > 0.0;
      saving += chosen_[k] ? gain : 0.0;
      total += now;
      count += chosen_[k];
    }
    if (count == 0 || saving < kMinShare * total) {
      std::fill(chosen_.begin(), chosen_.end(), 0);
      return;
    }
    // Tiles of consecutive columns with at most kCopyGenes chosen genes each (one tile when the cells'
    // rows are walked whole); slot_: a chosen gene's row in its tile's copy, the others one scratch row
    // past them all.
    capacity_ = tile >= cols ? count : std::min(count, kCopyGenes);
    for (int64_t k = 0, in_tile = 0; k < cols; ++k) {
      if (!chosen_[k]) {
        slot_[k] = capacity_;
        continue;
      }
      if (in_tile == capacity_) {
        tile_end_.push_back(k);
        in_tile = 0;
      }
      slot_[k] = in_tile++;
    }
    tile_end_.push_back(cols);
    // The reference's entries in the chosen genes by (reference cell, tile), genes ascending.
    const int64_t tiles = static_cast<int64_t>(tile_end_.size());
    ptr_.assign(m * tiles + 1, 0);
    for (int64_t k = 0, t = 0; k < cols; ++k) {
      t += k == tile_end_[t];
      if (chosen_[k])
        for (index_t e = rpp[k]; e < rpp[k + 1]; ++e) ++ptr_[rip[e] * tiles + t + 1];
    }
    for (size_t i = 1; i < ptr_.size(); ++i) ptr_[i] += ptr_[i - 1];
    val_.resize(ptr_.back());
    entry_slot_.resize(ptr_.back());
    std::vector<int64_t> cursor(ptr_.begin(), ptr_.end() - 1);
    for (int64_t k = 0, t = 0; k < cols; ++k) {
      t += k == tile_end_[t];
      if (chosen_[k])
        for (index_t e = rpp[k]; e < rpp[k + 1]; ++e) {
          const int64_t at = cursor[rip[e] * tiles + t]++;
          val_[at] = rvp[e];
          entry_slot_[at] = slot_[k];
        }
    }
  }

  // The chosen genes (DenseRows' `elsewhere`), null when there are none.
  const uint8_t* chosen() const { return capacity_ > 0 ? chosen_.data() : nullptr; }

  // gram[(p - r0) * m + q] += sum over the chosen genes k of X[p, k] R[q, k], for rows p in [r0, r1).
  void add(const index_t* pp, const index_t* ip, const scalar_t* vp, int64_t r0, int64_t r1, Scratch& s,
           scalar_t* gram) const {
    if (capacity_ == 0) return;
    s.copy.resize((capacity_ + 1) * kCells, scalar_t(0));  // zeros between uses
    s.acc.resize(m_ * kCells);
    const int64_t tiles = static_cast<int64_t>(tile_end_.size());
    for (int64_t c0 = r0; c0 < r1; c0 += kCells) {
      const int64_t w = std::min(kCells, r1 - c0);
      std::fill(s.acc.begin(), s.acc.end(), scalar_t(0));
      s.rows.start(pp, ip, c0, c0 + w);
      for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t p = c0; p < c0 + w; ++p) {  // branch-free: other genes land in the scratch row
          const auto [first, next] = s.rows.take(p, tile_end_[t]);
          for (index_t e = first; e < next; ++e) s.copy[slot_[ip[e]] * kCells + (p - c0)] += vp[e];
        }
        for (int64_t q = 0; q < m_; ++q) {
          const int64_t a = ptr_[q * tiles + t], b = ptr_[q * tiles + t + 1];
          epilogue<scalar_t>().add_rows(val_.data() + a, entry_slot_.data() + a, b - a, s.copy.data(), kCells, w,
                                        s.acc.data() + q * kCells);
        }
        for (int64_t p = c0; p < c0 + w; ++p) {
          const auto [first, next] = s.rows.taken(p);
          for (index_t e = first; e < next; ++e) s.copy[slot_[ip[e]] * kCells + (p - c0)] = scalar_t(0);
        }
      }
      for (int64_t i = 0; i < w; ++i) {
        scalar_t* row = gram + (c0 - r0 + i) * m_;
        for (int64_t q = 0; q < m_; ++q) row[q] += s.acc[q * kCells + i];
      }
    }
  }

 private:
  int64_t m_, capacity_ = 0;  // capacity_: rows of the copy (0: no gene chosen)
  std::vector<uint8_t> chosen_;
  std::vector<int64_t> slot_, tile_end_, ptr_, entry_slot_;
  std::vector<scalar_t> val_;
};

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
      const ReferenceSide<scalar_t, index_t> by_ref(pp, ip, n, rpp, rip, rvp, cols, m, dense.size(1), tile);
      const DenseRows<scalar_t> ref_rows(rpp, rip, rvp, cols, m, by_ref.chosen());
      // Blocks handed out one at a time: cells differ in stored values (cell types, perturbations), so an
      // even split of the rows leaves one thread with most of the work.
      const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        RowTiles<index_t> tiles;
        SplitEntries<scalar_t, index_t> split;
        typename ReferenceSide<scalar_t, index_t>::Scratch scratch;
        for (int64_t b = next++; b < blocks; b = next++) {
          const int64_t r0 = b * kBlockRows, r1 = std::min(r0 + kBlockRows, n);
          at::Tensor gram = dense_gram(dense.narrow(0, r0, r1 - r0), ref_dense);
          scalar_t* g = gram.data_ptr<scalar_t>();
          tiles.start(pp, ip, r0, r1);
          for (int64_t g0 = 0; g0 < cols; g0 += tile)
            for (int64_t p = r0; p < r1; ++p)
              add_product_row(ip, vp, tiles.take(p, g0 + tile), rpp, rip, rvp, ref_rows, split,
                              g + (p - r0) * m);
          by_ref.add(pp, ip, vp, r0, r1, scratch, g);
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
