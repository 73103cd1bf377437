"""Cell-set distances: energy distance of each perturbation to its control cells (for
cell-eval's pearson_edistance) and predicted-vs-real set distances through perturbdiff.ops."""

from __future__ import annotations

import math

import torch

from perturbdiff import ops

# CellFlow/CellOT's RBF-MMD gammas, exp(-gamma D), as perturbdiff's sigmas (gamma = 1/2 sigma^2).
CELLFLOW_GAMMAS = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
CELLFLOW_SIGMAS = [math.sqrt(0.5 / g) for g in CELLFLOW_GAMMAS]


def mean_pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance over all pairs (self-pairs included as 0 when y is None).

    Norm expansion clamped at 0, as ``sklearn.metrics.pairwise_distances``.
    """
    same = y is None
    y = x if same else y
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    if same:
        d2.fill_diagonal_(0.0)
    return d2.clamp_min(0).sqrt().mean()


def energy_to_control(cells: torch.Tensor, segment: torch.Tensor, n_segments: int,
                      ctrl: torch.Tensor, ctrl_self: torch.Tensor) -> torch.Tensor:
    """cell-eval's e-distance 2 E|x-c| - E|x-x'| - E|c-c'| (V-statistic, Euclidean) of each
    segment of ``cells`` to the control cells; the cross terms share one matrix product."""
    cross = mean_pairwise_distance_rows(cells, ctrl)
    sizes = torch.bincount(segment, minlength=n_segments).to(cells.dtype)
    cross = torch.zeros(n_segments, dtype=cells.dtype, device=cells.device).index_add_(
        0, segment, cross) / sizes
    within = torch.stack([mean_pairwise_distance(cells[segment == i])
                          for i in range(n_segments)])
    return 2 * cross - within - ctrl_self


def mean_pairwise_distance_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each row of x to all rows of y (norm expansion)."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d2.clamp_min(0).sqrt().mean(1)


def _padded(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    size = max(s.shape[0] for s in sets)
    batch = sets[0].new_zeros(len(sets), size, sets[0].shape[1])
    weights = sets[0].new_zeros(len(sets), size)
    for i, s in enumerate(sets):
        batch[i, :s.shape[0]] = s
        weights[i, :s.shape[0]] = 1.0
    return batch, weights


def _similar_sizes(sizes: list[int], slack: float = 1.25) -> list[list[int]]:
    """Indices grouped so each group's largest set is at most ``slack`` x its smallest: padding
    a batch to its largest set then wastes little work."""
    groups: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda k: sizes[k]):
        if groups and sizes[i] <= slack * sizes[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pred_real_distances(pred_sets: list[torch.Tensor], real_sets: list[torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """Energy distance ("full" convention) and RBF MMD^2 (biased, mean kernel over CellFlow's
    bandwidths) between the predicted and real cells of each perturbation, batched over sets of
    similar size."""
    n = len(pred_sets)
    out = {k: pred_sets[0].new_empty(n) for k in ("energy_distance", "mmd_rbf")}
    sizes = [max(p.shape[0], r.shape[0]) for p, r in zip(pred_sets, real_sets)]
    for group in _similar_sizes(sizes):
        x, xw = _padded([pred_sets[i] for i in group])
        y, yw = _padded([real_sets[i] for i in group])
        idx = torch.tensor(group)
        out["energy_distance"][idx] = ops.energy_distance(x, y, convention="full", x_weights=xw,
                                                          y_weights=yw)
        out["mmd_rbf"][idx] = ops.mmd(x, y, kernel="rbf", bandwidth=CELLFLOW_SIGMAS,
                                      x_weights=xw, y_weights=yw)
    return out
