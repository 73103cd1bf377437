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


def torch_gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x @ y.T (x @ x.T when y is None) of dense cells."""
    return x @ (x if y is None else y).T


def mean_pairwise_distance(x, gram=torch_gram) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Euclidean distance over all pairs of rows (self-pairs included, as 0) and the
    rows' squared norms, both from one Gram matrix (whose diagonal makes self-pairs exactly 0).
    ``gram`` computes products of the rows of ``x``: ``torch_gram`` for a dense tensor,
    ``split_gram`` for ``SplitCells``."""
    g = gram(x)
    sq = g.diagonal().clone()
    return _mean_distance(sq, sq, g), sq


def within_distances(cells, offsets: np.ndarray, gram=torch_gram
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """E|x-x'| of each segment offsets[i]:offsets[i + 1] of ``cells`` and the rows' squared
    norms, from each segment's own Gram matrix (``gram`` as in ``mean_pairwise_distance``)."""
    within, sq = zip(*(mean_pairwise_distance(cells[a:b], gram)
                       for a, b in zip(offsets[:-1], offsets[1:])))
    return torch.stack(within), torch.cat(sq)


def mean_distance_to(x, sq_x: torch.Tensor, y, sq_y: torch.Tensor, gram=torch_gram
                     ) -> torch.Tensor:
    """Each row of ``x``'s mean Euclidean distance to the rows of ``y``, from their squared norms
    and one product (``gram`` as in ``mean_pairwise_distance``)."""
    return _mean_distance(sq_x, sq_y, gram(x, y), dim=1)


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
    to_ctrl = distance_to(cells, sq, ctrl, ctrl_sq)
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


def pred_real_distances(pred_sets: list, real_sets: list, gram=None) -> dict[str, torch.Tensor]:
    """Energy distance ("full" convention) and RBF MMD^2 (biased, mean kernel over CellFlow's
    bandwidths) between the predicted and real cells of each perturbation.

    Dense sets go through perturbdiff.ops, batched over sets of similar size. With ``gram``
    (e.g. ``split_gram`` for sparse cells) the same kernels (``ops.reference.radial``) are
    evaluated on the squared distances of explicit Gram matrices, one perturbation at a time.
    """
    if gram is not None:
        return _gram_set_distances(pred_sets, real_sets, gram)
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


def _gram_set_distances(pred_sets: list, real_sets: list, gram) -> dict[str, torch.Tensor]:
    from perturbdiff.ops.reference import radial  # the kernels' one Python definition

    out: dict[str, list[torch.Tensor]] = {key: [] for key in SET_DISTANCES}
    for x, y in zip(pred_sets, real_sets):
        gxx, gyy = gram(x), gram(y)
        sq_x, sq_y = gxx.diagonal().clone(), gyy.diagonal().clone()
        d = (_squared_distances(sq_x, sq_x, gxx), _squared_distances(sq_y, sq_y, gyy),
             _squared_distances(sq_x, sq_y, gram(x, y)))
        for key, (kernel, bandwidths) in SET_DISTANCES.items():
            kxx, kyy, kxy = (radial(kernel, di, bandwidths).mean() for di in d)
            out[key].append(kxx + kyy - 2 * kxy)
    return {key: torch.stack(v) for key, v in out.items()}
