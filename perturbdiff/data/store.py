"""``PerturbStore``: read access to a prepared store (see ``layout`` for the folder format).

Expression arrays are memory-mapped, so opening a store costs O(groups) and any number of
DataLoader workers share the page cache. Cells are sorted by group; a group is the contiguous row
range ``start:stop`` of ``groups`` / ``control_groups``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .csr import gather_dense
from .prepare import prepare_store  # noqa: F401  (part of this module's public API)


class StoreFormatError(ValueError):
    """The folder is not a prepared store, or was written by an incompatible version."""


class PerturbStore:
    """A prepared store. Create with :meth:`open`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_path = self.path / layout.META
        if not meta_path.is_file():
            raise StoreFormatError(f"{self.path} is not a prepared store ({layout.META} missing); "
                                   "create one with `perturbdiff prepare`")
        self.meta = json.loads(meta_path.read_text())
        version = self.meta.get("format_version")
        if version != layout.FORMAT_VERSION:
            raise StoreFormatError(f"{self.path} has store format {version}, this version reads "
                                   f"{layout.FORMAT_VERSION}; prepare it again")
        self.genes: list[str] = list(self.meta["genes"])
        self.vocab: dict[str, list[str]] = {r: list(self.meta["vocab"][r]) for r in layout.ROLES}
        self.keys: dict[str, str | None] = dict(self.meta["keys"])
        self.control_label: str = self.meta["control_label"]
        self.n_cells: int = int(self.meta["n_cells"])
        self.n_genes: int = len(self.genes)
        self.control_code: int = self.vocab["perturbation"].index(self.control_label)
        self.indptr = np.load(self.path / layout.INDPTR, mmap_mode="r")
        self.indices = np.load(self.path / layout.INDICES, mmap_mode="r")
        self.data = np.load(self.path / layout.DATA, mmap_mode="r")
        with np.load(self.path / layout.OBS) as obs:
            self.codes: dict[str, np.ndarray] = {r: obs[r] for r in layout.ROLES}
        self.is_control: np.ndarray = self.codes["perturbation"] == self.control_code
        self._obs_cache: dict[str, np.ndarray] = {}
        with np.load(self.path / layout.GROUPS) as g:
            table = pd.DataFrame({k: g[k] for k in (*layout.ROLES, "start", "stop")})
        table["n_cells"] = table["stop"] - table["start"]
        for role in layout.ROLES:
            table[f"{role}_label"] = np.asarray(self.vocab[role], dtype=object)[table[role].to_numpy()]
        is_ctrl = table["perturbation"].to_numpy() == self.control_code
        self.groups: pd.DataFrame = table[~is_ctrl].reset_index(drop=True)
        self.control_groups: pd.DataFrame = table[is_ctrl].reset_index(drop=True)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PerturbStore":
        return cls(Path(path))

    # Workers receive the store by pickling: send the path, reopen the memory maps there.
    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]))

    def __repr__(self) -> str:
        return (f"PerturbStore({str(self.path)!r}, cells={self.n_cells}, genes={self.n_genes}, "
                f"groups={len(self.groups)}, control_groups={len(self.control_groups)})")

    def dense(self, rows: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Rows as dense float32 ``[len(rows), n_genes]`` on the log1p scale divided by ``scale``
        (any order, repeats allowed; fastest for a contiguous or sorted set)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_cells):
            raise IndexError(f"row indices must be in [0, {self.n_cells}); got "
                             f"{rows.min()}..{rows.max()}")
        return gather_dense(self.indptr, self.indices, self.data, rows, self.n_genes, scale)

    def obs_frame(self, rows: np.ndarray) -> pd.DataFrame:
        """Original obs key columns (labels as strings) and obs names for ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        names = self._obs_array("obs_names")[rows]
        columns = {key: np.asarray(self.vocab[role], dtype=object)[self.codes[role][rows]]
                   for role, key in self.keys.items() if key is not None}
        # Distinct roles may share one obs key (e.g. context = batch): keep one column.
        return pd.DataFrame(columns, index=pd.Index(names.astype(str), name=None))

    def orig_index(self, rows: np.ndarray) -> np.ndarray:
        """Row numbers of ``rows`` in the source AnnData."""
        return self._obs_array("orig_index")[np.asarray(rows, dtype=np.int64)]

    def _obs_array(self, name: str) -> np.ndarray:
        # Loaded on first use only: training never needs obs names (O(cells) strings).
        if name not in self._obs_cache:
            with np.load(self.path / layout.OBS) as obs:
                self._obs_cache[name] = obs[name]
        return self._obs_cache[name]

    def group_rows(self, group: int) -> np.ndarray:
        """All store rows of non-control group ``group`` (a row of ``groups``)."""
        g = self.groups.iloc[int(group)]
        return np.arange(g["start"], g["stop"], dtype=np.int64)
