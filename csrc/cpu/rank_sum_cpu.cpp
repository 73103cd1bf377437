// CPU kernel of perturbdiff::rank_sum: Mann-Whitney U statistics of many perturbations against one
// control set, per gene, on sparse (CSC) perturbed cells. Semantics: rank_sum_test in
// perturbdiff/evaluate/wilcoxon.py (the pure-torch version, used on GPU and as the oracle).
//
// U1 and the pooled tie term are sums over the distinct values v of a perturbation's cells:
//   U1  += t_x(v) (#ctrl < v + #ctrl == v / 2),   tie += f(t_x + t_c) - f(t_c),   f(t) = t^3 - t,
// so only runs of equal values matter, not their order. The zeros of a sparse column are one run
// whose control counts are looked up once per gene; only the stored non-zeros are sorted.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

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

std::tuple<at::Tensor, at::Tensor> rank_sum_cpu(const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                                const at::Tensor& values, const at::Tensor& seg_start,
                                                const at::Tensor& ctrl_sorted) {
  TORCH_CHECK_VALUE(col_ptr.dim() == 1 && row_idx.dim() == 1 && values.dim() == 1 && seg_start.dim() == 1,
                    "rank_sum: col_ptr, row_idx, values and seg_start must be 1-d");
  TORCH_CHECK_VALUE(ctrl_sorted.dim() == 2 && ctrl_sorted.size(0) == col_ptr.size(0) - 1,
                    "rank_sum: ctrl_sorted must be [genes, n_ctrl] with genes = len(col_ptr) - 1, got ",
                    ctrl_sorted.sizes(), " for ", col_ptr.size(0) - 1, " genes");
  TORCH_CHECK_VALUE(row_idx.size(0) == values.size(0), "rank_sum: row_idx and values differ in length");
  TORCH_CHECK_TYPE(col_ptr.scalar_type() == at::kLong && row_idx.scalar_type() == at::kLong &&
                       seg_start.scalar_type() == at::kLong,
                   "rank_sum: col_ptr, row_idx and seg_start must be int64");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kDouble && ctrl_sorted.scalar_type() == at::kDouble,
                   "rank_sum: values and ctrl_sorted must be float64");
  const at::Tensor cp = col_ptr.contiguous(), ri = row_idx.contiguous(), val = values.contiguous(),
                   ss = seg_start.contiguous(), ctrl = ctrl_sorted.contiguous();
  const int64_t G = ctrl.size(0), n_ctrl = ctrl.size(1), P = ss.size(0) - 1;
  TORCH_CHECK_VALUE(P >= 0, "rank_sum: seg_start needs at least one entry");
  at::Tensor u1 = at::zeros({P, G}, ctrl.options()), tie = at::zeros({P, G}, ctrl.options());
  const int64_t *cpp = cp.data_ptr<int64_t>(), *rip = ri.data_ptr<int64_t>(), *ssp = ss.data_ptr<int64_t>();
  const double *vp = val.data_ptr<double>(), *ctrl_p = ctrl.data_ptr<double>();
  double *u1p = u1.data_ptr<double>(), *tiep = tie.data_ptr<double>();

  at::parallel_for(0, G, 16, [&](int64_t g0, int64_t g1) {
    std::vector<double> buf;
    for (int64_t g = g0; g < g1; ++g) {
      const double* c = ctrl_p + g * n_ctrl;
      const auto [lo0, tc0] = control_counts(c, c, n_ctrl, 0.0);
      int64_t k = cpp[g];
      const int64_t end = cpp[g + 1];
      for (int64_t s = 0; s < P; ++s) {
        buf.clear();
        for (; k < end && rip[k] < ssp[s + 1]; ++k) {
          if (vp[k] != 0.0) buf.push_back(vp[k]);
        }
        std::sort(buf.begin(), buf.end());
        double u = 0.0, t = 0.0;
        const double zeros = static_cast<double>(ssp[s + 1] - ssp[s] - static_cast<int64_t>(buf.size()));
        if (zeros > 0) {
          u += zeros * (lo0 + 0.5 * tc0);
          t += tie_count(zeros + tc0) - tie_count(static_cast<double>(tc0));
        }
        const double* from = c;
        for (size_t i = 0; i < buf.size();) {
          size_t j = i + 1;
          while (j < buf.size() && buf[j] == buf[i]) ++j;
          if (buf[i] > 0.0) from = std::max(from, c + lo0 + tc0);  // past the controls' zeros
          const auto [lo, tc] = control_counts(c, from, n_ctrl, buf[i]);
          from = c + lo + tc;
          const double tx = static_cast<double>(j - i);
          u += tx * (lo + 0.5 * tc);
          t += tie_count(tx + tc) - tie_count(static_cast<double>(tc));
          i = j;
        }
        u1p[s * G + g] = u;
        tiep[s * G + g] = t;
      }
    }
  });
  return {u1, tie};
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("rank_sum", &perturbdiff::cpu::rank_sum_cpu); }
