// What the evaluator's sparse CPU kernels (within_distance, distance_to, split_columns, rank_sum,
// group_sums) share: CSR argument checks, column tiles, Gustavson's row product and the Euclidean
// distances of a Gram row.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/epilogue_dispatch.h"

namespace perturbdiff::cpu {

constexpr int64_t kCheckGrain = 1 << 16;  // stored values per task of the argument checks

// Raises unless ptr runs from 0 to nnz without decreasing and every index lies in [0, bound).
template <typename index_t>
void check_csr(const char* op, const char* name, const index_t* ptr, int64_t rows, const index_t* idx,
               int64_t nnz, int64_t bound) {
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[rows] == nnz, op, ": ", name,
                    "'s row pointers must run from 0 to its number of stored values (", nnz, "), got ",
                    ptr[0], " to ", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(ptr[r] <= ptr[r + 1], op, ": ", name, "'s row pointers decrease at row ", r);
  // Branch-free passes (the compiler vectorises them) over parts in parallel; the range for the message only.
  std::atomic<bool> outside{false};
  at::parallel_for(0, nnz, kCheckGrain, [&](int64_t e0, int64_t e1) {
    bool out = false;
    for (int64_t e = e0; e < e1; ++e) out |= static_cast<uint64_t>(idx[e]) >= static_cast<uint64_t>(bound);
    if (out) outside = true;
  });
  if (outside) {
    const auto [lo, hi] = std::minmax_element(idx, idx + nnz);
    TORCH_CHECK_VALUE(false, op, ": ", name, "'s column indices must lie in [0, ", bound, "), got [", *lo, ", ",
                      *hi, "]");
  }
}

// Raises unless the segment bounds off[0..segments] (the argument `name`) run from 0 to n without
// decreasing.
inline void check_segments(const char* op, const char* name, const int64_t* off, int64_t segments, int64_t n) {
  TORCH_CHECK_VALUE(off[0] == 0 && off[segments] == n, op, ": ", name, " must run from 0 to the number of cells (",
                    n, "), got ", off[0], " to ", off[segments]);
  for (int64_t s = 0; s < segments; ++s)
    TORCH_CHECK_VALUE(off[s] <= off[s + 1], op, ": ", name, " decrease at segment ", s);
}

// The index dtype shared by all of `indices` (int32 or int64), else a TypeError naming `op`.
inline at::ScalarType csr_index_type(const char* op, std::initializer_list<const at::Tensor*> indices) {
  const auto type = (*indices.begin())->scalar_type();
  bool same = type == at::kInt || type == at::kLong;
  for (const at::Tensor* t : indices) same = same && t->scalar_type() == type;
  TORCH_CHECK_TYPE(same, op, ": row pointers and column indices must all be int32 or all int64");
  return type;
}

// Columns per tile of the sparse products: rows are multiplied one column (gene) tile at a time, so that
// the part of the right operand a tile touches (about kTileColumns / cols of it) stays in L2 while it is
// scattered from, rather than all of it in L3 (at 18,000 genes within_distance ran twice as fast, measured).
constexpr int64_t kTileColumns = 512;

// Whether the column indices ascend (duplicates allowed) within every row: only then is a row's part in a
// column tile one run of its entries.
template <typename index_t>
bool rows_ascending(const index_t* ptr, int64_t rows, const index_t* idx) {
  std::atomic<bool> descends{false};
  at::parallel_for(0, rows, kCheckGrain / 256, [&](int64_t r0, int64_t r1) {
    bool down = false;
    for (int64_t r = r0; r < r1; ++r)
      for (index_t e = ptr[r] + 1; e < ptr[r + 1]; ++e) down |= idx[e] < idx[e - 1];
    if (down) descends = true;
  });
  return !descends;
}

// The tile width for a matrix: kTileColumns when its rows ascend, else one tile of all columns.
template <typename index_t>
int64_t tile_columns(const index_t* ptr, int64_t rows, const index_t* idx, int64_t cols) {
  return rows_ascending(ptr, rows, idx) ? kTileColumns : std::max<int64_t>(cols, 1);
}

// Rows [r0, end) of a CSR matrix walked one column tile after another, from column first_col on:
// take(p, g1) moves row p's cursor past its entries below column g1 and returns them as [first, next); a
// row's tiles follow each other.
template <typename index_t>
class RowTiles {
 public:
  void start(const index_t* ptr, const index_t* idx, int64_t r0, int64_t end, int64_t first_col = 0) {
    ptr_ = ptr;
    idx_ = idx;
    r0_ = r0;
    next_.assign(ptr + r0, ptr + end);
    if (first_col > 0)
      for (int64_t p = r0; p < end; ++p)
        next_[p - r0] = static_cast<index_t>(
            std::lower_bound(idx + ptr[p], idx + ptr[p + 1], static_cast<index_t>(first_col)) - idx);
    first_.resize(next_.size());
  }
  std::pair<index_t, index_t> take(int64_t p, int64_t g1) {
    index_t& e = next_[p - r0_];
    first_[p - r0_] = e;
    while (e < ptr_[p + 1] && idx_[e] < g1) ++e;
    return {first_[p - r0_], e};
  }
  // The entries the last take(p, .) returned.
  std::pair<index_t, index_t> taken(int64_t p) const { return {first_[p - r0_], next_[p - r0_]}; }

 private:
  const index_t *ptr_ = nullptr, *idx_ = nullptr;
  int64_t r0_ = 0;
  std::vector<index_t> first_, next_;
};

// Rows of a CSR matrix B [rows, m] stored in more than kDenseRowFraction of their m columns, copied dense
// ([count, m], row k at slot[k], -1 for the others). A sparse row's entries in them go through the
// epilogue table's register-blocked add_rows over all m columns (~0.13 cycles per multiply-add, zeros
// included: the FMA units' roof), the others through Gustavson's scattered multiply-adds over stored pairs
// only (~2-3 cycles each; Zen 4). The threshold is the measured best at 500 to 18,080 genes (0.03 to 0.1
// within 5 %; one thread at 2,000 genes, within_distance and distance_to take 20-27 % less time than with
// Gustavson alone). The densest rows come first while they fit in kDenseRowBytes (more of them, read once
// per block of rows, spill out of L3: slower at 18,080 genes); the rest stay sparse.
constexpr double kDenseRowFraction = 0.05;
constexpr int64_t kDenseRowBytes = int64_t(16) << 20;

// A row's slot in DenseRows (and a column's in TileColumns): >= 0 its dense copy; these two otherwise.
constexpr int64_t kScattered = -1;  // stored sparse: Gustavson's multiply-adds
constexpr int64_t kElsewhere = -2;  // multiplied by another path of the caller: entries meeting it are dropped

// The rule above for a row (or column) storing `stored` of its `length` values.
inline bool dense_enough(int64_t stored, int64_t length, double fraction = kDenseRowFraction) {
  return static_cast<double>(stored) > fraction * static_cast<double>(length);
}

// How many dense copies of `length` values of scalar_t fit in kDenseRowBytes.
template <typename scalar_t>
int64_t dense_copies_that_fit(int64_t length) {
  return kDenseRowBytes / std::max<int64_t>(length * static_cast<int64_t>(sizeof(scalar_t)), 1);
}

// Rows marked in `elsewhere` (may be null) take slot kElsewhere.
template <typename scalar_t>
struct DenseRows {
  std::vector<int64_t> slot;
  std::vector<scalar_t> values;
  int64_t m;

  template <typename index_t>
  DenseRows(const index_t* ptr, const index_t* idx, const scalar_t* val, int64_t rows, int64_t m,
            const uint8_t* elsewhere = nullptr)
      : slot(rows, kScattered), m(m) {
    std::vector<int64_t> dense;
    for (int64_t k = 0; k < rows; ++k) {
      if (elsewhere != nullptr && elsewhere[k])
        slot[k] = kElsewhere;
      else if (dense_enough(ptr[k + 1] - ptr[k], m))
        dense.push_back(k);
    }
    std::stable_sort(dense.begin(), dense.end(),
                     [&](int64_t a, int64_t b) { return ptr[a + 1] - ptr[a] > ptr[b + 1] - ptr[b]; });
    dense.resize(std::min<int64_t>(dense.size(), dense_copies_that_fit<scalar_t>(m)));
    values.assign(dense.size() * m, scalar_t(0));
    for (size_t s = 0; s < dense.size(); ++s) {
      const int64_t k = dense[s];
      slot[k] = static_cast<int64_t>(s);
      for (index_t q = ptr[k]; q < ptr[k + 1]; ++q) values[s * m + idx[q]] += val[q];  // duplicates add up
    }
  }
};

// Per thread: one sparse row's entries split by the other operand's row k they meet (slot[k] >= 0: a
// dense copy, added by add_rows in one pass over the output row; kScattered: stored sparse, for
// Gustavson's multiply-adds; kElsewhere: dropped). The split is branch-free: it follows the genes, a
// pattern no branch predictor learns (a branch per entry cost distance_to ~10 %).
template <typename scalar_t, typename index_t>
struct SplitEntries {
  std::vector<scalar_t> dense_val, sparse_val;
  std::vector<int64_t> dense_slot;
  std::vector<index_t> sparse_col;
  int64_t dense_count = 0, sparse_count = 0;

  // Entries [first, next) of a row (column indices idx, values val), slot indexed by column - offset.
  void split(const index_t* idx, const scalar_t* val, std::pair<index_t, index_t> entries, const int64_t* slot,
             int64_t offset) {
    const size_t n = static_cast<size_t>(entries.second - entries.first);
    if (dense_val.size() < n) {
      dense_val.resize(n);
      sparse_val.resize(n);
      dense_slot.resize(n);
      sparse_col.resize(n);
    }
    scalar_t *dv = dense_val.data(), *sv = sparse_val.data();
    int64_t* ds = dense_slot.data();
    index_t* sc = sparse_col.data();
    int64_t nd = 0, ns = 0;
    for (index_t e = entries.first; e < entries.second; ++e) {
      const index_t k = idx[e];
      const int64_t s = slot[k - offset];
      const scalar_t v = val[e];
      dv[nd] = v;
      ds[nd] = s;
      sv[ns] = v;
      sc[ns] = k;
      nd += s >= 0;
      ns += s == kScattered;
    }
    dense_count = nd;
    sparse_count = ns;
  }
  // out[j] += sum over the dense entries of v rows[slot * ld + j], j < n.
  void add_dense(const scalar_t* rows, int64_t ld, int64_t n, scalar_t* out) const {
    if (dense_count > 0)
      epilogue<scalar_t>().add_rows(dense_val.data(), dense_slot.data(), dense_count, rows, ld, n, out);
  }
};

// Per thread: the stored values of rows [r0, end) in the columns of one tile [g0, g1), rebuilt for each tile
// by a counting sort of the rows' entries in it (`rows` walks them). Columns stored in more than
// dense_fraction of the rows (none by default) are copied dense, as DenseRows does for a whole matrix
// (column k at dense[slot[k] * width + (p - r0)], while they fit in kDenseRowBytes); the others
// column-major (rows ascending within a column: column k's are row[ptr[k]:ptr[k + 1]], val[...]), with
// each column's cursor reset to ptr.
template <typename scalar_t, typename index_t>
struct TileColumns {
  std::vector<int64_t> ptr, cursor, row, slot;
  std::vector<scalar_t> val, dense;
  int64_t width = 0;  // rows [r0, end)
  double dense_fraction;
  RowTiles<index_t> rows;
  explicit TileColumns(int64_t tile, double dense_fraction = std::numeric_limits<double>::infinity())
      : ptr(tile + 1), cursor(tile), slot(tile), dense_fraction(dense_fraction) {}

  void build(const index_t* rp, const index_t* idx, const scalar_t* v, int64_t r0, int64_t end, int64_t g0,
             int64_t g1) {
    const int64_t columns = g1 - g0;
    width = end - r0;
    std::fill(ptr.begin(), ptr.begin() + columns + 1, 0);
    for (int64_t p = r0; p < end; ++p) {
      const auto [first, next] = rows.take(p, g1);
      for (index_t e = first; e < next; ++e) ++ptr[idx[e] - g0 + 1];
    }
    const int64_t fit = dense_copies_that_fit<scalar_t>(width);
    int64_t dense_columns = 0;
    for (int64_t k = 0; k < columns; ++k) {
      const bool is_dense = dense_enough(ptr[k + 1], width, dense_fraction) && dense_columns < fit;
      slot[k] = is_dense ? dense_columns++ : kScattered;
      if (is_dense) ptr[k + 1] = 0;
    }
    for (int64_t k = 0; k < columns; ++k) ptr[k + 1] += ptr[k];
    row.resize(ptr[columns]);
    val.resize(row.size());
    dense.assign(dense_columns * width, scalar_t(0));
    std::copy(ptr.begin(), ptr.begin() + columns, cursor.begin());
    for (int64_t p = r0; p < end; ++p) {
      const auto [first, next] = rows.taken(p);
      for (index_t e = first; e < next; ++e) {
        const int64_t k = idx[e] - g0;
        if (slot[k] >= 0) {
          dense[slot[k] * width + (p - r0)] += v[e];  // duplicates add up
          continue;
        }
        const int64_t at = cursor[k]++;
        row[at] = p;
        val[at] = v[e];
      }
    }
    std::copy(ptr.begin(), ptr.begin() + columns, cursor.begin());
  }
};

// out[j] += sum_k A[r, k] B[k, j] over the stored A[r, k] in entries [first, next) of A's row: Gustavson's
// scattered multiply-adds for B's sparse rows, add_rows for its dense ones (out is the dense row r of A B,
// A and B in CSR; `split` is scratch).
template <typename scalar_t, typename index_t>
void add_product_row(const index_t* a_idx, const scalar_t* a_val, std::pair<index_t, index_t> entries,
                     const index_t* b_ptr, const index_t* b_idx, const scalar_t* b_val,
                     const DenseRows<scalar_t>& b_dense, SplitEntries<scalar_t, index_t>& split, scalar_t* out) {
  split.split(a_idx, a_val, entries, b_dense.slot.data(), 0);
  for (int64_t e = 0; e < split.sparse_count; ++e) {
    const scalar_t v = split.sparse_val[e];
    const index_t k = split.sparse_col[e];
    for (index_t q = b_ptr[k]; q < b_ptr[k + 1]; ++q) out[b_idx[q]] += v * b_val[q];
  }
  split.add_dense(b_dense.values.data(), b_dense.m, b_dense.m, out);
}

// a @ b^T as a contiguous [rows of a, rows of b] tensor: a block's products over the dense genes, or
// zeros when there are none (to which the sparse products are then added).
inline at::Tensor dense_gram(const at::Tensor& a, const at::Tensor& b) {
  return a.size(1) > 0 ? at::mm(a, b.t()).contiguous() : at::zeros({a.size(0), b.size(0)}, a.options());
}

// sum_q |p - q| over q < count from the Gram row gram[q] = p.q, square roots summed in double (the
// epilogue table's, vectorised).
template <typename scalar_t>
double distance_sum(const scalar_t* gram, scalar_t sq_p, const scalar_t* sq_q, int64_t count) {
  return epilogue<scalar_t>().distance_sum(gram, sq_p, sq_q, count);
}

}  // namespace perturbdiff::cpu
