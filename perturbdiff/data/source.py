"""Chunked row access to an AnnData, in memory or on disk, without loading the matrix.

An h5ad path is opened with h5py and the expression element read through anndata's lazy
sparse dataset (the same machinery as ``read_h5ad(backed="r")``), so memory stays bounded by one
chunk of rows whatever the file size. Obs columns are read one at a time.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .contract import MissingKeyError


class RowSource:
    """Uniform interface over an in-memory AnnData and an h5ad file read lazily."""

    def __init__(self, adata_or_path: ad.AnnData | str | os.PathLike, layer: str | None = None):
        self.layer = layer
        self.path: Path | None = None
        self._file: h5py.File | None = None
        if isinstance(adata_or_path, ad.AnnData):
            self._adata = adata_or_path
            matrix = adata_or_path.X if layer is None else self._layer(adata_or_path.layers, layer)
            if matrix is None:
                raise MissingKeyError("the AnnData has no expression matrix in .X")
            self._matrix = matrix.tocsr() if sp.issparse(matrix) else np.asarray(matrix)
            self.obs_names = adata_or_path.obs_names.astype(str).to_numpy()
            self.var_names = adata_or_path.var_names.astype(str).to_numpy()
            self._obs_columns = list(adata_or_path.obs.columns)
        else:
            self.path = Path(adata_or_path).resolve()
            if not self.path.is_file():
                raise FileNotFoundError(f"input AnnData file not found: {self.path}")
            self._file = h5py.File(self.path, "r")
            self._adata = None
            if layer is None:
                if "X" not in self._file:
                    raise MissingKeyError(f"{self.path} has no expression matrix X")
                element = self._file["X"]
            else:
                element = self._layer(self._file.get("layers", {}), layer)
            self._matrix = ad.io.sparse_dataset(element) if isinstance(element, h5py.Group) else element
            obs = self._file["obs"]
            self.obs_names = ad.io.read_elem(obs[obs.attrs["_index"]]).astype(str)
            self.var_names = np.asarray(
                ad.io.read_elem(self._file["var"][self._file["var"].attrs["_index"]])).astype(str)
            self._obs_columns = [k for k in obs.keys() if k != obs.attrs["_index"]]
        self.n_rows, self.n_cols = self._matrix.shape
        self.obs_names = np.asarray(self.obs_names)

    def _layer(self, layers, name: str):
        if name not in layers:
            raise MissingKeyError(f"layer {name!r} not found; available layers: {sorted(layers.keys())}")
        return layers[name]

    def obs_column(self, key: str) -> pd.Series:
        """One obs column as a categorical Series (codes + categories: no per-cell strings)."""
        if key not in self._obs_columns:
            raise MissingKeyError(
                f"obs key {key!r} is not in the AnnData; available obs keys: {sorted(self._obs_columns)}")
        if self._adata is not None:
            values = self._adata.obs[key]
        else:
            values = ad.io.read_elem(self._file["obs"][key])
        return pd.Series(pd.Categorical(values), name=key)

    def obs_frame(self, keys: list[str]) -> pd.DataFrame:
        return pd.DataFrame({k: self.obs_column(k) for k in keys}).set_axis(pd.Index(self.obs_names))

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float64 CSR with sorted indices."""
        block = self._matrix[start:stop]
        block = sp.csr_matrix(block, dtype=np.float64) if not sp.issparse(block) else block.tocsr()
        block = block.astype(np.float64, copy=False)
        block.sum_duplicates()
        return block

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.n_rows, chunk_size):
            yield start, self.read(start, min(start + chunk_size, self.n_rows))

    def provenance(self) -> dict:
        """Where the data came from: path, size and a content hash of a file, or 'in-memory'."""
        if self.path is None:
            return {"path": None, "kind": "in-memory AnnData"}
        return {"path": str(self.path), "size": self.path.stat().st_size,
                "sha256_head": _sha256_head(self.path)}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RowSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sha256_head(path: Path, limit: int = 64 << 20) -> str:
    """sha256 of the first 64 MiB plus the size: identifies a multi-TB file in a second."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(limit))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()
