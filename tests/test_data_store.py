"""prepare_store / PerturbStore: round trips, normalisation, gene panels, contract errors, atomicity."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings, strategies as st

from perturbdiff.data import prepare as prepare_mod
from perturbdiff.data.contract import (GeneListError, InvalidValueError, MissingKeyError,
                                       MissingLabelError)
from perturbdiff.data.store import PerturbStore, StoreFormatError, prepare_store

KEYS = dict(pert_key="perturbation", context_key="cell_type", batch_key="batch",
            control_label="control")


@pytest.fixture(scope="module")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perturbench_devel.h5ad"
    if not path.is_file():
        pytest.skip(f"shared dataset not found at {path}")
    return path


def tiny_counts(n: int = 60, g: int = 12, seed: int = 0) -> ad.AnnData:
    """Raw counts with two contexts, two batches, controls and two perturbations, unsorted rows."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n, g)).astype(np.float32)
    x[np.arange(n), rng.integers(0, g, n)] += 1  # no empty cell
    obs = pd.DataFrame({
        "perturbation": rng.choice(["control", "P1", "P2"], n),
        "cell_type": rng.choice(["B", "A"], n),
        "batch": rng.choice(["b1", "b0"], n),
    }, index=[f"c{i}" for i in range(n)])
    obs.loc[obs.index[:4], "perturbation"] = "control"
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def test_shared_dataset_round_trip(shared_data, tmp_path):
    store = PerturbStore.open(prepare_store(shared_data, tmp_path / "s", pert_key="condition",
                                            context_key="cell_type", control_label="control",
                                            chunk_size=1000, progress=False))
    src = ad.read_h5ad(shared_data)
    rows = np.arange(store.n_cells)
    orig = store.orig_index(rows)
    assert sorted(orig) == list(range(src.n_obs))
    np.testing.assert_allclose(store.dense(rows), src.X[orig].toarray(), rtol=1e-6, atol=1e-6)
    frame = store.obs_frame(rows)
    assert list(frame.index) == list(src.obs_names[orig])
    assert (frame["condition"].to_numpy() == src.obs["condition"].astype(str).to_numpy()[orig]).all()
    assert store.genes == list(src.var_names)
    assert store.meta["preprocessing"]["detected_scale"] == "log1p"
    assert store.vocab["batch"] == ["<none>"] and store.keys["batch"] is None
    assert store.vocab["context"] == sorted(store.vocab["context"])
    # Groups tile the rows, and every row of a group carries that group's codes.
    table = pd.concat([store.groups, store.control_groups]).sort_values("start")
    assert table["start"].iloc[0] == 0 and table["stop"].iloc[-1] == store.n_cells
    assert (table["start"].to_numpy()[1:] == table["stop"].to_numpy()[:-1]).all()
    for role in ("perturbation", "context", "batch"):
        expected = np.repeat(table[role].to_numpy(), table["n_cells"].to_numpy())
        assert (store.codes[role] == expected).all()
    assert store.is_control.sum() == (src.obs["condition"] == "control").sum()
    assert (store.control_groups["perturbation_label"] == "control").all()
    assert (store.groups["perturbation_label"] != "control").all()


def test_counts_are_normalised_and_file_equals_memory(tmp_path):
    adata = tiny_counts()
    adata.write_h5ad(tmp_path / "in.h5ad")
    mem = PerturbStore.open(prepare_store(adata, tmp_path / "mem", **KEYS, progress=False))
    disk = PerturbStore.open(prepare_store(tmp_path / "in.h5ad", tmp_path / "disk", **KEYS,
                                           chunk_size=7, progress=False))
    x = adata.X.toarray().astype(np.float64)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    rows = np.arange(mem.n_cells)
    np.testing.assert_allclose(mem.dense(rows), expected[mem.orig_index(rows)], rtol=1e-6)
    np.testing.assert_array_equal(mem.dense(rows), disk.dense(rows))
    assert mem.meta["preprocessing"]["detected_scale"] == "counts"
    dense_x = adata.copy()
    dense_x.X = adata.X.toarray()  # a dense X element in the h5ad is read in row chunks too
    dense_x.write_h5ad(tmp_path / "dense.h5ad")
    from_dense = PerturbStore.open(prepare_store(tmp_path / "dense.h5ad", tmp_path / "dense", **KEYS,
                                                 chunk_size=11, progress=False))
    np.testing.assert_array_equal(mem.dense(rows), from_dense.dense(rows))
    assert disk.meta["source"]["path"] == str((tmp_path / "in.h5ad").resolve())
    assert disk.meta["source"]["size"] == (tmp_path / "in.h5ad").stat().st_size


def test_layer_and_gene_list_order(tmp_path):
    adata = tiny_counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # X useless: must read the layer
    genes = ["g5", "g0", "g11"]
    store = PerturbStore.open(prepare_store(adata, tmp_path / "s", **KEYS, genes=genes,
                                            layer="counts", progress=False))
    assert store.genes == genes
    x = adata.layers["counts"].toarray().astype(np.float64)
    full = np.log1p(x / x.sum(1, keepdims=True) * 1e4)  # library size over all genes
    rows = np.arange(store.n_cells)
    np.testing.assert_allclose(store.dense(rows), full[store.orig_index(rows)][:, [5, 0, 11]], rtol=1e-6)
    with pytest.raises(GeneListError, match="nope"):
        prepare_store(adata, tmp_path / "t", **KEYS, genes=["g1", "nope"], layer="counts")
    with pytest.raises(MissingKeyError, match="raw"):
        prepare_store(adata, tmp_path / "t", **KEYS, layer="raw")


def test_hvg_is_streaming_invariant_and_finds_planted_genes(tmp_path):
    rng = np.random.default_rng(3)
    adata = tiny_counts(n=200, g=40)
    x = adata.X.toarray()
    # Genes 7 and 23: on/off across cells, strongly over-dispersed relative to their mean.
    for g in (7, 23):
        x[:, g] = np.where(rng.random(200) < 0.5, 0, 40)
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "in.h5ad")
    a = PerturbStore.open(prepare_store(adata, tmp_path / "a", **KEYS, n_top_genes=5, progress=False))
    b = PerturbStore.open(prepare_store(tmp_path / "in.h5ad", tmp_path / "b", **KEYS, n_top_genes=5,
                                        chunk_size=9, progress=False))
    assert a.genes == b.genes and len(a.genes) == 5
    assert {"g7", "g23"} <= set(a.genes)
    assert a.genes == sorted(a.genes, key=lambda s: int(s[1:]))  # source order kept


@pytest.mark.parametrize("mutate, error, pattern", [
    (lambda a: a.obs.drop(columns="cell_type", inplace=True), MissingKeyError, "cell_type"),
    (lambda a: a.obs.__setitem__("perturbation", "P1"), MissingLabelError, "'control'"),
    (lambda a: a.obs.__setitem__("batch", pd.Series([None] + ["b0"] * 59, index=a.obs.index)),
     MissingLabelError, "row 0 .*'c0'"),
    (lambda a: _set(a, 13, 2, np.nan), InvalidValueError, "NaN/Inf.*row 13 .*'c13'"),
    (lambda a: _set(a, 21, 0, np.inf), InvalidValueError, "row 21"),
    (lambda a: _set(a, 30, 1, -1.0), InvalidValueError, "negative.*row 30"),
    (lambda a: setattr(a, "var_names", [f"g{min(j, 10)}" for j in range(12)]), GeneListError,
     "duplicate gene names.*g10"),
    (lambda a: setattr(a, "X", a.X * 20.5), InvalidValueError, "neither raw counts"),
])
def test_contract_errors_name_the_problem(tmp_path, mutate, error, pattern):
    adata = tiny_counts()
    mutate(adata)
    with pytest.raises(error, match=pattern):
        prepare_store(adata, tmp_path / "s", **KEYS, progress=False)
    assert not (tmp_path / "s").exists()


def _set(adata, row, col, value):
    x = adata.X.toarray()
    x[row, col] = value
    adata.X = sp.csr_matrix(x)


def test_failure_leaves_no_half_store(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(prepare_mod, "_write_sorted", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_store(tiny_counts(), tmp_path / "s", **KEYS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_store_needs_overwrite(tmp_path):
    first = prepare_store(tiny_counts(seed=1), tmp_path / "s", **KEYS, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_store(tiny_counts(seed=2), first, **KEYS, progress=False)
    prepare_store(tiny_counts(seed=2), first, **KEYS, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    meta = json.loads((first / "meta.json").read_text())
    assert meta["n_cells"] == 60 and meta["format_version"] == 1


def test_open_rejects_non_store(tmp_path):
    with pytest.raises(StoreFormatError, match="meta.json"):
        PerturbStore.open(tmp_path)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> PerturbStore:
    return PerturbStore.open(prepare_store(tiny_counts(), tmp_path_factory.mktemp("dense") / "s",
                                           **KEYS, progress=False))


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 59), min_size=0, max_size=40), scale=st.floats(1.0, 20.0))
def test_dense_any_rows_matches_csr(small_store, rows, scale):
    store = small_store
    rows = np.array(rows, dtype=np.int64)
    expected = sp.csr_matrix((store.data, store.indices, store.indptr),
                             shape=(store.n_cells, store.n_genes)).toarray()[rows]
    np.testing.assert_allclose(store.dense(rows, scale), expected / scale, rtol=1e-6)
    with pytest.raises(IndexError):
        store.dense(np.array([store.n_cells]))


def test_reads_in_bounded_chunks_and_encodes_numeric_labels(tmp_path, monkeypatch):
    from perturbdiff.data.source import RowSource
    adata = tiny_counts()
    adata.obs["batch"] = np.where(adata.obs["batch"] == "b0", 10, 2)  # numeric, like gem_group
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"], categories=["A", "B", "unused"])
    adata.write_h5ad(tmp_path / "in.h5ad")
    sizes = []
    original = RowSource.read

    def spy(self, start, stop):
        sizes.append(stop - start)
        return original(self, start, stop)
    monkeypatch.setattr(RowSource, "read", spy)
    store = PerturbStore.open(prepare_store(tmp_path / "in.h5ad", tmp_path / "s", **KEYS,
                                            chunk_size=8, progress=False))
    assert max(sizes) <= 8 and sum(sizes) == 2 * adata.n_obs  # two streaming passes
    assert store.vocab["batch"] == ["10", "2"] and store.vocab["context"] == ["A", "B"]
    frame = store.obs_frame(np.arange(store.n_cells))
    src_batch = adata.obs["batch"].astype(str).to_numpy()[store.orig_index(np.arange(store.n_cells))]
    assert (frame["batch"].to_numpy() == src_batch).all()


def test_cli_prepare_and_split(tmp_path, capsys):
    import argparse
    from perturbdiff.data import cli_prepare, cli_split

    def call(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return module.run(parser.parse_args(argv))
    tiny_counts(n=120).write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "genes.txt").write_text("# panel\ng3\ng1\n\ng2\n")
    assert call(cli_prepare, [str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "s"),
                              "--pert-key", "perturbation", "--context-key", "cell_type",
                              "--batch-key", "batch", "--control-label", "control",
                              "--genes", str(tmp_path / "genes.txt"), "--quiet"]) == 0
    assert "detected input scale: counts" in capsys.readouterr().out
    assert PerturbStore.open(tmp_path / "s").genes == ["g3", "g1", "g2"]
    assert call(cli_split, [str(tmp_path / "s"), "--propose", "--out", str(tmp_path / "split.toml")]) == 0
    proposed = capsys.readouterr().out
    assert "holdout_contexts" in proposed and (tmp_path / "split.toml").is_file()
    assert call(cli_split, [str(tmp_path / "s"), "--config", str(tmp_path / "split.toml")]) == 0
    report = capsys.readouterr().out
    assert report.splitlines()[0].split() == ["part", "groups", "cells", "contexts"]
    with pytest.raises(SystemExit):
        call(cli_split, [str(tmp_path / "s")])
