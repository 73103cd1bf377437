"""Expression-space metrics on pseudobulk means, vectorised over perturbations.

Definitions follow cell-eval (metrics.md 1.2): the predicted deltas use the *predicted*
file's own control cells; mse/mae compare means without control subtraction.
"""

from __future__ import annotations

import numpy as np
import torch

from .ranking import masked_pearson

DISTANCES = ("l1", "l2", "cosine")


def r2_rows(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """``sklearn.metrics.r2_score(y_true[i], y_pred[i])`` for every row (force_finite rules)."""
    ss_res = ((y_true - y_pred) ** 2).sum(-1)
    ss_tot = ((y_true - y_true.mean(-1, keepdim=True)) ** 2).sum(-1)
    r2 = 1 - ss_res / ss_tot
    constant = torch.where(ss_res == 0, 1.0, 0.0).to(r2.dtype)
    return torch.where(ss_tot == 0, constant, r2)


def mean_metrics(real_means: torch.Tensor, pred_means: torch.Tensor, real_ctrl: torch.Tensor,
                 pred_ctrl: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-perturbation metrics from means ``[P, G]`` and control means ``[G]``."""
    d_real = real_means - real_ctrl
    d_pred = pred_means - pred_ctrl
    diff, ddiff = pred_means - real_means, d_pred - d_real
    return {
        "pearson_delta": masked_pearson(d_pred, d_real),
        "mse": (diff ** 2).mean(-1),
        "mae": diff.abs().mean(-1),
        "mse_delta": (ddiff ** 2).mean(-1),
        "mae_delta": ddiff.abs().mean(-1),
        "r2": r2_rows(real_means, pred_means),
        "r2_delta": r2_rows(d_real, d_pred),
    }


def target_gene_columns(perts: list[str], genes: np.ndarray, mode: str) -> list[list[int]]:
    """Gene columns to hide from perturbation ``p``'s discrimination distances.

    mode "exact": the column named exactly ``p`` (cell-eval). mode "components": also every
    part of a combination label "A+B" (both targets are knocked down, so both are trivial
    give-aways); identical to "exact" for single-gene labels.
    """
    if mode not in ("exact", "components"):
        raise ValueError(f"target exclusion mode must be 'exact' or 'components', got {mode!r}")
    index = {g: i for i, g in enumerate(genes.tolist())}
    out = []
    for p in perts:
        names = {p} | (set(p.split("+")) if mode == "components" else set())
        out.append(sorted(index[n] for n in names if n in index))
    return out


def _excluded_index(excluded: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the per-perturbation excluded columns to ``[P, K]`` (index, validity mask)."""
    k = max(1, max(len(c) for c in excluded))
    idx = torch.zeros(len(excluded), k, dtype=torch.long)
    valid = torch.zeros(len(excluded), k, dtype=torch.bool)
    for p, cols in enumerate(excluded):
        idx[p, :len(cols)] = torch.tensor(cols, dtype=torch.long)
        valid[p, :len(cols)] = True
    return idx.to(device), valid.to(device)


def _distances(d_pred: torch.Tensor, d_real: torch.Tensor, metric: str, idx: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
    """Distances ``[P, Q]`` from predicted delta p to every real delta q, without p's columns.

    Full-panel sums minus the excluded columns' terms: one pass over the genes for all rows.
    """
    pe = torch.where(valid, d_pred.gather(1, idx), 0.0)           # [P, K]
    re = torch.where(valid[:, None, :], d_real[:, idx].permute(1, 0, 2), 0.0)  # [P, Q, K]
    if metric == "l1":
        full = torch.cdist(d_pred, d_real, p=1)
        return full - (pe[:, None, :] - re).abs().sum(-1)
    if metric == "l2":
        full = torch.cdist(d_pred, d_real, p=2, compute_mode="donot_use_mm_for_euclid_dist")
        return (full ** 2 - ((pe[:, None, :] - re) ** 2).sum(-1)).clamp_min(0).sqrt()
    dot = d_pred @ d_real.T - (pe[:, None, :] * re).sum(-1)
    norm_p = ((d_pred ** 2).sum(-1) - (pe ** 2).sum(-1)).clamp_min(0).sqrt()[:, None]
    norm_q = ((d_real ** 2).sum(-1)[None, :] - (re ** 2).sum(-1)).clamp_min(0).sqrt()
    # sklearn's cosine distance: a zero vector keeps norm 1 (similarity 0); clipped to [0, 2].
    norm_p = torch.where(norm_p == 0, 1.0, norm_p)
    norm_q = torch.where(norm_q == 0, 1.0, norm_q)
    return (1 - dot / (norm_p * norm_q)).clamp(0.0, 2.0)


def discrimination_scores(d_real: torch.Tensor, d_pred: torch.Tensor,
                          excluded: list[list[int]], metrics=DISTANCES) -> dict[str, torch.Tensor]:
    """Perturbation discrimination score (PDS): 1 - rank / N of the true perturbation.

    Row p's distances to every real delta skip the columns in ``excluded[p]``. Ties in
    distance are ranked by perturbation order (a stable sort), a fixed rule where cell-eval's
    unstable argsort is arbitrary.
    """
    n_perts = d_real.shape[0]
    idx, valid = _excluded_index(excluded, d_real.device)
    order = torch.arange(n_perts, device=d_real.device)
    out = {}
    for metric in metrics:
        dist = _distances(d_pred, d_real, metric, idx, valid)
        own = dist.diagonal()[:, None]
        before = (dist < own) | ((dist == own) & (order[None, :] < order[:, None]))
        out[f"discrimination_score_{metric}"] = 1 - before.sum(1).to(dist.dtype) / n_perts
    return out
