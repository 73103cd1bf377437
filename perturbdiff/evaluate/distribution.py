"""Cell-set distances: energy distance of each perturbation to its control cells (for
cell-eval's pearson_edistance) and predicted-vs-real set distances through perturbdiff.ops."""

from __future__ import annotations

import math

import numpy as np
import torch

# CellFlow/CellOT's RBF-MMD gammas, exp(-gamma D), as perturbdiff's sigmas (gamma = 1/2 sigma^2).
CELLFLOW_GAMMAS = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
CELLFLOW_SIGMAS = [math.sqrt(0.5 / g) for g in CELLFLOW_GAMMAS]


def _squared_distances(sq_x: torch.Tensor, sq_y: torch.Tensor, gram: torch.Tensor
                       ) -> torch.Tensor:
    """Squared Euclidean distances from squared norms and dot products: the norm expansion
    -2 x.y + |x|^2 + |y|^2 clamped at 0, summed in ``sklearn.metrics.pairwise_distances``'s
    order (a Gram matrix's own diagonal gives exact zeros). Overwrites ``gram``."""
    return gram.mul_(-2).add_(sq_x[:, None]).add_(sq_y[None, :]).clamp_min_(0)


def _mean_distance(sq_x: torch.Tensor, sq_y: torch.Tensor, gram: torch.Tensor,
                   dim: int | None = None) -> torch.Tensor:
    """Mean Euclidean distance (see ``_squared_distances``). Overwrites ``gram``."""
    return _squared_distances(sq_x, sq_y, gram).sqrt_().mean(dim)


def mean_pairwise_distance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Euclidean distance over all pairs of rows of dense ``x`` (self-pairs included, as
    0) and the rows' squared norms, both from one Gram matrix (whose diagonal makes self-pairs
    exactly 0)."""
    g = x @ x.T
    sq = g.diagonal().clone()
    return _mean_distance(sq, sq, g), sq


def within_distances(cells: torch.Tensor, offsets: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """E|x-x'| of each segment offsets[i]:offsets[i + 1] of dense ``cells`` and the rows'
    squared norms, from each segment's own Gram matrix."""
    within, sq = zip(*(mean_pairwise_distance(cells[a:b])
                       for a, b in zip(offsets[:-1], offsets[1:])))
    return torch.stack(within), torch.cat(sq)


def mean_distance_to(x: torch.Tensor, sq_x: torch.Tensor, y: torch.Tensor, sq_y: torch.Tensor
                     ) -> torch.Tensor:
    """Each row of dense ``x``'s mean Euclidean distance to the rows of ``y``, from their
    squared norms and one product."""
    return _mean_distance(sq_x, sq_y, x @ y.T, dim=1)


def energy_to_control(cells, offsets: np.ndarray, ctrl, ctrl_sq: torch.Tensor,
                      ctrl_self: torch.Tensor, within=within_distances,
                      distance_to=mean_distance_to) -> torch.Tensor:
    """cell-eval's e-distance 2 E|x-c| - E|x-x'| - E|c-c'| (V-statistic, Euclidean) to the
    control cells of each perturbation, perturbation i owning rows offsets[i]:offsets[i + 1]
    of ``cells``. ``ctrl_sq`` and ``ctrl_self`` are the controls' squared norms and E|c-c'|.
    ``within(cells, offsets)`` gives E|x-x'| per perturbation and the rows' squared norms,
    ``distance_to(cells, sq, ctrl, ctrl_sq)`` each row's E_c|x-c|: the torch versions above for
    dense tensors, the compiled ones (``sparse_gram.split_within``, ``split_distance_to``) for
    ``SplitCells``.
    """
    within_d, sq = within(cells, offsets)
    return energy_from_terms(within_d, distance_to(cells, sq, ctrl, ctrl_sq), offsets, ctrl_self)


def energy_from_terms(within_d: torch.Tensor, to_ctrl: torch.Tensor, offsets: np.ndarray,
                      ctrl_self: torch.Tensor) -> torch.Tensor:
    """The e-distance 2 E|x-c| - E|x-x'| - E|c-c'| of each perturbation from its E|x-x'|, each
    cell's E_c|x-c| (perturbation i owning offsets[i]:offsets[i + 1]) and the controls' E|c-c'|."""
    sizes = torch.from_numpy(np.diff(offsets)).to(to_ctrl.device)
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=to_ctrl.device), sizes)
    cross = to_ctrl.new_zeros(len(sizes)).index_add_(0, segment, to_ctrl) / sizes
    return 2 * cross - within_d - ctrl_self


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


# The set distances between predicted and real cells: (kernel, bandwidths) of a biased MMD^2,
# the energy kernel's giving the "full" energy distance 2E|x-y| - E|x-x'| - E|y-y'|.
SET_DISTANCES = {"energy_distance": ("energy", None), "mmd_rbf": ("rbf", CELLFLOW_SIGMAS)}


def pred_real_distances(pred_sets: list, real_sets: list) -> dict[str, torch.Tensor]:
    """Energy distance ("full" convention) and RBF MMD^2 (biased, mean kernel over CellFlow's
    bandwidths) between the predicted and real cells of each perturbation, for dense sets:
    through perturbdiff.ops, batched over sets of similar size. (Sparse cells take
    ``joint_kernels`` / ``from_kernel_means`` through one compiled call per block.)"""
    from perturbdiff import ops  # not on the path of cell-eval's metrics

    n = len(pred_sets)
    out = {key: pred_sets[0].new_empty(n) for key in SET_DISTANCES}
    sizes = [max(p.shape[0], r.shape[0]) for p, r in zip(pred_sets, real_sets)]
    for group in _similar_sizes(sizes):
        x, xw = _padded([pred_sets[i] for i in group])
        y, yw = _padded([real_sets[i] for i in group])
        idx = torch.tensor(group)
        for key, (kernel, bandwidths) in SET_DISTANCES.items():
            out[key][idx] = ops.mmd(x, y, kernel=kernel, bandwidth=bandwidths, x_weights=xw,
                                    y_weights=yw)
    return out


def joint_kernels() -> tuple[list[str], list[float]]:
    """SET_DISTANCES as the kernel list and the one bandwidth list of perturbdiff::within_distance
    (the energy kernel takes none)."""
    widths = {tuple(b) for _, b in SET_DISTANCES.values() if b is not None}
    assert len(widths) <= 1, "within_distance takes one bandwidth list for all kernels"
    return [k for k, _ in SET_DISTANCES.values()], list(widths.pop()) if widths else []


def from_kernel_means(means: torch.Tensor) -> dict[str, torch.Tensor]:
    """SET_DISTANCES from the kernel means [K, 3, P] within the predicted cells, within the real
    ones and between them (``joint_kernels`` order): the biased MMD^2 k_xx + k_yy - 2 k_xy."""
    return {key: m[0] + m[1] - 2 * m[2] for key, m in zip(SET_DISTANCES, means)}
