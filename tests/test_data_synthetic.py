"""Synthetic screens: realism (counts, sparsity), seeding, streaming writer, ground truth."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from perturbdiff.data.synthetic import CONTROL, OBS_KEYS, gene_effects, make_screen, write_screen


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return make_screen(n_cells=6000, n_genes=500, n_perturbations=6, n_contexts=3, n_batches=1,
                       seed=0, library_size=100.0)


def _log1p(adata: ad.AnnData) -> np.ndarray:
    x = adata.X.toarray().astype(np.float64)
    total = x.sum(1, keepdims=True)
    return np.log1p(np.divide(x, total, out=np.zeros_like(x), where=total > 0) * 1e4)


def _delta(x: np.ndarray, obs, pert: str, ctx: str) -> np.ndarray:
    in_ctx = (obs[OBS_KEYS["context"]] == ctx).to_numpy()
    ctrl = x[in_ctx & (obs[OBS_KEYS["perturbation"]] == CONTROL).to_numpy()].mean(0)
    return x[in_ctx & (obs[OBS_KEYS["perturbation"]] == pert).to_numpy()].mean(0) - ctrl


def test_pbmc_like_counts_and_layout():
    a = make_screen(n_cells=1500, n_genes=2000, n_perturbations=10, n_contexts=3, n_batches=2, seed=4)
    x = a.X
    assert np.array_equal(x.data, np.round(x.data)) and x.data.min() > 0
    assert 1 - x.nnz / (x.shape[0] * x.shape[1]) > 0.90
    library = np.asarray(x.sum(1)).ravel()
    assert 200 < np.median(library) < 1000 and library.std() > 0.2 * library.mean()
    obs = a.obs
    assert set(OBS_KEYS.values()) <= set(obs.columns) and CONTROL in set(obs["perturbation"])
    groups = obs.groupby(list(OBS_KEYS.values()), observed=True).size()
    assert len(groups) == (10 + 1) * 3 * 2  # every (perturbation incl. control, context, batch)
    # File order is shuffled, not grouped (the store must do the sorting).
    assert (obs["perturbation"].to_numpy()[1:] != obs["perturbation"].to_numpy()[:-1]).mean() > 0.5


def test_seeded():
    a, b = make_screen(n_cells=400, n_genes=100, seed=7), make_screen(n_cells=400, n_genes=100, seed=7)
    c = make_screen(n_cells=400, n_genes=100, seed=8)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_write_screen_streams_the_same_screen_with_workers(tmp_path):
    kw = dict(n_cells=900, n_genes=150, n_perturbations=4, n_contexts=2, n_batches=2, seed=3, chunk_size=128)
    path = write_screen(tmp_path / "s.h5ad", progress=False, workers=2, **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5ad"]
    disk, mem = ad.read_h5ad(path), make_screen(**kw)
    assert (disk.X != mem.X).nnz == 0 and disk.X.shape == (900, 150)
    assert disk.obs.astype(str).equals(mem.obs.astype(str))
    np.testing.assert_array_equal(disk.uns["synthetic"]["effect"], mem.uns["synthetic"]["effect"])
    backed = ad.read_h5ad(path, backed="r")
    assert (backed.X[100:200] != mem.X[100:200]).nnz == 0


def test_effects_are_real_and_partly_transfer_across_contexts(screen):
    x, obs, truth = _log1p(screen), screen.obs, screen.uns["synthetic"]
    effects = gene_effects(truth)
    perts, ctxs = list(truth["perturbations"]), list(truth["contexts"])
    truth_corr, transfer_corr, self_corr = [], [], []
    for i, p in enumerate(perts):
        deltas = [_delta(x, obs, p, c) for c in ctxs]
        held, others = deltas[0], np.mean(deltas[1:], axis=0)
        truth_corr.append(np.corrcoef(held, effects[i, 0])[0, 1])
        transfer_corr.append(np.corrcoef(held, others)[0, 1])
        self_corr.append(np.corrcoef(effects[i, 0], effects[i, 1:].mean(0))[0, 1])
        target = int(truth["target_gene"][i])
        # On-target knock-down: lower in every context, clearly so on average.
        assert all(d[target] < 0 for d in deltas) and np.mean([d[target] for d in deltas]) < -0.2
    # A held-out combination is predictable from other contexts (better than the control mean,
    # whose delta is 0) but not identical to them.
    assert np.median(transfer_corr) > 0.4 and np.median(truth_corr) > 0.3
    assert max(self_corr) < 0.995


def test_hidden_well_factors_make_sets_differ(screen):
    truth, obs = screen.uns["synthetic"], screen.obs
    assert truth["well_penetrance"].std() > 0.05 and truth["well_programs"].std() > 0.05
    big = obs[obs[OBS_KEYS["perturbation"]] != CONTROL].groupby("well").size()
    assert (big > 0).sum() > obs.groupby(list(OBS_KEYS.values()), observed=True).ngroups * 0.5
    # Responder fraction differs between wells of a perturbation beyond binomial noise.
    frac = obs[obs[OBS_KEYS["perturbation"]] != CONTROL].groupby("well")["responder"].agg(["mean", "size"])
    frac = frac[frac["size"] >= 100]
    expected_sd = np.sqrt(0.75 * 0.25 / frac["size"]).mean()
    assert frac["mean"].std() > 1.5 * expected_sd


@pytest.mark.parametrize("kw, pattern", [
    (dict(n_genes=5, n_perturbations=6), "n_perturbations"),
    (dict(n_cells=10, n_perturbations=5), "raise n_cells"),
    (dict(n_contexts=0), "n_contexts"),
])
def test_bad_parameters(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_screen(**kw)
