"""Aggregate tables (cell-eval's ``agg_results``) and VCC-style scoring against a baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .catalog import BEST_VALUE

STATISTICS = ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]


def _nearest_quantile(sorted_values: np.ndarray, q: float) -> float:
    # polars describe(): "nearest" interpolation, index rounded half away from zero.
    if sorted_values.size == 0:
        return float("nan")
    return float(sorted_values[int(np.floor((sorted_values.size - 1) * q + 0.5))])


def describe(per_pert: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per statistic, one column per metric; missing (NaN) values are skipped.

    cell-eval distinguishes null (skipped) from NaN (makes mean/std NaN); here every missing
    value is skipped and counted in ``null_count``, so one undefined row (e.g. an AUC with a
    single label class) does not blank the whole aggregate.
    """
    columns = {}
    for m in metrics:
        v = per_pert[m].to_numpy(dtype=np.float64)
        ok = np.sort(v[~np.isnan(v)])
        n = ok.size
        columns[m] = [
            float(n), float(v.size - n),
            float(ok.mean()) if n else np.nan,
            float(ok.std(ddof=1)) if n > 1 else np.nan,
            float(ok[0]) if n else np.nan,
            *(_nearest_quantile(ok, q) for q in (0.25, 0.5, 0.75)),
            float(ok[-1]) if n else np.nan,
        ]
    out = pd.DataFrame(columns, index=STATISTICS)
    out.index.name = "statistic"
    return out.reset_index()


def score_tables(user_agg: pd.DataFrame, base_agg: pd.DataFrame, statistic: str = "mean"
                 ) -> pd.DataFrame:
    """Normalise each metric against the baseline (Virtual Cell Challenge / cell-eval score).

    Best value 1: (user - base) / (1 - base); best value 0: 1 - user / base. NaN becomes 0,
    negatives are clipped to 0, and ``avg_score`` is the mean of the normalised scores.
    """
    for name, table in (("model", user_agg), ("baseline", base_agg)):
        if statistic not in set(table["statistic"]):
            raise ValueError(f"{name} aggregate table has no {statistic!r} row")
    user = user_agg.set_index("statistic").loc[statistic]
    base = base_agg.set_index("statistic").loc[statistic]
    metrics = [m for m in user.index if m in base.index and BEST_VALUE.get(m) is not None]
    if not metrics:
        raise ValueError("model and baseline share no scorable metric")
    u = user[metrics].to_numpy(dtype=np.float64)
    b = base[metrics].to_numpy(dtype=np.float64)
    best_one = np.array([BEST_VALUE[m] == 1.0 for m in metrics])
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(best_one, (u - b) / (1 - b), 1 - u / b)
    s = np.clip(np.nan_to_num(s, nan=0.0, posinf=np.inf), 0.0, None)
    return pd.DataFrame({"metric": metrics + ["avg_score"],
                         "from_baseline": np.append(s, s.mean())})
