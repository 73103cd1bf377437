"""Differential-expression recovery metrics, vectorised over perturbations and genes.

Inputs are ``[P, G]`` FDR and log2 fold-change tensors of the real and the predicted file
(same perturbations, same genes). cell-eval stores FDR and LFC as float32 before using them;
we round the same way, so significance at the 0.05 threshold and the |LFC| ranking (ties kept
in gene order, polars' "ordinal" rank) match it exactly.
"""

from __future__ import annotations

import math

import torch

from .._extension import has_kernel
from .ranking import ascending_order, average_precision_rows, masked_spearman, roc_auc_rows

FDR_THRESHOLD = 0.05
TOP_K = (None, 50, 100, 200, 500)  # None = N, the size of the reference DE list


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(torch.float64)


def _sig_rank(sig: torch.Tensor, abs_lfc: torch.Tensor, fdr: torch.Tensor) -> torch.Tensor:
    """0-based position of each significant gene in the |LFC|-descending list (ties by FDR,
    then gene order); G if not significant. FDR and |LFC| hold float32 values (cell-eval's
    rounding) and are compared as float32: two stable sorts of whole rows."""
    n_genes = sig.shape[-1]
    by_fdr = torch.sort(fdr.to(torch.float32), dim=-1, stable=True).indices
    key = torch.where(sig, abs_lfc, -1.0).gather(-1, by_fdr)  # non-significant sort last
    order = by_fdr.gather(-1, torch.sort(key.to(torch.float32), dim=-1, descending=True,
                                         stable=True).indices)
    pos = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n_genes, device=sig.device).expand_as(order).contiguous())
    return torch.where(sig, pos, n_genes)


def _top_k_overlap(rank_real, rank_pred, k_eff) -> torch.Tensor:
    hits = ((rank_real < k_eff[:, None]) & (rank_pred < k_eff[:, None])).sum(-1)
    return torch.where(k_eff > 0, hits / k_eff.clamp_min(1), 0.0).to(torch.float64)


def _names() -> list[str]:
    """The metrics in the order of the compiled op's output rows."""
    tops = ["N"] + [str(k) for k in TOP_K if k is not None]
    return [f"{m}_at_{k}" for k in tops for m in ("overlap", "precision")] + [
        "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall", "de_nsig_counts_real",
        "de_nsig_counts_pred", "pr_auc", "roc_auc"]


def de_metrics(fdr_real, lfc_real, fdr_pred, lfc_pred) -> dict[str, torch.Tensor]:
    """Per-perturbation DE metrics (cell-eval names); NaN where cell-eval has no value. On CPU
    the compiled perturbdiff::de_metrics (row by row: a few sorts per perturbation instead of
    ~100 whole-matrix ops; 33 perturbations x 2,000 genes: 12 ms -> 1.3 ms), else
    ``de_metrics_torch`` (also for NaN inputs, whose ranks the torch ops define)."""
    inputs = (fdr_real, lfc_real, fdr_pred, lfc_pred)
    if (fdr_real.device.type == "cpu" and has_kernel("de_metrics")
            and all(t.dtype == torch.float64 for t in inputs)
            and not any(bool(t.isnan().any()) for t in inputs)):
        rows = torch.ops.perturbdiff.de_metrics(*inputs, FDR_THRESHOLD,
                                                [k for k in TOP_K if k is not None])
        return dict(zip(_names(), rows))
    return de_metrics_torch(*inputs)


def de_metrics_torch(fdr_real, lfc_real, fdr_pred, lfc_pred) -> dict[str, torch.Tensor]:
    """``de_metrics`` in torch ops over whole [P, G] matrices (any device; the compiled op's
    oracle)."""
    lfc_real, lfc_pred = _f32(lfc_real), _f32(lfc_pred)
    fdr_real, fdr_pred = _f32(fdr_real), _f32(fdr_pred)
    sig_real = fdr_real < FDR_THRESHOLD
    sig_pred = fdr_pred < FDR_THRESHOLD
    n_real, n_pred = sig_real.sum(-1), sig_pred.sum(-1)
    rank_real = _sig_rank(sig_real, lfc_real.abs(), fdr_real)
    rank_pred = _sig_rank(sig_pred, lfc_pred.abs(), fdr_pred)
    out: dict[str, torch.Tensor] = {}
    for k in TOP_K:
        name = "N" if k is None else str(k)
        k_real = n_real if k is None else n_real.clamp_max(k)
        k_pred = n_pred if k is None else n_pred.clamp_max(k)
        out[f"overlap_at_{name}"] = _top_k_overlap(rank_real, rank_pred, k_real)
        out[f"precision_at_{name}"] = _top_k_overlap(rank_real, rank_pred, k_pred)

    has_real = n_real > 0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=sig_real.device)
    same_sign = (torch.sign(lfc_real) == torch.sign(lfc_pred)) & sig_real
    out["de_direction_match"] = torch.where(
        has_real, same_sign.sum(-1) / n_real.clamp_min(1), nan)
    out["de_spearman_lfc_sig"] = torch.where(
        has_real, masked_spearman(lfc_real, lfc_pred, sig_real), nan)
    out["de_sig_genes_recall"] = torch.where(
        has_real, (sig_real & sig_pred).sum(-1) / n_real.clamp_min(1), nan)
    out["de_nsig_counts_real"] = n_real.to(torch.float64)
    out["de_nsig_counts_pred"] = n_pred.to(torch.float64)
    # Score = -log10(pred FDR) in float32 as cell-eval computes it (ties included).
    q = fdr_pred.to(torch.float32).clamp(1e-10, 1.0)
    score = -(torch.log(q.to(torch.float64)).to(torch.float32) / torch.tensor(
        math.log(10.0), dtype=torch.float32))
    ascending = ascending_order(score)  # one sort for both AUCs
    out["pr_auc"] = average_precision_rows(sig_real, score, ascending)
    out["roc_auc"] = roc_auc_rows(sig_real, score, ascending)
    return out


def de_spearman_sig(n_real: torch.Tensor, n_pred: torch.Tensor) -> float:
    """Spearman, across perturbations with real DE genes, of real vs predicted DE counts.

    1.0 when no perturbation has a real DE gene (cell-eval's convention).
    """
    keep = n_real > 0
    if not bool(keep.any()):
        return 1.0
    return float(masked_spearman(n_real[keep].to(torch.float64)[None],
                                 n_pred[keep].to(torch.float64)[None])[0])
