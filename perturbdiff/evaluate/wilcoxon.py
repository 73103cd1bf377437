"""Wilcoxon rank-sum (Mann-Whitney U) tests of many perturbations against one control set,
for all genes at once, plus Benjamini-Hochberg FDR and pdex-style log2 fold changes.

The test is pdex's (numba-mwu): two-sided, asymptotic normal approximation, tie-corrected
variance, continuity correction 0.5, p clipped to [0, 1]; identical to
``scipy.stats.mannwhitneyu(x, y, method="asymptotic")``. No per-perturbation re-ranking of
the control cells: they are sorted once per gene, and each perturbed cell's rank among them
comes from a binary search, so U1 = sum_i (#ctrl < x_i + #ctrl == x_i / 2). The tie term
sum(t^3 - t) of the pooled sample is the control's own term plus a correction for every
distinct perturbed value (t = count in x + count in control). On CPU the compiled
``perturbdiff::rank_sum`` does the same on sparse cells, the zeros of a column being one run,
so its cost grows with the stored values (``rank_sum_test_sparse``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .._extension import has_kernel
from .ranking import ascending_order, run_bounds


@dataclass(frozen=True)
class SortedControl:
    """Control cells of one context, sorted per gene: values ``[G, n]`` and tie term ``[G]``."""

    values: torch.Tensor
    tie_term: torch.Tensor

    @property
    def n(self) -> int:
        return self.values.shape[1]


def sort_control(ctrl: torch.Tensor | sp.spmatrix, device=None) -> SortedControl:
    """``ctrl`` is ``[n_cells, G]``; returns the per-gene sorted values and tie terms.

    A scipy sparse ``ctrl`` is sorted by its stored values only, its zeros being one run, so the
    work grows with the stored values, not with n_cells x G; its values come in float64 on
    ``device``.
    """
    values = (torch.from_numpy(_sorted_columns(ctrl)).to(device) if sp.issparse(ctrl)
              else torch.sort(ctrl.T.contiguous(), dim=1).values)
    return SortedControl(values, _tie_term(values))


def _sorted_columns(x: sp.spmatrix) -> np.ndarray:
    """The columns of sparse ``x`` sorted, as a dense float64 ``[G, n]`` array."""
    x = sp.csc_matrix(x)
    x.sum_duplicates()
    n, n_genes = x.shape
    data = x.data.astype(np.float64)
    for a, b in zip(x.indptr[:-1], x.indptr[1:]):  # short columns: a loop beats a lexsort
        data[a:b].sort()
    stored = np.diff(x.indptr)
    col = np.repeat(np.arange(n_genes), stored)
    # Position in the sorted column: the rank among its stored values, shifted past the
    # implicit zeros for values >= 0 (stored zeros then join the zero run).
    pos = np.arange(len(data)) - x.indptr[col] + np.where(data >= 0, (n - stored)[col], 0)
    values = np.zeros((n_genes, n))
    values[col, pos] = data
    return values


def _tie_term(values: torch.Tensor) -> torch.Tensor:
    """sum(t^3 - t) over the runs of equal values of each row of row-sorted ``values``."""
    n_genes, n = values.shape
    new_run = torch.ones_like(values, dtype=torch.bool)
    new_run[:, 1:] = values[:, 1:] != values[:, :-1]
    start = new_run.view(-1).nonzero().squeeze(1)
    t = torch.diff(start, append=start.new_tensor([values.numel()])).to(torch.float64)
    return torch.zeros(n_genes, dtype=torch.float64, device=values.device).index_add_(
        0, start // n, t * t * t - t)


def rank_sum_test(cells: torch.Tensor, segment: torch.Tensor, n_segments: int,
                  ctrl: SortedControl) -> tuple[torch.Tensor, torch.Tensor]:
    """Mann-Whitney U of each segment of ``cells`` against the control, per gene (any device).

    cells: ``[n, G]`` rows of several perturbations stacked; segment: ``[n]`` non-decreasing
    perturbation index in ``[0, n_segments)``. Returns U1 and two-sided p-values, ``[P, G]``.
    """
    n, n_genes = cells.shape
    seg = segment.to(cells.device)
    # Sort each gene's values within each segment: stable sort by value, then by segment.
    by_value = torch.sort(cells.T.contiguous(), dim=1, stable=True)
    seg_rows = seg[by_value.indices]
    by_seg = torch.sort(seg_rows, dim=1, stable=True).indices
    xs = by_value.values.gather(1, by_seg).contiguous()
    lo = torch.searchsorted(ctrl.values, xs, right=False)
    hi = torch.searchsorted(ctrl.values, xs, right=True)
    tc = (hi - lo).to(torch.float64)
    seg_pos = seg.expand(n_genes, n)  # segments occupy the same positions in every gene
    u1 = torch.zeros(n_genes, n_segments, dtype=torch.float64, device=cells.device)
    u1.scatter_add_(1, seg_pos, lo.to(torch.float64) + tc / 2)

    new_run = torch.ones_like(xs, dtype=torch.bool)
    new_run[:, 1:] = (xs[:, 1:] != xs[:, :-1]) | (seg_pos[:, 1:] != seg_pos[:, :-1])
    start, end = run_bounds(new_run)
    tx = (end - start + 1).to(torch.float64)
    t = tx + tc
    extra = torch.where(new_run, t * t * t - t - (tc * tc * tc - tc), 0.0)
    tie = torch.zeros_like(u1).scatter_add_(1, seg_pos, extra)
    n1 = torch.bincount(seg, minlength=n_segments).to(torch.float64)
    return u1.T, _p_values(u1.T, tie.T, n1, ctrl)


def sparse_kernel_available() -> bool:
    """Whether this build's ``perturbdiff::rank_sum`` is the one ``rank_sum_test_sparse`` calls
    (a build older than the sources may lack it, or take the cells column by column)."""
    return has_kernel("rank_sum", args=("row_ptr",))


def rank_sum_test_sparse(cells: sp.spmatrix | np.ndarray, seg_start: np.ndarray,
                         ctrl: SortedControl) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_sum_test`` for CPU on sparse cells through the compiled kernel: the zeros of a
    column are one tie run, so the work grows with the stored values only.

    cells: ``[n, G]``, sparse (any format) or dense, rows grouped by perturbation, perturbation i
    owning rows ``seg_start[i]:seg_start[i + 1]``.
    """
    cells = sp.csr_matrix(cells)  # no copy when it already is CSR
    cells.sum_duplicates()  # sorted unique column indices (a no-op when known to be so)
    u1, tie = torch.ops.perturbdiff.rank_sum(
        torch.from_numpy(cells.indptr), torch.from_numpy(cells.indices),
        torch.from_numpy(np.ascontiguousarray(cells.data, dtype=np.float64)),
        torch.from_numpy(np.asarray(seg_start, dtype=np.int64)), ctrl.values.to(torch.float64))
    n1 = torch.from_numpy(np.diff(seg_start).astype(np.float64))
    return u1, _p_values(u1, tie, n1, ctrl)


def _p_values(u1: torch.Tensor, tie: torch.Tensor, n1: torch.Tensor,
              ctrl: SortedControl) -> torch.Tensor:
    """Two-sided p-values from U1 and the pooled tie term less the control's own, ``[P, G]``."""
    tie = tie + ctrl.tie_term[None, :]
    n2 = float(ctrl.n)
    n1c = n1[:, None]
    total = n1c + n2
    u = torch.maximum(u1, n1c * n2 - u1)
    mu = n1c * n2 / 2
    var = n1c * n2 / 12 * ((total + 1) - tie / (total * (total - 1)))
    z = (u - mu - 0.5) / var.clamp_min(0).sqrt()
    p = (2 * torch.special.ndtr(-z)).clamp(0.0, 1.0)
    # All values identical in a gene: no evidence of a difference (numba-mwu returns 1).
    return torch.where(var > 0, p, 1.0)


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """BH-adjusted p-values along the last dim (``scipy.stats.false_discovery_control``)."""
    m = p.shape[-1]
    order = ascending_order(p)  # tied p-values get the same adjusted value in any order
    sorted_p = p.gather(-1, order)
    i = torch.arange(1, m + 1, dtype=p.dtype, device=p.device)
    adj = sorted_p * (m / i)
    adj = adj.flip(-1).cummin(-1).values.flip(-1)
    return torch.empty_like(adj).scatter_(-1, order, adj).clamp(0.0, 1.0)


def log2_fold_change(target_mean: torch.Tensor, ref_mean: torch.Tensor) -> torch.Tensor:
    """pdex's default fold change on log1p data: log2(expm1(mean_t) / expm1(mean_ref)).

    expm1 of the log1p mean is the geometric-mean pseudobulk in count space. epsilon is 0 as
    cell-eval pins it: a zero reference mean gives +-inf; 0/0 is defined as 0 (no change).
    """
    lfc = torch.log2(torch.expm1(target_mean) / torch.expm1(ref_mean))
    return torch.nan_to_num(lfc, nan=0.0, posinf=torch.inf, neginf=-torch.inf)
