"""Tie-aware ranking statistics over the rows of a matrix, all rows at once.

Every function treats ties the way scipy/sklearn/polars do (average ranks, tie groups as
single thresholds), so the vectorised results match the per-row library calls.
"""

from __future__ import annotations

import numpy as np
import torch


def ascending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of ``values`` ascending (NaN last), equal values in any order:
    for the callers here, which treat a run of ties as one group whatever its inner order. On
    CPU numpy's vectorised sort (a [33, 2000] block: 0.45 ms against torch's 1.7 ms), else
    torch's."""
    if values.device.type != "cpu":
        return torch.sort(values, dim=-1).indices
    return torch.from_numpy(np.argsort(values.numpy(), axis=-1))


def run_bounds(new_run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of the run each position belongs to, along the last dim.

    ``new_run[..., i]`` is True where a run starts (position 0 must be True).
    """
    n = new_run.shape[-1]
    idx = torch.arange(n, device=new_run.device).expand_as(new_run)
    start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    ends_here = torch.ones_like(new_run)
    ends_here[..., :-1] = new_run[..., 1:]
    end_rev = torch.where(ends_here, idx, torch.full_like(idx, n)).flip(-1).cummin(dim=-1).values
    return start, end_rev.flip(-1)


def masked_average_ranks(values: torch.Tensor, mask: torch.Tensor | None = None,
                         ascending: torch.Tensor | None = None) -> torch.Tensor:
    """1-based average ranks of ``values`` within each row, counting only ``mask`` entries.

    Entries outside the mask get rank 0. Equal values (including equal infinities) share
    the mean of their positions, as ``scipy.stats.rankdata(method="average")``. ``ascending``:
    the rows' ascending sort indices (``ascending_order``), when the caller has them already.
    """
    by_value = ascending_order(values) if ascending is None else ascending
    if mask is None:
        mask, order = torch.ones_like(values, dtype=torch.bool), by_value
    else:  # masked entries first, each block still sorted by value: a stable partition
        inside = mask.gather(-1, by_value)
        before = inside.sum(-1, keepdim=True)
        slot = torch.where(inside, inside.cumsum(-1) - 1, before + (~inside).cumsum(-1) - 1)
        order = torch.empty_like(by_value).scatter_(-1, slot, by_value)
    v = values.gather(-1, order)
    m = mask.gather(-1, order)
    new_run = torch.ones_like(m)
    new_run[..., 1:] = (v[..., 1:] != v[..., :-1]) | (m[..., 1:] != m[..., :-1])
    start, end = run_bounds(new_run)
    ranks_sorted = torch.where(m, (start + end).to(values.dtype) / 2 + 1, 0)
    return torch.zeros_like(ranks_sorted).scatter(-1, order, ranks_sorted)


def masked_pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Pearson correlation per row over ``mask`` entries; NaN for < 2 entries or zero variance."""
    if mask is None:
        mask = torch.ones_like(a, dtype=torch.bool)
    w = mask.to(a.dtype)
    n = w.sum(-1, keepdim=True)
    am = (a * w).sum(-1, keepdim=True) / n
    bm = (b * w).sum(-1, keepdim=True) / n
    da = torch.where(mask, a - am, 0)
    db = torch.where(mask, b - bm, 0)
    # Scale first, as scipy does, so large values cannot overflow the squares.
    da = da / da.abs().amax(-1, keepdim=True)
    db = db / db.abs().amax(-1, keepdim=True)
    r = (da * db).sum(-1) / (da.norm(dim=-1) * db.norm(dim=-1))
    r = r.clamp(-1.0, 1.0)
    return torch.where(n.squeeze(-1) >= 2, r, torch.nan)


def masked_spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Spearman correlation per row (Pearson of average ranks) over ``mask`` entries."""
    return masked_pearson(masked_average_ranks(a, mask), masked_average_ranks(b, mask), mask)


def roc_auc_rows(labels: torch.Tensor, scores: torch.Tensor,
                 ascending: torch.Tensor | None = None) -> torch.Tensor:
    """ROC AUC per row with tied scores counted half (sklearn ``roc_curve`` + ``auc``).

    NaN where a row's labels are all one class. ``ascending``: as in ``masked_average_ranks``.
    """
    pos = labels.to(scores.dtype if scores.is_floating_point() else torch.float64)
    ranks = masked_average_ranks(scores, ascending=ascending).to(torch.float64)
    n_pos = pos.sum(-1).to(torch.float64)
    n_neg = labels.shape[-1] - n_pos
    rank_sum = (ranks * pos.to(torch.float64)).sum(-1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.nan)


def average_precision_rows(labels: torch.Tensor, scores: torch.Tensor,
                           ascending: torch.Tensor | None = None) -> torch.Tensor:
    """Average precision per row (sklearn ``average_precision_score``), ties as one threshold.

    NaN where a row's labels are all one class. ``ascending``: the rows' ascending sort indices,
    when the caller has them already; reversed, they order the scores as well, a run of tied
    scores counting as one threshold whatever its inner order (not with NaN scores, which
    compare unequal and so are runs of their own).
    """
    if ascending is None or bool(torch.isnan(scores).any()):
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    else:
        order = ascending.flip(-1)
    s = scores.gather(-1, order)
    y = labels.gather(-1, order).to(torch.float64)
    new_run = torch.ones_like(s, dtype=torch.bool)
    new_run[..., 1:] = s[..., 1:] != s[..., :-1]
    _, end = run_bounds(new_run)
    tp = y.cumsum(-1)
    precision_at_end = tp.gather(-1, end) / (end + 1).to(torch.float64)
    n_pos = y.sum(-1)
    ap = (y * precision_at_end).sum(-1) / n_pos
    return torch.where((n_pos > 0) & (n_pos < labels.shape[-1]), ap, torch.nan)
