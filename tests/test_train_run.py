"""End-to-end trainer and predictor on a tiny store: exact resume, checkpoint errors,
fine-tuning transfer, overfitting a small screen, and the prediction files."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

data = pytest.importorskip("perturbdiff.data")  # written in parallel; the lead re-runs these

from perturbdiff.config import ConfigError  # noqa: E402
from perturbdiff.model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from perturbdiff.train import Dist, Trainer, train  # noqa: E402
from perturbdiff.config import load_config  # noqa: E402

PERTS, CONTEXTS = ["control", "P1", "P2", "P3"], ["A", "B"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_adata(cells=48, seed=0, perts=PERTS, gene_names=None):
    """log1p-scale screen with strong, distinct effects per perturbation and context."""
    import anndata as ad

    gene_names = gene_names or [f"g{i}" for i in range(16)]
    n_genes = len(gene_names)
    rng = np.random.default_rng(seed)
    base = {c: rng.uniform(0.5, 2.0, n_genes) for c in CONTEXTS}
    eff = {p: np.zeros(n_genes) if p == "control" else rng.normal(0, 1.0, n_genes) for p in perts}
    X, obs = [], []
    for p in perts:
        for c in CONTEXTS:
            mu = np.clip(base[c] + eff[p], 0, None)
            X.append(np.clip(mu + 0.3 * rng.standard_normal((cells, n_genes)), 0, None))
            obs += [(p, c)] * cells
    obs = pd.DataFrame(obs, columns=["condition", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=gene_names)
    return ad.AnnData(np.concatenate(X).astype(np.float32), obs=obs, var=var)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "tiny"
    return data.prepare_store(tiny_adata(), out, "condition", "cell_type", control_label="control",
                              progress=False)


def small(store, run_dir, *extra):
    return ["run.device=cpu", f"data.store={store}", f"run.dir={run_dir}", "data.set_size=8",
            "data.sets_per_batch=2", "model.width=32", "model.depth=2", "model.heads=4",
            "model.cov_hidden=16", "train.progress=false", "train.val_every=0", "train.log_every=1",
            "optim.warmup_steps=3", *extra]


def test_resume_is_bit_identical(store, tmp_path):
    common = ["train.max_steps=10", "train.checkpoint_every=5", "train.grad_accum=2", "train.ema_every=2"]
    straight = train("cpu-small", small(store, tmp_path / "a", *common))
    interrupted = small(store, tmp_path / "b", *common, "train.stop_after=5")
    train("cpu-small", interrupted)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 5
    resumed = train("cpu-small", interrupted)  # resume=auto picks up last.pt
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 10 and a["data_position"] == b["data_position"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)

    def losses(run):
        with open(run / "loss.csv") as fh:
            return [(r["step"], r["loss"]) for r in csv.DictReader(fh)]

    assert losses(straight) == losses(resumed) and len(losses(resumed)) == 10
    with pytest.raises(ConfigError, match="settings differ.*model.width"):
        Trainer(load_config("cpu-small", small(store, tmp_path / "b", *common, "model.width=64")), Dist())
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(load_config("cpu-small", small(store, tmp_path / "b", "train.resume=never")), Dist())


def test_corrupted_and_foreign_checkpoints(store, tmp_path):
    run = train("cpu-small", small(store, tmp_path / "r", "train.max_steps=2"))
    good = run / "checkpoints" / "last.pt"
    assert set(load_checkpoint(good)) >= {"model", "ema", "optimizer", "scheduler", "rng", "data_position",
                                           "config", "vocab", "genes"}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(garbage)
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "pytorch-lightning_version": "2.0"}, lightning)
    with pytest.raises(CheckpointError, match="not a perturbdiff checkpoint.*Lightning"):
        load_checkpoint(lightning)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "perturbdiff-checkpoint", "obj": Path("x")}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(unsafe)
    assert not list((run / "checkpoints").glob(".*tmp")), "no temporary files left behind"


def test_finetune_maps_genes_and_labels(store, tmp_path):
    run = train("cpu-small", small(store, tmp_path / "src", "train.max_steps=2", "train.ema_every=1"))
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    genes = [f"g{i}" for i in range(15, 3, -1)] + ["new1", "new2"]  # reordered subset + new genes
    other = data.prepare_store(tiny_adata(gene_names=genes, perts=["control", "P2", "P9"]), tmp_path / "other",
                               "condition", "cell_type", control_label="control", progress=False)
    cfg = load_config("cpu-small", small(other, tmp_path / "ft", f"train.init_from={run / 'checkpoints' / 'last.pt'}"))
    model = Trainer(cfg, Dist()).model
    ema = ckpt["ema"]
    src_genes = ckpt["genes"]
    w_new = model.backbone.final_layer.linear.weight
    for i, g in enumerate(model_genes := data.PerturbStore.open(other).genes):
        if g in src_genes:
            assert torch.equal(w_new[i], ema["backbone.final_layer.linear.weight"][src_genes.index(g)])
    assert "new1" in model_genes
    vocab_old = ckpt["vocab"]["perturbation"]
    vocab_new = data.PerturbStore.open(other).vocab["perturbation"]
    table_new = model.covariates.encoders["perturbation"].weight
    p2_old, p2_new = vocab_old.index("P2") + 1, vocab_new.index("P2") + 1  # row 0 = no perturbation
    assert torch.equal(table_new[p2_new], ema["covariates.encoders.perturbation.weight"][p2_old])
    p9 = vocab_new.index("P9") + 1
    fresh = Trainer(load_config("cpu-small", small(other, tmp_path / "fresh")), Dist()).model
    assert torch.equal(table_new[p9], fresh.covariates.encoders["perturbation"].weight[p9])
    assert not torch.equal(table_new[p2_new], fresh.covariates.encoders["perturbation"].weight[p2_new])
    with pytest.raises(ConfigError, match="init_from to fine-tune"):
        bad = load_config("cpu-small", small(other, run))  # resume a run of another store
        Trainer(bad, Dist())


def test_overfit_tiny_screen_and_predict(store, tmp_path):
    run = train("cpu-small", small(store, tmp_path / "fit", "model.width=64", "model.depth=1",
                                   "data.set_size=16", "data.sets_per_batch=4", "train.max_steps=400",
                                   "optim.lr=3e-3", "optim.warmup_steps=20", "train.ema_every=1",
                                   "train.ema_decay=0.9", "train.log_every=10", "train.checkpoint_every=1000",
                                   # fewer guidance-dropout batches: the conditional model fits in 400 steps
                                   "diffusion.p_drop_cond=0.2"))
    with open(run / "loss.csv") as fh:
        loss = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert np.mean(loss[:2]) > 5 * np.mean(loss[-3:]), loss

    from perturbdiff.predict import predict
    import anndata as ad

    pred_path = predict(run / "checkpoints" / "last.pt", split="all", out=tmp_path / "pred.h5ad",
                        write_real=tmp_path / "real.h5ad", guidance=0.0, steps=50, progress=False)
    pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(tmp_path / "real.h5ad")
    assert list(pred.obs.index) == list(real.obs.index) and list(pred.var_names) == list(real.var_names)
    assert set(pred.obs.columns) == {"condition", "cell_type", "perturbdiff_source"}
    ctrl = (pred.obs["condition"] == "control").to_numpy()
    assert (pred.obs.loc[ctrl, "perturbdiff_source"] == "real").all()
    assert (pred.obs.loc[~ctrl, "perturbdiff_source"] == "predicted").all()
    assert np.array_equal(pred.X[ctrl].toarray(), real.X[ctrl].toarray())
    counts = pred.obs.loc[~ctrl, "condition"].astype(str).value_counts()
    assert counts.to_dict() == {"P1": 96, "P2": 96, "P3": 96}  # 1:1 with the real cells
    key = (pred.obs["condition"].astype(str) + "/" + pred.obs["cell_type"].astype(str)).to_numpy()
    pm = pd.DataFrame(pred.X.toarray()).groupby(key).mean()
    rm = pd.DataFrame(real.X.toarray()).groupby(key).mean()
    err = ((pm - rm) ** 2).to_numpy().mean()
    baseline = np.mean([((rm.loc[k] - rm.loc["control/" + k.split("/")[1]]) ** 2).mean() for k in rm.index])
    assert err < 0.25 * baseline, (err, baseline)
    assert np.corrcoef(pm.to_numpy().ravel(), rm.to_numpy().ravel())[0, 1] > 0.9


def test_bf16_without_native_support_warns(store, tmp_path, monkeypatch, capsys):
    import perturbdiff.train as train_mod

    assert isinstance(train_mod.bf16_is_native(torch.device("cpu")), bool)
    monkeypatch.setattr(train_mod, "bf16_is_native", lambda device: False)
    Trainer(load_config("cpu-small", small(store, tmp_path / "bf", "train.bf16=true")), Dist())
    assert "without native bf16" in capsys.readouterr().out
    Trainer(load_config("cpu-small", small(store, tmp_path / "fp", "train.bf16=false")), Dist())
    assert "bf16" not in capsys.readouterr().out


def test_torchrun_two_processes_train_and_shut_down_cleanly(store, tmp_path):
    """`torchrun --nproc_per_node 2 -m perturbdiff train` (gloo): both ranks train, rank 0 writes
    the run, and both exit cleanly (a rank aborting in the process group's teardown fails it)."""
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "perturbdiff", "train", "cpu-small",
           *small(store, run_dir, "train.max_steps=2", "train.checkpoint_every=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(run_dir.rglob("*.pt")), sorted(p.name for p in run_dir.rglob("*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_and_prediction_on_gpu(store, tmp_path, bf16):
    """A few steps on the GPU with the loss through the GPU kernels, a checkpoint, and a resume."""
    from perturbdiff.ops import api

    args = small(store, tmp_path / "g", "run.device=cuda", f"train.bf16={str(bf16).lower()}",
                 "train.checkpoint_every=3")
    run = train("cpu-small", args + ["train.max_steps=3"])
    assert api.last_backend() in ("triton", "cuda")
    run = train("cpu-small", args + ["train.max_steps=6"])
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    with open(run / "loss.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 6 and np.isfinite(losses).all()
