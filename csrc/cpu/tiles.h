// Tiling machinery of the CPU engine: row tiles of a set, centred packing into thread-local buffers
// (so extra memory is O(threads x tile x genes), never a cells x cells matrix), BLAS Gram tiles, and
// dynamic scheduling whose results do not depend on which thread ran what.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/epilogue_dispatch.h"

namespace perturbdiff::cpu {

// Rows per tile: a 256 x 256 fp32 Gram tile (256 KiB) stays in L2 and the packed operands are
// large enough for BLAS to run near its peak.
constexpr int64_t kTileRows = 256;

// A run of consecutive rows of one operand (block 0: x, block 1: y / z).
struct Span {
  int64_t start;  // first row inside its block
  int64_t len;
  int block;
};

// Splits rows [0, n) of one block into near-equal tiles of at most kTileRows rows.
inline void append_tiles(std::vector<Span>& out, int64_t n, int block) {
  const int64_t count = (n + kTileRows - 1) / kTileRows;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t start = t * n / count, stop = (t + 1) * n / count;
    out.push_back({start, stop - start, block});
  }
}

// Where the rows of one set live: block 0 and block 1 are [rows, G] row-major matrices.
template <typename T>
struct SetRows {
  const T* block[2];
  const T* center;  // [G]
  int64_t genes;
};

// Copies rows of a span as (row - center) into dst [len, G] and their squared norms into norm
// (vectorised, in the dispatched epilogue table).
template <typename T>
void pack_centered(const SetRows<T>& set, const Span& s, T* dst, T* norm) {
  epilogue<T>().pack_centered(set.block[s.block] + s.start * set.genes, set.center, s.len, set.genes, dst,
                              norm);
}

// Thread-local workspace: two packed operands (with a one-entry cache each, so a run of tile pairs
// sharing a row or column tile packs it once), a Gram tile and an accumulator of rows x genes.
template <typename T>
class Workspace {
 public:
  Workspace(int64_t genes, bool with_accumulator)
      : buffer_(at::empty({(2 + (with_accumulator ? 1 : 0)) * kTileRows * (genes + 1) + kTileRows * kTileRows},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))) {
    T* base = buffer_.data_ptr<T>();
    for (int i = 0; i < 2; ++i) {
      slot_[i].rows = base + i * kTileRows * genes;
      slot_[i].norm = base + 2 * kTileRows * genes + i * kTileRows;
    }
    gram_ = base + 2 * kTileRows * (genes + 1);
    acc_ = with_accumulator ? gram_ + kTileRows * kTileRows : nullptr;
  }

  struct Packed {
    const T* rows;
    const T* norm;
  };

  // Packed rows of tiles ti and tj of one set (the operands of one Gram tile). A tile still in a
  // buffer from the previous call is reused; the two operands never evict each other.
  std::pair<Packed, Packed> operands(int64_t set, const SetRows<T>& rows, int64_t ti, const Span& si,
                                     int64_t tj, const Span& sj) {
    const int a = find(set, ti), b = find(set, tj);
    const int slot_i = a >= 0 ? a : (b == 0 ? 1 : 0);
    if (a < 0) fill(slot_[slot_i], set, ti, rows, si);
    const int slot_j = b >= 0 ? b : (ti == tj ? slot_i : 1 - slot_i);
    if (b < 0 && ti != tj) fill(slot_[slot_j], set, tj, rows, sj);
    return {{slot_[slot_i].rows, slot_[slot_i].norm}, {slot_[slot_j].rows, slot_[slot_j].norm}};
  }

  T* gram() { return gram_; }
  T* accumulator() { return acc_; }

 private:
  struct Slot {
    int64_t set = -1, tile = -1;
    T* rows = nullptr;
    T* norm = nullptr;
  };

  int find(int64_t set, int64_t tile) const {
    for (int i = 0; i < 2; ++i) {
      if (slot_[i].set == set && slot_[i].tile == tile) return i;
    }
    return -1;
  }

  static void fill(Slot& s, int64_t set, int64_t tile, const SetRows<T>& rows, const Span& span) {
    pack_centered(rows, span, s.rows, s.norm);
    s.set = set;
    s.tile = tile;
  }

  at::Tensor buffer_;
  Slot slot_[2];
  T* gram_;
  T* acc_;
};

inline void check_cpu_float(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "perturbdiff: the CPU kernel got tensors on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "perturbdiff: the CPU kernels take float32 or float64, got ", x.scalar_type());
}

inline at::TensorOptions cpu_options(c10::ScalarType t) { return at::TensorOptions().dtype(t); }

// c[rows_a, rows_b] (row stride ldc) = a b^T (row-major, both [rows, G]) through ATen's BLAS.
template <typename T>
void gemm_nt(const T* a, int64_t rows_a, const T* b, int64_t rows_b, int64_t genes, T* c, int64_t ldc) {
  const auto opt = cpu_options(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = at::from_blob(c, {rows_a, rows_b}, {ldc, 1}, opt);
  at::mm_out(out, at::from_blob(const_cast<T*>(a), {rows_a, genes}, opt),
             at::from_blob(const_cast<T*>(b), {rows_b, genes}, opt).t());
}

// Below this many rows a symmetric Gram block is one GEMM: smaller products lose BLAS efficiency.
constexpr int64_t kSymmetricLeafRows = 64;

// c = a a^T without computing both triangles: the diagonal halves recursively, the upper
// off-diagonal block by one GEMM, its mirror by a transposed copy (5/8 of the products at 256 rows).
template <typename T>
void gram_symmetric(const T* a, int64_t rows, int64_t genes, T* c, int64_t ldc) {
  if (rows <= kSymmetricLeafRows) {
    gemm_nt(a, rows, a, rows, genes, c, ldc);
    return;
  }
  const int64_t h = rows / 2;
  gram_symmetric(a, h, genes, c, ldc);
  gram_symmetric(a + h * genes, rows - h, genes, c + h * ldc + h, ldc);
  gemm_nt(a, h, a + h * genes, rows - h, genes, c + h, ldc);
  for (int64_t q = h; q < rows; ++q)
    for (int64_t p = 0; p < h; ++p) c[q * ldc + p] = c[p * ldc + q];
}

// c[rows_a, rows_b] = a b^T into a contiguous tile; a tile against itself takes the symmetric path.
template <typename T>
void gram_tile(const T* a, int64_t rows_a, const T* b, int64_t rows_b, int64_t genes, T* c) {
  if (a == b && rows_a == rows_b)
    gram_symmetric(a, rows_a, genes, c, rows_a);
  else
    gemm_nt(a, rows_a, b, rows_b, genes, c, rows_b);
}

// acc[rows_m, G] += m[rows_m, cols] @ b[cols, G], or m^T @ b when transpose_m (m is [cols, rows_m]).
template <typename T>
void accumulate_product(T* acc, const T* m, int64_t rows_m, int64_t cols, const T* b, int64_t genes,
                        bool transpose_m) {
  const auto opt = cpu_options(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = at::from_blob(acc, {rows_m, genes}, opt);
  at::Tensor mat = transpose_m ? at::from_blob(const_cast<T*>(m), {cols, rows_m}, opt).t()
                               : at::from_blob(const_cast<T*>(m), {rows_m, cols}, opt);
  out.addmm_(mat, at::from_blob(const_cast<T*>(b), {cols, genes}, opt));
}

// Runs fn(workspace, item) for items [0, count) on ATen's threads, each thread with its own
// workspace, items handed out in runs of `run` consecutive items (tiles differ in cost; a run of a
// set's tile pairs lets the workspace pack each of its tiles once). Callers store each item's result
// in its own slot, so the outcome does not depend on the schedule.
template <typename T, typename Fn>
void for_each_item(int64_t count, int64_t genes, bool with_accumulator, const Fn& fn, int64_t run = 1) {
  if (count == 0) return;
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    std::optional<Workspace<T>> ws;  // allocated only by threads that get work
    for (int64_t i = next.fetch_add(run); i < count; i = next.fetch_add(run)) {
      if (!ws) ws.emplace(genes, with_accumulator);
      for (int64_t k = i; k < std::min(i + run, count); ++k) fn(*ws, k);
    }
  };
  const int64_t runs = (count + run - 1) / run;
  if (runs == 1) {
    worker();  // outside a parallel region BLAS may use every thread for the single run
    return;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), runs);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) worker();
  });
}

}  // namespace perturbdiff::cpu
