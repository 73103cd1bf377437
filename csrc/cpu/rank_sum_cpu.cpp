// CPU kernel of perturbdiff::rank_sum: Mann-Whitney U statistics of many perturbations against one
// control set, per gene, on sparse perturbed cells (CSR, rows grouped by perturbation). Semantics:
// rank_sum_test in perturbdiff/evaluate/wilcoxon.py (the pure-torch version, used on GPU and as the
// oracle).
//
// U1 and the pooled tie term are sums over the distinct values v of a perturbation's cells:
//   U1  += t_x(v) (#ctrl < v + #ctrl == v / 2),   tie += f(t_x + t_c) - f(t_c),   f(t) = t^3 - t,
// so only runs of equal values matter, not their order. The zeros of a sparse column are one run
// whose control counts are looked up once per gene; the stored non-zeros are ranked one by one
// when none repeats (t_x = 1), else sorted into runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/csr.h"

namespace perturbdiff::cpu {
namespace {

inline double tie_count(double t) { return t * t * t - t; }

// First p in [from, end) with !below(*p), for a predicate that holds on a prefix: probes from,
// from + 1, from + 3, ... then bisects the last gap, so the cost grows with log(p - from).
template <typename Below>
inline const double* gallop(const double* from, const double* end, Below below) {
  int64_t step = 1;
  while (from < end && below(*from)) {
    const double* probe = end - from > step ? from + step : end;
    if (probe == end || !below(*probe)) return std::partition_point(from + 1, probe, below);
    from = probe + 1;
    step *= 2;
  }
  return from;
}

// Counts of control values below and equal to v in ctrl[0:n] (sorted ascending), every value
// before `from` being known to be below v: the ascending values of a column walk the controls
// once instead of bisecting them from the start for each value.
inline std::pair<int64_t, int64_t> control_counts(const double* ctrl, const double* from, int64_t n, double v) {
  const double* lo = gallop(from, ctrl + n, [v](double c) { return c < v; });
  const double* hi = gallop(lo, ctrl + n, [v](double c) { return c <= v; });
  return {lo - ctrl, hi - lo};
}

// First position in the sorted [first, last) whose value is not below v, without data-dependent
// branches (the bisection steps compile to conditional moves).
inline const double* lower_bound_branchless(const double* first, const double* last, double v) {
  int64_t n = last - first;
  if (n == 0) return first;
  while (n > 1) {
    const int64_t half = n / 2;
    first = first[half - 1] < v ? first + half : first;
    n -= half;
  }
  return first + (*first < v);
}

// lower_bound over one gene's sorted positive controls through a bucket table: bucket(v), a clamped
// linear map of v onto [0, buckets), never decreases as v grows, so every control in a lower bucket than
// v's is below v and every one in a higher bucket is above it; bisection then runs only within v's
// bucket (rarely more than one control). Built once per gene, used by every perturbation's values of
// it: one table lookup and a step or two instead of log2(controls) dependent steps of bisection (the
// rank-sum at 18,080 genes 0.25 -> 0.16 s on the predicted file, 0.16 -> 0.065 s on the real one).
class BucketedControls {
 public:
  void build(const double* first, const double* last) {
    first_ = first;
    last_ = last;
    const int64_t n = last - first;
    buckets_ = n >= kMinControls ? kBucketsPerControl * static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(n)))
                                 : 0;
    if (buckets_ == 0) return;
    lo_ = first[0];
    const double span = last[-1] - lo_;
    scale_ = span > 0 ? static_cast<double>(buckets_) / span : 0.0;
    bound_.assign(buckets_ + 1, 0);
    for (const double* c = first; c < last; ++c) ++bound_[bucket(*c) + 1];
    for (int64_t b = 0; b < buckets_; ++b) bound_[b + 1] += bound_[b];
  }

  // First control at or above v (the controls' end if none); for the range given to build().
  const double* lower_bound(double v) const {
    if (buckets_ == 0) return lower_bound_branchless(first_, last_, v);
    const int64_t b = bucket(v);
    return lower_bound_branchless(first_ + bound_[b], first_ + bound_[b + 1], v);
  }

 private:
  static constexpr int64_t kMinControls = 8;  // fewer: plain bisection is as fast
  static constexpr int64_t kBucketsPerControl = 8;  // times bit_ceil(controls); 1, 2 and 4 were slower

  int64_t bucket(double v) const {
    const double x = (v - lo_) * scale_;
    if (!(x > 0.0)) return 0;  // below the first control (or NaN)
    return x < static_cast<double>(buckets_ - 1) ? static_cast<int64_t>(x) : buckets_ - 1;
  }

  const double *first_ = nullptr, *last_ = nullptr;
  double lo_ = 0.0, scale_ = 0.0;
  int64_t buckets_ = 0;
  std::vector<int32_t> bound_;
};

// The values of one perturbation and gene as a set: whether one of them occurs twice. Open
// addressing on the bits of the values; a generation stamp empties the table in O(1).
class RepeatCheck {
 public:
  static constexpr size_t kSlots = 1024, kMaxValues = kSlots / 2;

  bool has_repeat(const std::vector<double>& values) {
    if (++generation_ == 0) {  // wrapped: clear the stamps once
      std::fill(stamp_.begin(), stamp_.end(), 0u);
      generation_ = 1;
    }
    for (const double v : values) {
      uint64_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      for (size_t h = (bits * 0x9E3779B97F4A7C15ull) >> 54;; h = (h + 1) & (kSlots - 1)) {
        if (stamp_[h] != generation_) {
          stamp_[h] = generation_;
          key_[h] = bits;
          break;
        }
        if (key_[h] == bits) return true;
      }
    }
    return false;
  }

 private:
  std::vector<uint32_t> stamp_ = std::vector<uint32_t>(kSlots, 0u);
  std::vector<uint64_t> key_ = std::vector<uint64_t>(kSlots);
  uint32_t generation_ = 0;
};

// U1 and tie term of one perturbation's values of one gene, `buf` (its stored non-zeros; `zeros`
// implicit zeros), against the gene's sorted controls c[0:n_ctrl], of which lo0 are below zero and
// tc0 equal to it. Values that occur once (the rule for normalised expression) are ranked one by
// one by bisection; a group with a repeated value is sorted so that equal values form one run.
inline std::pair<double, double> rank_stats(std::vector<double>& buf, double zeros, const double* c,
                                            int64_t n_ctrl, int64_t lo0, int64_t tc0,
                                            const BucketedControls& positives, RepeatCheck& repeats) {
  double u = 0.0, t = 0.0;
  if (zeros > 0) {
    u += zeros * (lo0 + 0.5 * tc0);
    t += tie_count(zeros + tc0) - tie_count(static_cast<double>(tc0));
  }
  const double *negative = c, *positive = c + lo0 + tc0, *end = c + n_ctrl;
  if (buf.size() <= RepeatCheck::kMaxValues && !repeats.has_repeat(buf)) {
    // t_x = 1 for every value: its share of U1 is (#below + #equal / 2), of the tie term f(1 + t_c) - f(t_c)
    // = 3 t_c (t_c + 1); both summed as integers (twice U1's), exact and without a chain of float adds.
    int64_t twice_u = 0, ties = 0;
    for (const double v : buf) {
      const double* lo = v > 0.0 ? positives.lower_bound(v) : lower_bound_branchless(negative, c + lo0, v);
      const double* hi = lo;
      while (hi < end && *hi == v) ++hi;
      const int64_t tc = hi - lo;
      twice_u += 2 * (lo - c) + tc;
      ties += 3 * tc * (tc + 1);
    }
    return {u + 0.5 * static_cast<double>(twice_u), t + static_cast<double>(ties)};
  }
  std::sort(buf.begin(), buf.end());
  const double* from = c;
  for (size_t i = 0; i < buf.size();) {
    size_t j = i + 1;
    while (j < buf.size() && buf[j] == buf[i]) ++j;
    if (buf[i] > 0.0) from = std::max(from, positive);  // past the controls' zeros
    const auto [lo, tc] = control_counts(c, from, n_ctrl, buf[i]);
    from = c + lo + tc;
    const double tx = static_cast<double>(j - i);
    u += tx * (lo + 0.5 * tc);
    t += tie_count(tx + tc) - tie_count(static_cast<double>(tc));
    i = j;
  }
  return {u, t};
}

std::tuple<at::Tensor, at::Tensor> rank_sum_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                const at::Tensor& values, const at::Tensor& seg_start,
                                                const at::Tensor& ctrl_sorted) {
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && col_idx.dim() == 1 && values.dim() == 1 && seg_start.dim() == 1,
                    "rank_sum: row_ptr, col_idx, values and seg_start must be 1-d");
  TORCH_CHECK_VALUE(ctrl_sorted.dim() == 2, "rank_sum: ctrl_sorted must be [genes, n_ctrl], got ",
                    ctrl_sorted.sizes());
  TORCH_CHECK_VALUE(row_ptr.size(0) >= 1, "rank_sum: row_ptr needs at least one entry");
  TORCH_CHECK_VALUE(col_idx.size(0) == values.size(0), "rank_sum: col_idx and values differ in length");
  TORCH_CHECK_TYPE(seg_start.scalar_type() == at::kLong, "rank_sum: seg_start must be int64");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kDouble && ctrl_sorted.scalar_type() == at::kDouble,
                   "rank_sum: values and ctrl_sorted must be float64");
  const auto index_type = csr_index_type("rank_sum", {&row_ptr, &col_idx});
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous(), val = values.contiguous(),
                   ss = seg_start.contiguous(), ctrl = ctrl_sorted.contiguous();
  const int64_t G = ctrl.size(0), n_ctrl = ctrl.size(1), P = ss.size(0) - 1, n = rp_t.size(0) - 1;
  TORCH_CHECK_VALUE(P >= 0, "rank_sum: seg_start needs at least one entry");
  const int64_t* ssp = ss.data_ptr<int64_t>();
  check_segments("rank_sum", "seg_start", ssp, P, n);
  at::Tensor u1 = at::zeros({P, G}, ctrl.options()), tie = at::zeros({P, G}, ctrl.options());
  const double *vp = val.data_ptr<double>(), *ctrl_p = ctrl.data_ptr<double>();
  double *u1p = u1.data_ptr<double>(), *tiep = tie.data_ptr<double>();

  AT_DISPATCH_INDEX_TYPES(index_type, "rank_sum", [&] {
    const index_t *rp = rp_t.data_ptr<index_t>(), *ci = ci_t.data_ptr<index_t>();
    check_csr("rank_sum", "the cells", rp, n, ci, ci_t.size(0), G);
    std::atomic<int64_t> bad_row{n};  // strictly increasing: each row is walked once, tile by tile
    at::parallel_for(0, n, kCheckGrain / 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        bool bad = false;
        for (index_t e = rp[r] + 1; e < rp[r + 1]; ++e) bad |= ci[e - 1] >= ci[e];
        if (bad) {
          for (int64_t seen = bad_row.load(); r < seen && !bad_row.compare_exchange_weak(seen, r);) {
          }
          return;
        }
      }
    });
    TORCH_CHECK_VALUE(bad_row == n, "rank_sum: the column indices of row ", bad_row.load(),
                      " must be strictly increasing (sorted, no duplicates)");
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      // Each thread transposes its genes one tile of csr.h's at a time, so each row is read in runs of
      // several cache lines and the tile's values stay in cache while they are ranked.
      TileColumns<double, index_t> columns(kTileColumns);
      std::vector<double> buf;
      RepeatCheck repeats;
      BucketedControls positives;
      columns.rows.start(rp, ci, 0, n, begin);
      for (int64_t g0 = begin; g0 < end; g0 += kTileColumns) {
        const int64_t g1 = std::min(g0 + kTileColumns, end);
        columns.build(rp, ci, vp, 0, n, g0, g1);  // rows ascend within each gene: segments are runs
        const std::vector<int64_t>& row = columns.row;
        const std::vector<double>& value = columns.val;
        for (int64_t g = g0, k = 0; g < g1; ++g) {
          const double* c = ctrl_p + g * n_ctrl;
          const auto [lo0, tc0] = control_counts(c, c, n_ctrl, 0.0);
          positives.build(c + lo0 + tc0, c + n_ctrl);
          for (int64_t s = 0; s < P; ++s) {
            buf.clear();
            for (; k < columns.ptr[g - g0 + 1] && row[k] < ssp[s + 1]; ++k)
              if (value[k] != 0.0) buf.push_back(value[k]);  // stored zeros join the zero run
            const double zeros = static_cast<double>(ssp[s + 1] - ssp[s] - static_cast<int64_t>(buf.size()));
            std::tie(u1p[s * G + g], tiep[s * G + g]) = rank_stats(buf, zeros, c, n_ctrl, lo0, tc0, positives,
                                                                             repeats);
          }
        }
      }
    });
  });
  return {u1, tie};
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("rank_sum", &perturbdiff::cpu::rank_sum_cpu); }
