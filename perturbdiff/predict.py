"""Predictor: generate every cell of every group of a split and write h5ad files cell-eval reads.

For each group the model generates as many cells as the real group has (sets of S cells, the last
set padded by resampling and trimmed back), each set conditioned on matched control cells drawn by
``perturbdiff.data.iter_eval_groups``. The prediction file holds the generated cells (obs copied
1:1 from the real cells they stand for, so the columns are the store's original obs keys) followed
by the real control cells of every context involved; ``perturbdiff_source`` marks "predicted" vs
"real". The optional real file has the same obs rows with the real expression, so both files share
the control block exactly, as the evaluator and cell-eval expect. Values are on the log1p scale.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .diffusion import GaussianDiffusion
from .model import build_from_state
from .model.checkpoint import load_checkpoint
from .model.covariates import ROLES

SOURCE_COLUMN = "perturbdiff_source"


def _gene_index(model_genes: list[str], store_genes: list[str]) -> np.ndarray | None:
    """Store columns in the model's gene order (None when identical); error names missing genes."""
    if list(model_genes) == list(store_genes):
        return None
    pos = {g: i for i, g in enumerate(store_genes)}
    missing = [g for g in model_genes if g not in pos]
    if missing:
        raise ValueError(f"the store lacks {len(missing)} of the checkpoint's {len(model_genes)} genes: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return np.array([pos[g] for g in model_genes])


def _code_maps(model_vocab: dict, store_vocab: dict) -> dict[str, np.ndarray]:
    """Per role: store code -> checkpoint code (-1 for labels the checkpoint never saw)."""
    maps = {}
    for role in ROLES:
        pos = {lab: i for i, lab in enumerate(model_vocab[role])}
        maps[role] = np.array([pos.get(lab, -1) for lab in store_vocab[role]], dtype=np.int64)
    return maps


def _model_code(maps, store, role: str, code: int) -> int:
    mapped = int(maps[role][code])
    if mapped < 0:
        raise ValueError(f"{role} label {store.vocab[role][code]!r} is unknown to the checkpoint "
                         "(it was not in the training store's vocabulary)")
    return mapped


def _write_h5ad(adata, path: Path) -> None:
    from .atomic import write_atomic

    write_atomic(path, adata.write_h5ad)


def predict(checkpoint: str | os.PathLike, split: str = "test", out: str | os.PathLike = "pred.h5ad",
            store: str | os.PathLike | None = None, guidance: float | None = None, steps: int | None = None,
            write_real: str | os.PathLike | None = None, seed: int = 0, batch_cells: int | None = None,
            schedule: str | None = None, use_ema: bool = True, device: str = "auto",
            progress: bool = True) -> Path:
    """Generate the groups of `split` ("train", "val", "test" or "all") and write `out` (h5ad).

    store: defaults to the checkpoint's training store; guidance/steps/schedule/batch_cells default
    to the checkpoint's ``[sample]`` settings; use_ema=False samples with the raw weights.
    write_real: also write the matching real h5ad there. Returns the path of `out`.
    """
    import anndata as ad
    import pandas as pd
    from tqdm.auto import tqdm

    from .data import PerturbStore, iter_eval_groups, load_split

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    sample = cfg["sample"]
    guidance = sample["guidance"] if guidance is None else float(guidance)
    steps = sample["steps"] if steps is None else int(steps)
    schedule = schedule or sample["schedule"]
    batch_cells = batch_cells or sample["batch_cells"]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    store = PerturbStore.open(store or cfg["data"]["store"])
    layout = None
    if split != "all":
        if not cfg["data"]["split"]:
            raise ValueError(f"split={split!r} needs the checkpoint's data.split file; the model was "
                             "trained without one (use split='all')")
        layout = load_split(cfg["data"]["split"], store)
    gene_idx = _gene_index(ckpt["genes"], store.genes)
    maps = _code_maps(ckpt["vocab"], store.vocab)
    model = build_from_state(cfg["model"], ckpt["genes"], ckpt["vocab"], ckpt["ema" if use_ema else "model"])
    model.to(dev).eval()
    diffusion = GaussianDiffusion(cfg["diffusion"]["timesteps"], cfg["diffusion"]["beta_start"],
                                  cfg["diffusion"]["beta_end"])
    diffusion.sample_timesteps(schedule, steps)  # validate before the long loop
    set_size, scale = cfg["data"]["set_size"], cfg["data"]["scale"]
    sets_per_call = max(1, batch_cells // set_size)
    data_max = store.meta["preprocessing"].get("max_value")  # absent in stores of older versions
    clip_max = data_max / scale if data_max and sample.get("clip_to_data", True) else None

    groups = []        # (real rows [n], mask [n_sets, S]) per group, in split order
    pending = []       # (group index, set index, ctrl [S, G], (pert, context, batch))
    outputs = {}       # (group index, set index) -> generated set [S, G]
    n_calls = 0

    def flush(items):
        nonlocal n_calls
        ctrl = torch.stack([it[2] for it in items]).to(dev)
        codes = [torch.tensor([it[3][r] for it in items], device=dev) for r in range(3)]
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed * 1_000_003 + n_calls)
        x0 = diffusion.ddim_sample(model, ctrl, *codes, generator=gen, guidance=guidance,
                                   schedule=schedule, steps=steps, cutoff=sample["cutoff"],
                                   clip_max=clip_max)
        for it, cells in zip(items, x0.cpu()):
            outputs[(it[0], it[1])] = cells
        n_calls += 1
        bar.update(len(items))

    part = split if layout is not None else "all"
    n_sets_total = int(sum(-(-int(n) // set_size) for n in
                           store.groups["n_cells"].to_numpy()[_group_ids(store, part, layout)]))
    bar = tqdm(total=n_sets_total, desc=f"predict {split}", unit="set", disable=not progress)
    with bar:
        for gi, item in enumerate(iter_eval_groups(store, part, set_size=set_size, seed=seed, scale=scale,
                                                   layout=layout)):
            codes = tuple(_model_code(maps, store, role, item[key]) for role, key in
                          zip(ROLES, ("pert", "context", "batch")))
            mask = item["mask"].numpy()
            groups.append((item["rows"][mask], mask, item["context"]))
            ctrl = item["ctrl"] if gene_idx is None else item["ctrl"][..., gene_idx]
            pending += [(gi, si, ctrl[si], codes) for si in range(ctrl.shape[0])]
            while len(pending) >= sets_per_call:
                flush(pending[:sets_per_call])
                pending = pending[sets_per_call:]
        if pending:
            flush(pending)
    if not groups:
        raise ValueError(f"split {split!r} has no groups to predict")

    pred = np.concatenate([torch.stack([outputs[(gi, si)] for si in range(mask.shape[0])]).numpy()[mask]
                           for gi, (_, mask, _) in enumerate(groups)]) * scale
    real_rows = np.concatenate([rows for rows, _, _ in groups])
    contexts = {c for _, _, c in groups}
    ctrl_table = store.control_groups
    ctrl_rows = np.concatenate([np.arange(r.start, r.stop) for r in ctrl_table.itertuples()
                                if r.context in contexts] or [np.zeros(0, dtype=np.int64)])
    obs = pd.concat([store.obs_frame(real_rows), store.obs_frame(ctrl_rows)])
    var = pd.DataFrame(index=pd.Index(list(ckpt["genes"])))

    def dense(rows):
        x = store.dense(rows)
        return x if gene_idx is None else x[:, gene_idx]

    controls = dense(ctrl_rows)
    uns = {"perturbdiff": {"checkpoint": str(checkpoint), "split": split, "guidance": guidance,
                           "steps": steps, "schedule": schedule, "seed": seed, "ema": use_ema}}
    out = Path(out)
    pred_obs = obs.copy()
    pred_obs[SOURCE_COLUMN] = pd.Categorical(["predicted"] * len(real_rows) + ["real"] * len(ctrl_rows))
    _write_h5ad(ad.AnnData(sp.csr_matrix(np.concatenate([pred, controls]).astype(np.float32)),
                           obs=pred_obs, var=var, uns=uns), out)
    if write_real is not None:
        real_obs = obs.copy()
        real_obs[SOURCE_COLUMN] = pd.Categorical(["real"] * len(obs))
        _write_h5ad(ad.AnnData(sp.csr_matrix(np.concatenate([dense(real_rows), controls]).astype(np.float32)),
                               obs=real_obs, var=var, uns=uns), Path(write_real))
    return out


def _group_ids(store, part: str, layout) -> np.ndarray:
    return np.arange(len(store.groups)) if layout is None else layout.group_ids(part)
