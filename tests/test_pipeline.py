"""End to end on the shared real dataset: prepare -> split -> train -> predict -> baselines ->
evaluate, a short version of the README's real-data run."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from perturbdiff.pipeline import BASELINES, run_pipeline

SPLIT = Path(__file__).resolve().parents[1] / "perturbdiff" / "configs" / "splits" / "perturbench_devel.toml"
TINY = ("model.width=32", "model.depth=1", "model.heads=2", "model.cov_hidden=32",
        "train.max_steps=6", "train.log_every=3", "train.val_every=0", "train.checkpoint_every=6",
        "sample.steps=4", "data.set_size=16")


def test_real_data_pipeline(shared_data, tmp_path):
    res = run_pipeline(shared_data, tmp_path, pert_key="condition", context_key="cell_type",
                       control_label="control", split=str(SPLIT), overrides=TINY, progress=False)
    assert res.checkpoint.exists()
    assert set(res.table.index) == {"perturbdiff", *BASELINES}
    assert np.isfinite(res.table.loc["control_mean", "pearson_delta"])

    real, pred = ad.read_h5ad(tmp_path / "real.h5ad"), ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(pred.var_names) == list(real.var_names)
    held = real.obs["cell_type"].isin(["A172", "U87MG"])
    # only the held-out (context x test perturbation) groups are predicted, 1:1 cell counts
    groups = lambda a: a.obs[a.obs.condition != "control"].groupby(["cell_type", "condition"], observed=True).size()
    assert groups(pred).to_dict() == groups(real).to_dict()
    assert set(groups(real).index.get_level_values(0)) <= {"A172", "U87MG"}
    assert set(groups(real).index.get_level_values(1)) == {"MAP2K3", "MAP4K5", "MAPK1", "SGK1", "TGFBR2"}
    assert held.any()
    # the real control block is carried unchanged into the prediction file
    dense = lambda m: m.toarray() if hasattr(m, "toarray") else np.asarray(m)
    ctrl_r, ctrl_p = real[real.obs.condition == "control"], pred[pred.obs.condition == "control"]
    np.testing.assert_array_equal(dense(ctrl_p.X), dense(ctrl_r.X))

    report = (res.report if res.report.is_file() else res.report / "report.md").read_text()
    for name in ("perturbdiff", *BASELINES):
        assert name in report
    for f in ("results.csv", "agg_results.csv", "metrics.png"):
        assert (tmp_path / "report" / f).exists()


def test_pipeline_names_missing_keys(shared_data, tmp_path):
    with pytest.raises(ValueError, match="no_such_key"):
        run_pipeline(shared_data, tmp_path, pert_key="no_such_key", context_key="cell_type",
                     control_label="control", progress=False)


def test_demo_command_on_a_synthetic_screen(tmp_path, capsys):
    from perturbdiff.cli import main

    tiny = [o for o in TINY if not o.startswith("train.max_steps")]
    assert main(["demo", "--out", str(tmp_path), "--cells", "1500", "--genes", "80", "--steps", "4",
                 "--no-progress", *tiny]) == 0
    out = capsys.readouterr().out
    assert "pearson_delta" in out and "perturbation_mean" in out
    assert (tmp_path / "screen.h5ad").exists() and (tmp_path / "report" / "report.md").exists()


def test_console_command_exits_quietly():
    """``python -m perturbdiff info`` exits 0 with nothing on stderr (no leak reports from
    extension modules at interpreter exit, e.g. when the collector was frozen)."""
    proc = subprocess.run([sys.executable, "-m", "perturbdiff", "info"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "perturbdiff" in proc.stdout and proc.stderr.strip() == "", proc.stderr[-2000:]
