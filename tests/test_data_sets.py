"""Set sampling, control matching, loaders and splits."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbdiff.data.contract import EmptyGroupError, MissingLabelError
from perturbdiff.data.loader import SetBatches, iter_eval_groups, make_loader
from perturbdiff.data.sets import ControlMatcher, plan_sets
from perturbdiff.data.split import Split, load_split, propose_split, split_report
from perturbdiff.data.store import PerturbStore, prepare_store
from perturbdiff.data.synthetic import make_screen

S = 16
# The fixture store lacks controls in ctx1 on purpose; the warning itself is tested once below.
pytestmark = pytest.mark.filterwarnings("ignore:context .* has no control cells")


@pytest.fixture(scope="module")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perturbench_devel.h5ad"
    if not path.is_file():
        pytest.skip(f"shared dataset not found at {path}")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PerturbStore:
    """Synthetic screen, 3 contexts x 2 batches, with controls removed for ctx1 (whole context)
    and for (ctx2, batch1), so both fallback rules are exercised."""
    adata = make_screen(n_cells=3000, n_genes=80, n_perturbations=5, n_contexts=3, n_batches=2, seed=1)
    # Gene 0 carries a per-cell id so every expression vector is distinct: tests can tell which
    # store row the loader returned. Decimal values < 15 are taken as log1p and kept as they are.
    x = np.log1p(adata.X.toarray())
    x[:, 0] = np.log1p(np.arange(1, adata.n_obs + 1) / 7)
    adata.X = sp.csr_matrix(x)
    obs = adata.obs
    ctrl = obs["perturbation"] == "control"
    drop = ctrl & ((obs["cell_type"] == "ctx1") | ((obs["cell_type"] == "ctx2") & (obs["batch"] == "batch1")))
    adata = adata[~drop.to_numpy()].copy()
    path = prepare_store(adata, tmp_path_factory.mktemp("sets") / "s", pert_key="perturbation",
                         context_key="cell_type", batch_key="batch", control_label="control",
                         progress=False)
    return PerturbStore.open(path)


@pytest.fixture(scope="module")
def split(store) -> Split:
    perts = [p for p in store.vocab["perturbation"] if p != "control"]
    return Split.from_config({"holdout_contexts": ["ctx0"], "test_perturbations": perts[:2],
                              "val_perturbations": perts[2:3]}, store)


def _row_lookup(store) -> dict[bytes, int]:
    """Row of each distinct expression vector: identifies which cell the loader returned."""
    dense = store.dense(np.arange(store.n_cells), 10.0)
    lookup = {dense[i].tobytes(): i for i in range(store.n_cells)}
    assert len(lookup) == store.n_cells, "cells must be distinct for the lookup to be sound"
    return lookup


def test_loader_batches_match_store_and_controls_are_matched(store, split):
    lookup = _row_lookup(store)
    ctx_of, batch_of = store.codes["context"], store.codes["batch"]
    ctx1 = store.vocab["context"].index("ctx1")
    ctx2 = store.vocab["context"].index("ctx2")
    b1 = store.vocab["batch"].index("batch1")
    seen_fallback = set()
    for item in make_loader(store, "train", set_size=S, sets_per_batch=4, layout=split):
        assert item["x"].shape == (4, S, store.n_genes) and item["x"].dtype == torch.float32
        assert item["ctrl"].shape == item["x"].shape and item["mask"].dtype == torch.bool
        for k in range(4):
            g = store.groups.iloc[int(item["group"][k])]
            assert item["pert"][k] == g["perturbation"] and item["context"][k] == g["context"]
            rows = [lookup[v.numpy().tobytes()] for v in item["x"][k]]
            assert all(g["start"] <= r < g["stop"] for r in rows)  # padding stays in the group
            ctrl_rows = np.array([lookup[v.numpy().tobytes()] for v in item["ctrl"][k]])
            assert store.is_control[ctrl_rows].all()
            c, b = int(g["context"]), int(g["batch"])
            if c == ctx1:  # no controls in the context: same batch, other context
                assert (batch_of[ctrl_rows] == b).all() and (ctx_of[ctrl_rows] != c).all()
                seen_fallback.add("batch")
            elif c == ctx2 and b == b1:  # same batch has none in ctx2... other contexts have it
                assert (batch_of[ctrl_rows] == b).all()
                seen_fallback.add("batch2")
            else:
                assert (ctx_of[ctrl_rows] == c).all() and (batch_of[ctrl_rows] == b).all()
    assert seen_fallback == {"batch", "batch2"}


def test_fallback_same_context_then_any(store):
    matcher = ControlMatcher(store)
    # Restrict the pool table to simulate a batch with no controls anywhere.
    matcher._batch = np.where(matcher._batch == 1, 0, matcher._batch)
    ctx2 = store.vocab["context"].index("ctx2")
    rows = matcher.draw(ctx2, 1, 200, np.random.default_rng(0))
    assert matcher.fallback[(ctx2, 1)] == "same context, other batch"
    assert (store.codes["context"][rows] == ctx2).all() and store.is_control[rows].all()
    matcher._ctx = np.zeros_like(matcher._ctx)
    matcher._pools.clear()
    with pytest.warns(UserWarning, match="'ctx2' has no control cells.*any control"):
        rows = matcher.draw(ctx2, 1, 50, np.random.default_rng(0))
    assert matcher.fallback[(ctx2, 1)] == "any control" and store.is_control[rows].all()


def test_warns_once_for_context_without_controls(store, split):
    import perturbdiff.data.sets as sets_mod
    sets_mod._warned_contexts.clear()
    with pytest.warns(UserWarning, match="context 'ctx1' has no control cells"):
        list(make_loader(store, "train", set_size=S, sets_per_batch=2, layout=split))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(make_loader(store, "train", set_size=S, sets_per_batch=2, layout=split, epoch=1))


def test_plan_covers_every_cell_once_and_pads_within_group(store, split):
    ids = split.group_ids("train")
    plan = plan_sets(store, ids, S, seed=3, epoch=2)
    real = plan.rows[plan.mask]
    expected = np.concatenate([store.group_rows(g) for g in ids])
    assert np.array_equal(np.sort(real), np.sort(expected))
    n = store.groups["n_cells"].to_numpy()[ids]
    assert len(plan) == int((-(-n // S)).sum())
    for rows, mask, g in zip(plan.rows, plan.mask, plan.group):
        start, stop = store.groups.loc[g, ["start", "stop"]]
        assert ((rows >= start) & (rows < stop)).all()
        # Real cells first, padding only in a group's last (short) set.
        assert mask[: mask.sum()].all() and not mask[mask.sum():].any()
    per_group = {g: plan.mask[plan.group == g].sum() for g in ids}
    assert per_group == dict(zip(ids, n))


def test_determinism_epochs_and_workers(store, split):
    def batches(**kw):
        return [b for b in make_loader(store, "train", set_size=S, sets_per_batch=3, layout=split, **kw)]
    a, b = batches(seed=5, epoch=1), batches(seed=5, epoch=1, num_workers=2)
    c = batches(seed=5, epoch=2)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["x"], y["x"]) for x, y in zip(a, c))


def test_rank_shards_are_disjoint_and_resume_skips_exactly(store, split):
    ids = split.group_ids("train")
    shards = [SetBatches(store, ids, S, 2, seed=0, epoch=0, rank=r, world_size=3, scale=10.0,
                         drop_last=True) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    taken = [s.sets.ravel() for s in shards]
    union = np.concatenate(taken)
    assert np.unique(union).size == union.size  # no set on two ranks
    n_sets = len(shards[0].plan)
    assert union.size == n_sets // 6 * 6
    wrapped = SetBatches(store, ids, S, 2, seed=0, epoch=0, rank=0, world_size=3, scale=10.0,
                         drop_last=False)
    assert len(wrapped) == -(-n_sets // 6)
    full = list(make_loader(store, "train", set_size=S, sets_per_batch=2, layout=split, rank=1, world_size=3))
    resumed = list(make_loader(store, "train", set_size=S, sets_per_batch=2, layout=split, rank=1,
                               world_size=3, start_batch=4))
    assert len(resumed) == len(full) - 4
    for x, y in zip(full[4:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(EmptyGroupError, match="drop_last=False"):
        make_loader(store, "val", set_size=S, sets_per_batch=64, layout=split)
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(store, "train", set_size=S, sets_per_batch=2, layout=split, start_batch=10**6)


def test_split_holds_out_exactly_the_config(store, split):
    g = store.groups
    test = set(g.index[(g["context_label"] == "ctx0") & g["perturbation_label"].isin(split.test_perturbations)])
    val = set(g.index[(g["context_label"] == "ctx0") & g["perturbation_label"].isin(split.val_perturbations)])
    assert set(split.group_ids("test")) == test and set(split.group_ids("val")) == val
    assert set(split.group_ids("train")) == set(g.index) - test - val
    held_rows = set(np.concatenate([store.group_rows(i) for i in test | val]))
    for epoch in range(2):
        for item in make_loader(store, "train", set_size=S, sets_per_batch=1, layout=split, epoch=epoch):
            assert int(item["group"][0]) not in test | val
    plan = plan_sets(store, split.group_ids("train"), S, 0, 0)
    assert not held_rows & set(plan.rows.ravel())
    assert not store.is_control[plan.rows.ravel()].any()  # controls are never targets


def test_zero_shot_save_load_and_errors(store, tmp_path):
    zero_shot = Split.from_config({"zero_shot_contexts": ["ctx2"], "holdout_contexts": ["ctx0"],
                            "test_perturbations": [store.vocab["perturbation"][0]]}, store)
    ctx2 = set(store.groups.index[store.groups["context_label"] == "ctx2"])
    assert ctx2 <= set(zero_shot.group_ids("test"))
    path = zero_shot.save(tmp_path / "split.toml")
    again = load_split(path, store)
    for part in ("train", "val", "test"):
        assert np.array_equal(again.group_ids(part), zero_shot.group_ids(part))
    assert "test" in split_report(zero_shot, store) and "zero-shot: ['ctx2']" in split_report(zero_shot, store)
    (tmp_path / "bad.toml").write_text('holdout_contexts = ["ctx0", "mars"]\ntest_perturbations = ["XYZ1"]\n')
    with pytest.raises(MissingLabelError, match="mars"):
        load_split(tmp_path / "bad.toml", store)
    with pytest.raises(MissingLabelError, match="XYZ1"):
        Split.from_config({"test_perturbations": ["XYZ1"]}, store)
    p0 = store.vocab["perturbation"][0]
    with pytest.raises(ValueError, match="both"):
        Split.from_config({"holdout_contexts": ["ctx0"], "test_perturbations": [p0],
                           "val_perturbations": [p0]}, store)
    with pytest.raises(EmptyGroupError, match=p0):
        Split.from_config({"test_perturbations": [p0]}, store)  # no held-out context
    with pytest.warns(UserWarning, match="empty"):
        Split.from_config({"test_perturbations": [p0], "allow_empty": True}, store)
    with pytest.raises(ValueError, match="control"):
        Split.from_config({"holdout_contexts": ["ctx0"], "test_perturbations": ["control"]}, store)
    with pytest.raises(ValueError, match="layout"):
        make_loader(store, "train")


def test_eval_groups_every_cell_once(store, split):
    lookup = _row_lookup(store)
    for item in iter_eval_groups(store, "test", layout=split, seed=2):
        g = store.groups.iloc[item["group"]]
        assert np.array_equal(item["rows"], np.arange(g["start"], g["stop"]))
        np.testing.assert_array_equal(item["x"].numpy(), store.dense(item["rows"], 10.0))
        ctrl_rows = np.array([lookup[v.numpy().tobytes()] for v in item["ctrl"]])
        assert (store.codes["context"][ctrl_rows] == g["context"]).all()
        assert store.is_control[ctrl_rows].all()
    for item in iter_eval_groups(store, "test", set_size=S, layout=split):
        n = store.groups.iloc[item["group"]]["n_cells"]
        assert item["x"].shape[1:] == (S, store.n_genes) and int(item["mask"].sum()) == n
        assert np.array_equal(item["rows"][item["mask"].numpy()], store.group_rows(item["group"]))


def test_shared_dataset_proposed_split_and_loader(shared_data, tmp_path):
    store = PerturbStore.open(prepare_store(shared_data, tmp_path / "s", pert_key="condition",
                                            context_key="cell_type", control_label="control",
                                            progress=False))
    proposal = propose_split(store, n_holdout_contexts=1, seed=0)
    held = proposal.holdout_contexts[0]
    g = store.groups
    for part in ("val", "test"):
        assert (g.loc[proposal.group_ids(part), "context_label"] == held).all()
    # Each held-out perturbation is seen in training in another context (unseen combination).
    train_pairs = set(zip(g.loc[proposal.group_ids("train"), "perturbation_label"],
                          g.loc[proposal.group_ids("train"), "context_label"]))
    for p in proposal.test_perturbations + proposal.val_perturbations:
        assert any(pp == p and c != held for pp, c in train_pairs)
    item = next(iter(make_loader(store, "train", set_size=32, sets_per_batch=2, layout=proposal)))
    ctrl = item["ctrl"].numpy().reshape(-1, store.n_genes)
    controls = store.dense(np.flatnonzero(store.is_control), 10.0)
    ctx_of_ctrl = store.codes["context"][store.is_control]
    match = (ctrl[:, None, :] == controls[None]).all(-1)
    assert match.any(1).all()
    ctx_drawn = ctx_of_ctrl[match.argmax(1)].reshape(2, 32)
    assert (ctx_drawn == item["context"].numpy()[:, None]).all()
