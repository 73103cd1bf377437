"""The AnnData contract a perturbation screen must satisfy before it becomes a store.

Every violation raises a subclass of :class:`ContractError` (itself a ``ValueError``) whose
message names the offending key, label, gene or row, so a user can fix the file directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

# Decimal data whose maximum stays below this is taken as log1p(normalised) expression:
# log1p of a 1e4-normalised count reaches ~9.2 only for a cell whose whole library is one gene.
LOG1P_MAX = 15.0
TARGET_SUM = 1e4


class ContractError(ValueError):
    """Base class: the input does not satisfy the data contract."""


class MissingKeyError(ContractError):
    """An obs key named by the user does not exist."""


class MissingLabelError(ContractError):
    """The control label (or another required label) is absent, or a label is missing in a row."""


class InvalidValueError(ContractError):
    """Expression contains NaN, Inf or negative values, or is neither counts nor log1p."""


class GeneListError(ContractError):
    """Duplicate gene names, or a requested gene list that does not match the file."""


class EmptyGroupError(ContractError):
    """A group (or split part) that must contain cells contains none."""


def check_obs(obs: pd.DataFrame, keys: dict[str, str | None], control_label: str) -> None:
    """Check that each obs key exists, has no missing labels, and the control label occurs."""
    for role, key in keys.items():
        if key is None:
            continue
        if key not in obs.columns:
            raise MissingKeyError(
                f"obs key {key!r} (the {role} key) is not in the AnnData; available obs keys: "
                f"{sorted(map(str, obs.columns))}")
        missing = np.flatnonzero(pd.isna(obs[key]).to_numpy())
        if missing.size:
            raise MissingLabelError(
                f"obs key {key!r} has {missing.size} missing labels; first at row {missing[0]} "
                f"(obs name {obs.index[missing[0]]!r})")
    pert = pd.Categorical(obs[keys["perturbation"]])
    labels = sorted({str(c) for c in pert.categories[np.unique(pert.codes)]})
    if control_label not in labels:
        raise MissingLabelError(
            f"control label {control_label!r} does not occur in obs key {keys['perturbation']!r}; "
            f"labels present (first 20): {labels[:20]}")


def encode_labels(values: pd.Series | pd.Categorical) -> tuple[list[str], np.ndarray]:
    """Vocabulary (labels present, as strings, sorted) and int32 code per row. Works on the
    categorical codes, so 100M rows cost one int array, not 100M Python strings."""
    cat = pd.Categorical(values)
    used = np.unique(cat.codes)
    names = np.array([str(c) for c in cat.categories], dtype=object)
    vocab = sorted(set(names[used]))
    # Distinct categories may print the same (1 and "1"): they share one vocabulary entry.
    to_vocab = np.searchsorted(np.array(vocab, dtype=object), names).astype(np.int32)
    return vocab, to_vocab[cat.codes]


def check_gene_names(var_names: Sequence[str]) -> None:
    names = pd.Index([str(g) for g in var_names])
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise GeneListError(
            f"{len(dup)} duplicate gene names in var_names, e.g. {list(dup[:10])}; make them unique "
            "(anndata's var_names_make_unique) before preparing")


def select_genes(var_names: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """Column indices of ``genes`` (in that order) in ``var_names``; errors name missing genes."""
    genes = [str(g) for g in genes]
    if not genes:
        raise GeneListError("the requested gene list is empty")
    seen = pd.Index(genes)
    if seen.has_duplicates:
        raise GeneListError(f"the requested gene list repeats genes: {list(seen[seen.duplicated()][:10])}")
    position = {str(g): i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in position]
    if missing:
        raise GeneListError(
            f"{len(missing)} of {len(genes)} requested genes are not in the AnnData: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
    return np.array([position[g] for g in genes], dtype=np.int64)


@dataclass
class ValueScan:
    """Streaming summary of the expression values, used to validate them and detect their scale."""

    all_integer: bool = True
    max_value: float = 0.0
    n_rows: int = 0
    nnz: int = 0

    def update(self, chunk: sp.csr_matrix, row_offset: int, obs_names: Sequence[str]) -> None:
        """Validate one chunk of rows (``row_offset`` = index of its first row in the file)."""
        data = chunk.data
        bad = ~np.isfinite(data)
        if bad.any() or (data < 0).any():
            kind = "NaN/Inf" if bad.any() else "negative"
            mask = bad if bad.any() else data < 0
            first = int(np.searchsorted(chunk.indptr, np.flatnonzero(mask)[0], side="right") - 1)
            row = row_offset + first
            raise InvalidValueError(
                f"expression has {kind} values ({int(mask.sum())} in rows {row_offset}-"
                f"{row_offset + chunk.shape[0] - 1}); first at row {row} (obs name "
                f"{obs_names[row]!r})")
        if data.size:
            self.max_value = max(self.max_value, float(data.max()))
            if self.all_integer:
                self.all_integer = bool(np.all(data == np.round(data)))
        self.n_rows += chunk.shape[0]
        self.nnz += chunk.nnz

    def scale(self) -> str:
        """``"counts"`` (to normalise) or ``"log1p"`` (use as is); errors on anything else."""
        if self.nnz == 0:
            raise InvalidValueError("the expression matrix has no non-zero value")
        if self.all_integer:
            return "counts"
        if self.max_value < LOG1P_MAX:
            return "log1p"
        raise InvalidValueError(
            f"expression values are decimals with maximum {self.max_value:.4g} >= {LOG1P_MAX}: "
            "neither raw counts (integers) nor log1p-normalised values; pass raw counts (e.g. "
            "--layer counts) or log1p(normalize_total) data")



def to_log1p(chunk: sp.csr_matrix, scale: str) -> sp.csr_matrix:
    """Bring a chunk of full rows (all genes: the library size needs them) to log1p scale."""
    out = chunk.astype(np.float64, copy=True)
    if scale == "counts":
        totals = np.asarray(out.sum(axis=1), dtype=np.float64).ravel()
        factor = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        out.data *= np.repeat(factor, np.diff(out.indptr))
        np.log1p(out.data, out=out.data)
    return out
