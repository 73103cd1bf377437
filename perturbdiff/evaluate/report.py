"""Evaluation report: CSV tables, a markdown summary and PNG plots, each file atomic."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import score_tables  # noqa: E402
from ..atomic import write_atomic, write_text_atomic  # noqa: E402
from .catalog import BEST_VALUE  # noqa: E402
from .evaluator import EvalResult  # noqa: E402
from .inputs import group_cells, group_means, load_anndata  # noqa: E402

N_SCATTER = 6  # perturbations shown in the delta scatter plot


def _stacked(results: dict[str, EvalResult], attr: str) -> pd.DataFrame:
    frames = []
    for name, res in results.items():
        frame = getattr(res, attr).copy()
        frame.insert(0, "model", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _save_csv(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda p: frame.to_csv(p, index=False))


def _save_fig(fig, path: Path) -> None:
    write_atomic(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def _means(results: dict[str, EvalResult]) -> pd.DataFrame:
    return pd.DataFrame({name: r.agg.set_index("statistic").loc["mean"]
                         for name, r in results.items()})


def _plot_metric_bars(means: pd.DataFrame, path: Path) -> None:
    # Only metrics on a 0..1 "higher is better" scale share one axis meaningfully.
    rows = [m for m in means.index if BEST_VALUE.get(m) == 1.0]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) * max(1, means.shape[1] / 2)), 4))
    width = 0.8 / means.shape[1]
    x = np.arange(len(rows))
    for i, name in enumerate(means.columns):
        ax.bar(x + i * width, means.loc[rows, name], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, rows, rotation=60, ha="right")
    ax.set_ylabel("mean over perturbations")
    ax.set_title("metrics (higher is better)")
    ax.legend()
    _save_fig(fig, path)


def _deltas(adata: ad.AnnData, real: ad.AnnData, res: EvalResult):
    """Real and predicted pseudobulk deltas per (context, perturbation), in row order."""
    out = {}
    for g in group_cells(real, adata, res.pert_key, res.control_label, res.context_key):
        mr = group_means(real.X, [g.real_ctrl] + g.real_rows)
        mp = group_means(adata.X, [g.pred_ctrl] + g.pred_rows)
        for i, p in enumerate(g.perts):
            out[(g.context, p)] = (mr[i + 1] - mr[0], mp[i + 1] - mp[0])
    return out


def _plot_delta_scatter(name: str, pred: ad.AnnData, real: ad.AnnData, res: EvalResult,
                        path: Path) -> None:
    deltas = _deltas(pred, real, res)
    top = sorted(deltas, key=lambda k: -np.abs(deltas[k][0]).sum())[:N_SCATTER]
    cols = min(3, len(top))
    rows_n = int(np.ceil(len(top) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.6 * rows_n), squeeze=False)
    for ax, key in zip(axes.ravel(), top):
        d_real, d_pred = deltas[key]
        ax.scatter(d_real, d_pred, s=4, alpha=0.5)
        lim = float(max(np.abs(d_real).max(), np.abs(d_pred).max(), 1e-6))
        ax.plot([-lim, lim], [-lim, lim], lw=0.8, color="grey")
        ax.set_title(key[1] if key[0] is None else f"{key[1]} ({key[0]})", fontsize=9)
        ax.set_xlabel("real delta")
        ax.set_ylabel("predicted delta")
    for ax in axes.ravel()[len(top):]:
        ax.axis("off")
    fig.suptitle(f"{name}: predicted vs real deltas (largest real effects)")
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_de_recovery(results: dict[str, EvalResult], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        t = res.per_pert
        if "de_nsig_counts_real" in t:
            left.scatter(t["de_nsig_counts_real"], t["de_nsig_counts_pred"], s=10, label=name)
    left.set_xlabel("real DE genes (FDR < 0.05)")
    left.set_ylabel("predicted DE genes")
    left.set_title("DE gene counts per perturbation")
    if left.collections:
        left.legend()
    shown = [m for m in ("overlap_at_N", "precision_at_N", "de_direction_match", "roc_auc")
             if all(m in r.per_pert for r in results.values())]
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        right.bar(np.arange(len(shown)) + i * width,
                  [np.nanmean(res.per_pert[m]) for m in shown], width, label=name)
    right.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, shown, rotation=30, ha="right")
    right.set_title("DE recovery (mean over perturbations)")
    fig.tight_layout()
    _save_fig(fig, path)


def _md_table(frame: pd.DataFrame) -> str:
    """Markdown table without the optional ``tabulate`` dependency of ``DataFrame.to_markdown``."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v)
    head = [str(c) for c in frame.columns]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in frame.itertuples(index=False)]
    return "\n".join(rows)


def _markdown(results, means, scores, plots, real_desc) -> str:
    lines = ["# perturbdiff evaluation report", "", f"Real data: {real_desc}", ""]
    for name, res in results.items():
        ctx = f", contexts by `{res.context_key}`" if res.context_key else ""
        lines.append(f"- **{name}**: {len(res.per_pert)} perturbation groups{ctx}")
    lines += ["", "## Mean of each metric over perturbations", "",
              _md_table(means.rename_axis("metric").reset_index()), ""]
    if scores is not None:
        lines += ["## Score against baselines (Virtual Cell Challenge normalisation)", "",
                  "(user - base) / (1 - base) for metrics best at 1, 1 - user / base for "
                  "metrics best at 0; NaN -> 0, negatives clipped to 0.", "",
                  _md_table(scores), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Files: `results.csv` (per perturbation), `agg_results.csv` (count, "
              "null_count, mean, std, quantiles per metric)"
              + (", `scores.csv`." if scores is not None else "."), ""]
    return "\n".join(lines)


def write_report(results: dict[str, EvalResult], out_dir: str | os.PathLike,
                 real: ad.AnnData | str | os.PathLike,
                 pred_by_name: dict[str, ad.AnnData | str | os.PathLike],
                 baselines: Sequence[str] = ()) -> Path:
    """Write results.csv, agg_results.csv, report.md and plots (and scores.csv when
    ``baselines`` names entries of ``results`` to score the other models against)."""
    if not results:
        raise ValueError("write_report needs at least one EvalResult")
    unknown = [b for b in baselines if b not in results]
    if unknown:
        raise ValueError(f"baselines {unknown} are not among the results {list(results)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real_ad = load_anndata(real, "real")
    _save_csv(_stacked(results, "per_pert"), out / "results.csv")
    _save_csv(_stacked(results, "agg"), out / "agg_results.csv")
    scores = None
    models = [n for n in results if n not in baselines]
    if baselines and models:
        scores = pd.concat([
            score_tables(results[m].agg, results[b].agg).assign(model=m, baseline=b)
            for m in models for b in baselines], ignore_index=True)
        scores = scores[["model", "baseline", "metric", "from_baseline"]]
        _save_csv(scores, out / "scores.csv")
    means = _means(results)
    plots = [out / "metrics.png", out / "de_recovery.png"]
    _plot_metric_bars(means, plots[0])
    _plot_de_recovery(results, plots[1])
    for name in models:
        if name in pred_by_name:
            path = out / f"deltas_{name}.png"
            _plot_delta_scatter(name, load_anndata(pred_by_name[name], name), real_ad,
                                results[name], path)
            plots.append(path)
    desc = f"{real_ad.n_obs} cells x {real_ad.n_vars} genes"
    write_text_atomic(out / "report.md", _markdown(results, means, scores, plots, desc))
    return out
