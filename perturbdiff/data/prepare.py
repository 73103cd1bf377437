"""``prepare_store``: AnnData (in memory or an h5ad of any size) -> a prepared store folder.

Two streaming passes over the input keep memory bounded by one chunk of rows (plus O(cells)
integer arrays):

1. scan: validate values (NaN/Inf/negative), detect counts vs log1p, accumulate per-gene moments
   for HVG selection (for both readings of the data, since the scale is known only at the end);
2. stage: normalise each chunk, keep the gene panel, append its CSR to staging files in file order.

A final gather writes the staged rows in group order (perturbation, context, batch), so each group
is a contiguous row range of the memory-mapped CSR arrays that training reads.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
from tqdm.auto import tqdm

from . import layout
from ..atomic import atomic_dir
from .contract import (TARGET_SUM, GeneListError, ValueScan, check_gene_names, check_obs,
                       encode_labels, select_genes, to_log1p)
from .csr import segment_index
from .hvg import GeneMoments, select_hvg
from .source import RowSource

DEFAULT_CHUNK = 10_000


def prepare_store(adata_or_path: ad.AnnData | str | os.PathLike, out: str | os.PathLike,
                  pert_key: str, context_key: str, batch_key: str | None = None,
                  control_label: str = "control", genes: Sequence[str] | None = None,
                  n_top_genes: int | None = None, layer: str | None = None,
                  chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Validate, normalise and write a store; returns its path. See the module docstring."""
    if genes is not None and n_top_genes is not None:
        raise ValueError("give either genes or n_top_genes, not both")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keys = {"perturbation": pert_key, "context": context_key, "batch": batch_key}
    with RowSource(adata_or_path, layer=layer) as src:
        check_gene_names(src.var_names)
        obs = src.obs_frame([k for k in dict.fromkeys(keys.values()) if k is not None])
        check_obs(obs, keys, control_label)
        columns = None if genes is None else select_genes(src.var_names, genes)
        encoded = {role: encode_labels(obs[key]) if key is not None
                   else ([layout.NO_BATCH], np.zeros(src.n_rows, dtype=np.int32))
                   for role, key in keys.items()}
        vocab = {role: encoded[role][0] for role in layout.ROLES}
        codes = {role: encoded[role][1] for role in layout.ROLES}

        scan, moments = _scan(src, chunk_size, n_top_genes is not None, progress)
        scale = scan.scale()
        if n_top_genes is not None:
            mean, var = moments[scale].mean_var()
            columns = select_hvg(mean, var, n_top_genes)
        order = np.lexsort((codes["batch"], codes["context"], codes["perturbation"]))

        with atomic_dir(out, overwrite=overwrite) as tmp:
            row_nnz, value_max = _stage(src, tmp, scale, columns, chunk_size, progress)
            _write_sorted(tmp, row_nnz, order, progress)
            sorted_codes = {role: codes[role][order] for role in layout.ROLES}
            np.savez(tmp / layout.OBS, **sorted_codes, orig_index=order.astype(np.int64),
                     obs_names=src.obs_names[order].astype(str))
            groups = _group_table(sorted_codes)
            np.savez(tmp / layout.GROUPS, **groups)
            meta = _metadata(src, keys, vocab, codes, groups, control_label, columns, row_nnz,
                             scale, scan.max_value, value_max, layer,
                             selection=("all genes" if genes is None and n_top_genes is None else
                                        "given list" if genes is not None else
                                        f"top {n_top_genes} HVG (seurat-style dispersion on log1p)"))
            (tmp / layout.META).write_text(json.dumps(meta, indent=1))
    return Path(out)


def _metadata(src: RowSource, keys, vocab, codes, groups, control_label: str,
              columns: np.ndarray | None, row_nnz: np.ndarray, scale: str, input_max: float,
              value_max: float, layer: str | None, selection: str) -> dict:
    """Everything a reader needs besides the arrays: panel, vocabularies, provenance, report."""
    control_code = vocab["perturbation"].index(control_label)
    is_control_group = groups["perturbation"] == control_code
    genes = src.var_names if columns is None else src.var_names[columns]
    return {
        "format_version": layout.FORMAT_VERSION,
        "genes": [str(g) for g in genes],
        "vocab": vocab,
        "keys": keys,
        "control_label": control_label,
        "n_cells": int(src.n_rows),
        "nnz": int(row_nnz.sum()),
        "n_groups": int((~is_control_group).sum()),
        "n_control_groups": int(is_control_group.sum()),
        "n_control_cells": int((codes["perturbation"] == control_code).sum()),
        "source": src.provenance() | {"layer": layer, "n_genes": int(src.n_cols)},
        "preprocessing": {
            "detected_scale": scale,
            "applied": (f"normalize_total(target_sum={TARGET_SUM:g}) + log1p"
                        if scale == "counts" else "none (input already log1p)"),
            "input_max": input_max,
            "max_value": value_max,  # largest stored (log1p, panel) value: the sampler's clip
            "gene_selection": selection,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _scan(src, chunk_size: int, want_moments: bool, progress: bool):
    scan = ValueScan()
    moments = {"log1p": GeneMoments(src.n_cols), "counts": GeneMoments(src.n_cols)} if want_moments else {}
    for start, chunk in tqdm(src.chunks(chunk_size), total=-(-src.n_rows // chunk_size),
                             desc="prepare 1/3 scan", unit="chunk", disable=not progress):
        scan.update(chunk, start, src.obs_names)
        if want_moments:
            moments["log1p"].update(chunk)
            if scan.all_integer:  # only needed while the data may still be raw counts
                moments["counts"].update(to_log1p(chunk, "counts"))
    return scan, moments


def _stage(src, folder: Path, scale: str, columns: np.ndarray | None, chunk_size: int,
           progress: bool) -> tuple[np.ndarray, float]:
    """Write normalised panel rows in file order to staging files; return nnz per row and the
    largest stored value."""
    row_nnz = np.zeros(src.n_rows, dtype=np.int64)
    value_max = 0.0
    with open(folder / "stage.indices", "wb") as fi, open(folder / "stage.data", "wb") as fd:
        for start, chunk in tqdm(src.chunks(chunk_size), total=-(-src.n_rows // chunk_size),
                                 desc="prepare 2/3 normalise", unit="chunk", disable=not progress):
            panel = to_log1p(chunk, scale)
            if columns is not None:
                panel = panel[:, columns]
            panel.eliminate_zeros()
            panel.sort_indices()
            row_nnz[start:start + panel.shape[0]] = np.diff(panel.indptr)
            fi.write(panel.indices.astype(np.int32).tobytes())
            fd.write(panel.data.astype(np.float32).tobytes())
            if panel.nnz:
                value_max = max(value_max, float(panel.data.max()))
    return row_nnz, value_max


def _write_sorted(folder: Path, row_nnz: np.ndarray, order: np.ndarray, progress: bool,
                  rows_per_step: int = 50_000) -> None:
    """Gather staged rows into group order as the final memory-mapped CSR arrays."""
    stage_ptr = np.concatenate([[0], np.cumsum(row_nnz)])
    indptr = np.concatenate([[0], np.cumsum(row_nnz[order])]).astype(np.int64)
    np.save(folder / layout.INDPTR, indptr)
    nnz = int(indptr[-1])
    stage_indices = _open_stage(folder / "stage.indices", np.int32, nnz)
    stage_data = _open_stage(folder / "stage.data", np.float32, nnz)
    indices = np.lib.format.open_memmap(folder / layout.INDICES, mode="w+", dtype=np.int32, shape=(nnz,))
    data = np.lib.format.open_memmap(folder / layout.DATA, mode="w+", dtype=np.float32, shape=(nnz,))
    for a in tqdm(range(0, order.size, rows_per_step), desc="prepare 3/3 sort by group",
                  unit="step", disable=not progress):
        rows = order[a:a + rows_per_step]
        index, _ = segment_index(stage_ptr, rows)
        lo, hi = indptr[a], indptr[min(a + rows_per_step, order.size)]
        indices[lo:hi] = stage_indices[index]
        data[lo:hi] = stage_data[index]
    indices.flush()
    data.flush()
    del indices, data, stage_indices, stage_data
    (folder / "stage.indices").unlink()
    (folder / "stage.data").unlink()


def _open_stage(path: Path, dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)


def _group_table(codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row ranges of the runs of equal (perturbation, context, batch) in sorted codes."""
    n = codes["perturbation"].size
    change = np.zeros(n, dtype=bool)
    change[:1] = True
    for role in layout.ROLES:
        change[1:] |= codes[role][1:] != codes[role][:-1]
    start = np.flatnonzero(change).astype(np.int64)
    stop = np.append(start[1:], n).astype(np.int64)
    return {role: codes[role][start] for role in layout.ROLES} | {"start": start, "stop": stop}


def read_gene_file(path: str | os.PathLike) -> list[str]:
    """One gene per line (blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    genes = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not genes:
        raise GeneListError(f"gene file {path} lists no genes")
    return genes
