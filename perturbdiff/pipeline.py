"""The whole workflow in one call: h5ad -> store -> split -> train -> predict -> baselines ->
evaluation report. ``perturbdiff demo`` runs it on a synthetic screen; pointed at a real h5ad it is
the reproducible real-data run of the README."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_atomic, write_text_atomic

BASELINES = ("control_mean", "perturbation_mean", "context_mean", "linear")
HEADLINE = ("pearson_delta", "energy_distance", "mse", "discrimination_score_l1", "overlap_at_N",
            "roc_auc", "r2")


@dataclass
class PipelineResult:
    out: Path
    checkpoint: Path
    report: Path
    table: "object"  # pandas DataFrame: mean of each headline metric per model
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _step(name: str, timings: dict):
    """Print a header for one pipeline stage and record its wall time."""
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"   ({timings[name]:.1f} s)", flush=True)


def export_split(store, group_ids: np.ndarray, path: Path, with_controls: bool = True) -> Path:
    """Write the cells of some groups (plus every control cell) as a log1p h5ad with the store's
    original obs keys: the fitting set the baselines learn from."""
    import anndata as ad
    import pandas as pd

    rows = [store.group_rows(int(g)) for g in group_ids]
    if with_controls:
        rows.append(np.flatnonzero(store.is_control))
    rows = np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
    adata = ad.AnnData(X=store.dense(rows), obs=store.obs_frame(rows),
                       var=pd.DataFrame(index=pd.Index(store.genes)))
    return write_atomic(path, adata.write_h5ad)


def run_pipeline(h5ad: str | os.PathLike, out: str | os.PathLike, pert_key: str, context_key: str,
                 control_label: str, batch_key: str | None = None, split: str | None = None,
                 config: str = "cpu-small", overrides: tuple[str, ...] = (),
                 n_top_genes: int | None = None, baselines=BASELINES, seed: int = 0,
                 progress: bool = True) -> PipelineResult:
    """Prepare, split, train, predict the test groups, build baselines and evaluate them all.

    split: a split TOML; None proposes one (one held-out context, unseen combinations).
    config/overrides: the training config (preset name or TOML path) and key=value overrides.
    Everything lands in ``out``: store/, split.toml, run/, pred.h5ad, real.h5ad, baselines/, report/.
    """
    from .data import PerturbStore, load_split, prepare_store, propose_split, split_report
    from .evaluate import evaluate
    from .evaluate.baselines import make_baseline
    from .evaluate.report import write_report
    from .predict import predict
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _step("prepare: validate the h5ad and write the training store", timings):
        store_path = prepare_store(h5ad, out / "store", pert_key, context_key, batch_key,
                                   control_label, n_top_genes=n_top_genes, progress=progress,
                                   overwrite=True)
        store = PerturbStore.open(store_path)
        print(f"   {store.n_cells} cells x {store.n_genes} genes, {len(store.groups)} perturbed groups")

    with _step("split: held-out (context x perturbation) combinations", timings):
        layout = load_split(split, store) if split else propose_split(store, seed=seed)
        split_path = layout.save(out / "split.toml")
        print(split_report(layout, store))

    with _step(f"train: PerturbDiff ({config})", timings):
        run_dir = train(config, [f"data.store={store_path}", f"data.split={split_path}",
                                 f"run.dir={out / 'run'}", f"run.seed={seed}", "train.resume=never",
                                 f"train.progress={str(progress).lower()}", *overrides])
        checkpoint = run_dir / "checkpoints" / "last.pt"

    with _step("predict: sample every test group (as many cells as the real group)", timings):
        pred = predict(checkpoint, split="test", out=out / "pred.h5ad", write_real=out / "real.h5ad",
                       seed=seed, progress=progress)

    import anndata as ad

    real = ad.read_h5ad(out / "real.h5ad")
    preds = {"perturbdiff": pred}
    with _step(f"baselines: {', '.join(baselines)}", timings):
        train_h5ad = export_split(store, layout.group_ids("train"), out / "baselines" / "train.h5ad")
        fit = ad.read_h5ad(train_h5ad)
        for kind in baselines:
            path = out / "baselines" / f"{kind}.h5ad"
            write_atomic(path, make_baseline(kind, fit, real, pert_key, control_label,
                                             context_key).write_h5ad)
            preds[kind] = path

    with _step("evaluate: cell-eval metrics + set distances, per context", timings):
        results = {name: evaluate(p, real, pert_key, control_label, context_key, progress=progress)
                   for name, p in preds.items()}
        report = write_report(results, out / "report", real, preds, baselines=list(baselines))

    table = _headline(results)
    write_text_atomic(out / "timings.json", json.dumps(timings, indent=2))
    print("\n" + table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {report}")
    return PipelineResult(out, checkpoint, report, table, timings)


def _headline(results):
    import pandas as pd

    rows = {}
    for name, res in results.items():
        mean = res.agg.set_index("statistic").loc["mean"]
        rows[name] = {m: float(mean[m]) for m in HEADLINE if m in mean.index}
    return pd.DataFrame(rows).T
