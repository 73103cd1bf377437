"""Metric names, their best values (for baseline scoring) and the metric profiles."""

from __future__ import annotations

from .de_metrics import TOP_K

_TOP = ["N" if k is None else str(k) for k in TOP_K]

DE_METRICS = (
    [f"overlap_at_{k}" for k in _TOP] + [f"precision_at_{k}" for k in _TOP]
    + ["de_spearman_sig", "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall",
       "de_nsig_counts_real", "de_nsig_counts_pred", "pr_auc", "roc_auc"]
)
EXPRESSION_METRICS = [
    "pearson_delta", "mse", "mae", "mse_delta", "mae_delta",
    "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
    "pearson_edistance",
]
# Not in cell-eval: CellFlow's R^2 (the PerturbDiff paper's headline) and set-level distances
# between the predicted and the real cells of each perturbation.
EXTRA_METRICS = ["r2", "r2_delta", "energy_distance", "mmd_rbf"]
ALL_METRICS = DE_METRICS + EXPRESSION_METRICS + EXTRA_METRICS

# Metrics that are one number per context, repeated on each of its rows (as cell-eval does).
SCALAR_METRICS = {"de_spearman_sig", "pearson_edistance"}

BEST_VALUE: dict[str, float | None] = {m: 1.0 for m in ALL_METRICS}
BEST_VALUE.update({m: 0.0 for m in ("mse", "mae", "mse_delta", "mae_delta",
                                    "energy_distance", "mmd_rbf")})
BEST_VALUE.update({"de_nsig_counts_real": None, "de_nsig_counts_pred": None})

PROFILES: dict[str, list[str]] = {
    "full": ALL_METRICS,
    # What cell-eval's own "full" profile reports (its clustering_agreement aside).
    "cell-eval": DE_METRICS + EXPRESSION_METRICS,
    "minimal": ["pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N",
                "precision_at_N", "de_nsig_counts_real", "de_nsig_counts_pred"],
    "vcc": ["mae", "discrimination_score_l1", "overlap_at_N"],
    "de": DE_METRICS,
    "anndata": EXPRESSION_METRICS + ["r2", "r2_delta"],
    "pds": ["discrimination_score_l1"],
    "distribution": ["energy_distance", "mmd_rbf"],
}


def profile_metrics(profile: str) -> list[str]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[profile]
