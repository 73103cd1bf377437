// CPU kernel of perturbdiff::within_distance: per segment (a perturbation's cells), the mean
// Euclidean distance over the pairs of cells of each of its two parts, E|x - x'| of cell-eval's
// e-distance, every cell's squared norm and, optionally, the means of radial kernels (kernel_math.h)
// over the pairs within each part and between the two: the predicted-vs-real set distances of the
// evaluator's full profile, whose segments hold a perturbation's predicted cells (first part) and
// real cells (second part). Cells are rows of [S | D]: a CSR part S [n, cols] (the evaluator's
// sparse genes) and a dense part D [n, d] (its genes stored in most cells), so that a segment's
// Gram matrix G = S_s S_s^T + D_s D_s^T costs small GEMMs plus scattered multiply-adds over stored
// values only.
//
// Work is split into blocks of rows of one segment, so that a few large perturbations keep every
// thread busy too: a block's rows p gather G_pq for q >= p up to the segment's end, the dense part
// by at::mm and the sparse part by Gustavson's product over a column-major copy of the rows the
// block needs, built one column tile at a time (csr.h's kTileColumns, so that it stays in L2; for
// each stored (k, v) of row p, the stored S[q, k] with q >= p, from a per-column cursor that only
// moves forward as p does; columns stored in a large fraction of those rows are copied dense instead
// and added by the epilogue table's add_rows), so only upper triangles are computed and memory is
// O(block x segment).
// Squared norms come first, row by row (duplicate column indices in a row add up like the dense
// matrix's). Distances follow the norm expansion of evaluate/distribution.py:
// D_pq = max((-2 G_pq + |p|^2) + |q|^2, 0), self-pairs 0; each unordered pair counts twice; row sums
// in double, added per segment in row order (reproducible for any number of threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/csr.h"
#include "op_args.h"

namespace perturbdiff::cpu {
namespace {

// Rows per block: each block rebuilds the column tiles of the rows after it, so larger blocks rebuild less
// (256 against 128: within_distance 8 % faster at 2,000 genes, the same at 500 and 18,080).
constexpr int64_t kBlockRows = 256;

// acc row (p - r0) [q - r0] += v * S[q, k] over the stored (k, v) of rows p in [r0, r1) and q in [p, end):
// the sparse part of the block's Gram rows, one column tile at a time.
template <typename scalar_t, typename index_t>
void add_sparse_block(TileColumns<scalar_t, index_t>& c, SplitEntries<scalar_t, index_t>& split, const index_t* rp,
                      const index_t* idx, const scalar_t* v, int64_t cols, int64_t tile, int64_t r0, int64_t r1,
                      int64_t end, scalar_t* acc) {
  const int64_t width = end - r0;
  c.rows.start(rp, idx, r0, end);
  for (int64_t g0 = 0; g0 < cols; g0 += tile) {
    c.build(rp, idx, v, r0, end, g0, std::min(cols, g0 + tile));
    for (int64_t p = r0; p < r1; ++p) {
      scalar_t* a = acc + (p - r0) * width - r0;
      split.split(idx, v, c.rows.taken(p), c.slot.data(), g0);
      for (int64_t e = 0; e < split.sparse_count; ++e) {
        const int64_t k = split.sparse_col[e] - g0;
        const scalar_t x = split.sparse_val[e];
        int64_t j = c.cursor[k];
        while (c.row[j] < p) ++j;  // row p itself stores column k: the loop stops there
        c.cursor[k] = j;
        const int64_t stop = c.ptr[k + 1];
        for (; j < stop; ++j) a[c.row[j]] += x * c.val[j];
      }
      split.add_dense(c.dense.data() + (p - r0), width, end - p, a + p);
    }
  }
}

// Squared norm of a dense row, in four running sums (independent chains the CPU overlaps), without
// the [n, d] temporary of dense.square().sum(1).
template <typename scalar_t>
scalar_t dense_square(const scalar_t* row, int64_t d) {
  scalar_t part[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= d; j += 4)
    for (int lane = 0; lane < 4; ++lane) part[lane] += row[j + lane] * row[j + lane];
  for (; j < d; ++j) part[0] += row[j] * row[j];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// Squared norm of each row's sparse part; `scratch` [cols] holds 0 on entry and exit.
template <typename scalar_t, typename index_t>
scalar_t sparse_square(const index_t* rp, const index_t* idx, const scalar_t* v, int64_t p,
                       std::vector<scalar_t>& scratch) {
  for (index_t e = rp[p]; e < rp[p + 1]; ++e) scratch[idx[e]] += v[e];
  scalar_t total = 0;
  for (index_t e = rp[p]; e < rp[p + 1]; ++e) {  // duplicates: the first one takes the sum
    const scalar_t x = scratch[idx[e]];
    total += x * x;
    scratch[idx[e]] = 0;
  }
  return total;
}

// Sums of f(D) over a row's squared distances, for each requested kernel (energy takes no bandwidth).
template <typename scalar_t>
struct KernelSums {
  std::vector<Kernel> kinds;
  std::vector<RadialParams<scalar_t>> params;

  KernelSums(const std::vector<Kernel>& kernels, c10::ArrayRef<double> bandwidths) : kinds(kernels) {
    static const double unused = 1.0;
    for (const Kernel k : kinds)
      params.push_back(radial_params<scalar_t>(k, k == Kernel::Energy ? c10::ArrayRef<double>(unused) : bandwidths));
  }

  double sum(size_t k, const scalar_t* d, int64_t count) const {
    switch (kinds[k]) {
      case Kernel::RBF: return sum_of<Kernel::RBF>(params[k], d, count);
      case Kernel::Laplacian: return sum_of<Kernel::Laplacian>(params[k], d, count);
      case Kernel::IMQ: return sum_of<Kernel::IMQ>(params[k], d, count);
      case Kernel::Energy: return sum_of<Kernel::Energy>(params[k], d, count);
    }
    return 0.0;
  }
  double at_zero(size_t k) const {
    const scalar_t zero = 0;
    return sum(k, &zero, 1);
  }

 private:
  template <Kernel K>
  double sum_of(const RadialParams<scalar_t>& p, const scalar_t* d, int64_t count) const {
    double total = 0.0;
    for (int64_t q = 0; q < count; ++q) total += static_cast<double>(radial_value<K, scalar_t, scalar_t>(p, d[q]));
    return total;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> within_distance_cpu(
    const at::Tensor& ptr_, const at::Tensor& idx_, const at::Tensor& val_, const at::Tensor& dense_,
    const at::Tensor& offsets_, const at::Tensor& split_, int64_t cols, c10::ArrayRef<std::string> kernels,
    c10::ArrayRef<double> bandwidths) {
  for (const at::Tensor* t : {&ptr_, &idx_, &val_, &offsets_, &split_})
    TORCH_CHECK_VALUE(t->dim() == 1, "within_distance: ptr, idx, val, offsets and split must be 1-d, got ",
                      t->sizes());
  TORCH_CHECK_VALUE(ptr_.size(0) >= 1, "within_distance: row pointers need at least one entry");
  TORCH_CHECK_VALUE(idx_.size(0) == val_.size(0), "within_distance: column indices and values differ in length");
  TORCH_CHECK_VALUE(cols >= 0, "within_distance: cols must be >= 0, got ", cols);
  const int64_t n = ptr_.size(0) - 1;
  TORCH_CHECK_VALUE(dense_.dim() == 2 && dense_.size(0) == n, "within_distance: dense must be [", n,
                    ", genes] (one row per cell), got ", dense_.sizes());
  TORCH_CHECK_TYPE(offsets_.scalar_type() == at::kLong && split_.scalar_type() == at::kLong,
                   "within_distance: offsets and split must be int64");
  TORCH_CHECK_TYPE(val_.scalar_type() == dense_.scalar_type() &&
                       (val_.scalar_type() == at::kFloat || val_.scalar_type() == at::kDouble),
                   "within_distance: val and dense must both be float32 or both float64, got ",
                   val_.scalar_type(), " and ", dense_.scalar_type());
  const auto index_type = csr_index_type("within_distance", {&ptr_, &idx_});
  const at::Tensor ptr = ptr_.contiguous(), idx = idx_.contiguous(), val = val_.contiguous(),
                   dense = dense_.contiguous(), offsets = offsets_.contiguous(), split = split_.contiguous();
  const int64_t segments = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(segments >= 0, "within_distance: offsets need at least one entry");
  TORCH_CHECK_VALUE(split.size(0) == segments, "within_distance: split must hold one row per segment (",
                    segments, "), got ", split.size(0));
  const int64_t *off = offsets.data_ptr<int64_t>(), *mid = split.data_ptr<int64_t>();
  check_segments("within_distance", "offsets", off, segments, n);
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK_VALUE(off[s] <= mid[s] && mid[s] <= off[s + 1], "within_distance: split[", s, "] = ", mid[s],
                      " lies outside its segment [", off[s], ", ", off[s + 1], "]");
  }
  std::vector<Kernel> kinds;
  for (const std::string& name : kernels) kinds.push_back(parse_kernel(name));
  const int64_t K = static_cast<int64_t>(kinds.size());

  at::Tensor distance = at::empty({2, segments}, val.options());
  at::Tensor sq = at::empty({n}, val.options());
  at::Tensor kernel_means = at::empty({K, 3, segments}, val.options());
  AT_DISPATCH_INDEX_TYPES(index_type, "within_distance", [&] {
    const index_t *pp = ptr.data_ptr<index_t>(), *ip = idx.data_ptr<index_t>();
    check_csr("within_distance", "the sparse part", pp, n, ip, idx.size(0), cols);
    const int64_t tile = tile_columns(pp, n, ip, cols);
    AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "within_distance", [&] {
      const KernelSums<scalar_t> ks(kinds, bandwidths);
      const scalar_t* vp = val.data_ptr<scalar_t>();
      scalar_t* sqp = sq.data_ptr<scalar_t>();
      // Squared norms: the Gram diagonal.
      const int64_t d_cols = dense.size(1);
      const scalar_t* dense_p = dense.data_ptr<scalar_t>();
      at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
        std::vector<scalar_t> scratch(cols, scalar_t(0));
        for (int64_t p = r0; p < r1; ++p)
          sqp[p] = dense_square(dense_p + p * d_cols, d_cols) + sparse_square(pp, ip, vp, p, scratch);
      });
      // Blocks of rows within segments.
      std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> blocks;  // (row0, row1, split, segment end)
      for (int64_t s = 0; s < segments; ++s)
        for (int64_t r = off[s]; r < off[s + 1]; r += kBlockRows)
          blocks.emplace_back(r, std::min(r + kBlockRows, off[s + 1]), mid[s], off[s + 1]);
      // Per row p, over q > p: distances to its own part; f_k(D) to its own part and to the other.
      std::vector<double> row_distance(n, 0.0), row_kernel(2 * K * n, 0.0);
      // Largest blocks first, each thread taking the next one left: blocks differ in cost by 100x
      // (rows x segment width), which an even split by count would leave to one thread.
      std::stable_sort(blocks.begin(), blocks.end(), [](const auto& a, const auto& b) {
        return (std::get<1>(a) - std::get<0>(a)) * (std::get<3>(a) - std::get<0>(a)) >
               (std::get<1>(b) - std::get<0>(b)) * (std::get<3>(b) - std::get<0>(b));
      });
      std::atomic<int64_t> next{0};
      const int64_t n_blocks = static_cast<int64_t>(blocks.size());
      at::parallel_for(0, std::min<int64_t>(n_blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        TileColumns<scalar_t, index_t> columns(tile, kDenseRowFraction);
        SplitEntries<scalar_t, index_t> split;
        std::vector<scalar_t> d;
        for (int64_t b = next++; b < n_blocks; b = next++) {
          const auto [r0, r1, m, end] = blocks[b];
          const int64_t width = end - r0;  // columns q in [r0, end)
          at::Tensor gram = dense_gram(dense.narrow(0, r0, r1 - r0), dense.narrow(0, r0, width));
          scalar_t* g = gram.data_ptr<scalar_t>();
          add_sparse_block(columns, split, pp, ip, vp, cols, tile, r0, r1, end, g);
          for (int64_t p = r0; p < r1; ++p) {
            const scalar_t* row = g + (p - r0) * width - r0;  // row[q]: G_pq
            const int64_t own_end = p < m ? m : end;           // q in (p, own_end): p's own part
            row_distance[p] = distance_sum(row + p + 1, sqp[p], sqp + p + 1, own_end - p - 1);
            if (K == 0) continue;
            d.resize(end - p - 1);
            for (int64_t q = p + 1; q < end; ++q) d[q - p - 1] = squared_distance(row[q], sqp[p], sqp[q]);
            for (int64_t k = 0; k < K; ++k) {
              row_kernel[(2 * k) * n + p] = ks.sum(k, d.data(), own_end - p - 1);
              row_kernel[(2 * k + 1) * n + p] = ks.sum(k, d.data() + (own_end - p - 1), end - own_end);
            }
          }
        }
      });
      // Segment means: each unordered pair of a part counts twice, its self-pairs add f(0) (distance 0).
      const double nan = std::nan("");
      scalar_t *dp = distance.data_ptr<scalar_t>(), *kp = kernel_means.data_ptr<scalar_t>();
      for (int64_t s = 0; s < segments; ++s) {
        const double nx = static_cast<double>(mid[s] - off[s]), ny = static_cast<double>(off[s + 1] - mid[s]);
        const auto part_sum = [&](const double* sums, int64_t from, int64_t to) {
          double total = 0.0;
          for (int64_t p = from; p < to; ++p) total += sums[p];
          return total;
        };
        const auto mean = [&](double total, double pairs) {
          return static_cast<scalar_t>(pairs > 0 ? total / pairs : nan);
        };
        dp[s] = mean(2.0 * part_sum(row_distance.data(), off[s], mid[s]), nx * nx);
        dp[segments + s] = mean(2.0 * part_sum(row_distance.data(), mid[s], off[s + 1]), ny * ny);
        for (int64_t k = 0; k < K; ++k) {
          const double* own = row_kernel.data() + (2 * k) * n;
          const double* other = row_kernel.data() + (2 * k + 1) * n;
          const double f0 = ks.at_zero(k);
          scalar_t* out = kp + k * 3 * segments;
          out[s] = mean(2.0 * part_sum(own, off[s], mid[s]) + nx * f0, nx * nx);
          out[segments + s] = mean(2.0 * part_sum(own, mid[s], off[s + 1]) + ny * f0, ny * ny);
          out[2 * segments + s] = mean(part_sum(other, off[s], mid[s]), nx * ny);
        }
      }
    });
  });
  return {distance, sq, kernel_means};
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("within_distance", &perturbdiff::cpu::within_distance_cpu); }
