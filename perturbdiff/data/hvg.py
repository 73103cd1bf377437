"""Streaming highly-variable-gene selection.

Flavour (documented because PerturbDiff does not state its own): Seurat-style dispersion on the
log1p(normalised) values. Per gene, mean m and variance v of the log1p values are accumulated
chunk by chunk (float64 sums, one pass); dispersion d = log(v / m); genes are put in 20
equal-width bins of m and d is z-scored within each bin (a bin with one gene gets z = 0); the
``n_top`` genes with the largest normalised dispersion are kept, in their original order.
Genes that are never expressed are never selected.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

N_BINS = 20


class GeneMoments:
    """Running per-gene sum and sum of squares over rows of a CSR chunk stream."""

    def __init__(self, n_genes: int):
        self.n = 0
        self.total = np.zeros(n_genes)
        self.total_sq = np.zeros(n_genes)

    def update(self, chunk: sp.csr_matrix) -> None:
        self.n += chunk.shape[0]
        self.total += np.bincount(chunk.indices, weights=chunk.data, minlength=self.total.size)
        self.total_sq += np.bincount(chunk.indices, weights=chunk.data ** 2, minlength=self.total.size)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / max(self.n, 1)
        var = self.total_sq / max(self.n, 1) - mean ** 2
        # Sample variance; clamp rounding noise below zero.
        var = np.maximum(var, 0.0) * (self.n / max(self.n - 1, 1))
        return mean, var


def select_hvg(mean: np.ndarray, var: np.ndarray, n_top: int) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` most dispersed genes; see the module docstring."""
    expressed = mean > 0
    if n_top < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top}")
    if n_top > expressed.sum():
        raise ValueError(
            f"n_top_genes={n_top} but only {int(expressed.sum())} of {mean.size} genes are expressed")
    score = np.full(mean.size, -np.inf)
    m, d = mean[expressed], np.log(np.maximum(var[expressed], 1e-12) / mean[expressed])
    edges = np.linspace(m.min(), m.max(), N_BINS + 1)
    bins = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, N_BINS - 1)
    z = np.zeros_like(d)
    for b in np.unique(bins):
        members = bins == b
        sd = d[members].std(ddof=1) if members.sum() > 1 else 0.0
        z[members] = (d[members] - d[members].mean()) / sd if sd > 0 else 0.0
    score[expressed] = z
    # Stable sort on -score: ties keep gene order, so the selection is deterministic.
    top = np.argsort(-score, kind="stable")[:n_top]
    return np.sort(top)
