"""Loading and validating the (pred, real) AnnData pair, and grouping cells.

Checks follow cell-eval's input contract (metrics.md 1.1) but fail loudly instead of
silently converting: integer counts are reported, not normalised behind the user's back.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._extension import has_kernel

if TYPE_CHECKING:  # anndata is imported only when a file needs it (its import is ~0.3 s)
    import anndata as ad

# cell-eval's log1p guard: values must be >= 0 and below this bound.
LOG1P_MAX = 15.0
# A value counts as fractional when its fractional part exceeds this (cell-eval's epsilon).
FRACTION_EPS = 1e-3


class InputError(ValueError):
    """Bad evaluation input; the message names the file, key, gene or label at fault."""


def load_anndata(data: ad.AnnData | str | os.PathLike, which: str,
                 obs_keys: tuple[str, ...] | None = None) -> ad.AnnData | StoredCells:
    """``data`` itself, or the .h5ad file it names. With ``obs_keys``, only .X, the gene names and
    those .obs columns are read, straight from the HDF5 file (layers, .obsm and the like
    can be larger than .X, and importing anndata takes longer than reading a small file); a file
    missing one of them, or stored in a layout this lean read does not know, is read whole with
    anndata, so that the usual checks report on it."""
    if _is_anndata(data):
        return data
    path = Path(data)
    if not path.is_file():
        raise InputError(f"{which} file not found: {path}")
    if obs_keys is not None:
        try:
            return _read_parts(path, obs_keys)
        except (KeyError, OSError, TypeError, ValueError):
            pass
    import anndata as ad

    return ad.read_h5ad(path)


def _is_anndata(data) -> bool:
    module = sys.modules.get("anndata")  # not imported: data cannot be an AnnData
    return module is not None and isinstance(data, module.AnnData)


@dataclass(frozen=True)
class StoredCells:
    """What the evaluator reads of an AnnData: .X, some .obs columns (indexed by row) and the gene
    names."""

    X: np.ndarray | sp.csr_matrix | sp.csc_matrix
    obs: pd.DataFrame
    var_names: pd.Index

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]


def _read_parts(path: Path, obs_keys: tuple[str, ...]) -> StoredCells:
    """The parts of an .h5ad file (anndata's on-disk format 0.1+) the evaluator needs; TypeError
    for an element encoded in a way this reader does not know."""
    with h5py.File(path, "r") as f:
        obs, var = f["obs"], f["var"]
        x = _read_matrix(f["X"])
        # the cell names are not read: the evaluator addresses cells by row (~3 ms per file)
        columns = {key: _read_column(obs[key]) for key in obs_keys}  # KeyError: not stored
        genes = _read_column(var[var.attrs["_index"]])
    return StoredCells(x, pd.DataFrame(columns), pd.Index(genes))


def _encoding(elem) -> str:
    return elem.attrs.get("encoding-type", "")


def _read_matrix(elem):
    if isinstance(elem, h5py.Dataset) and _encoding(elem) == "array":
        return elem[()]
    kind = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix}.get(_encoding(elem))
    if kind is None:
        raise TypeError(f"X is stored as {_encoding(elem) or type(elem).__name__!r}")
    return kind((elem["data"][()], elem["indices"][()], elem["indptr"][()]),
                shape=tuple(elem.attrs["shape"]))


def _read_column(elem):
    encoding = _encoding(elem)
    if encoding == "string-array":
        return elem.asstr()[()].astype(object)
    if encoding == "array" and elem.dtype.kind in "biuf":
        return elem[()]
    if encoding == "categorical":
        categories = _read_column(elem["categories"])
        return pd.Categorical.from_codes(elem["codes"][()], categories,
                                         ordered=bool(elem.attrs.get("ordered", False)))
    raise TypeError(f"obs/var element {elem.name} is stored as {encoding!r}")


def _stored_values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x)


def _has_fraction(values: np.ndarray, block: int = 1 << 16) -> bool:
    """Whether a value's fractional part exceeds FRACTION_EPS, scanning block by block: log1p
    data answer in the first block, without temporaries the size of the matrix."""
    flat = values.reshape(-1)
    return any((np.modf(flat[i:i + block])[0] > FRACTION_EPS).any()
               for i in range(0, flat.size, block))


def check_expression(adata: ad.AnnData, which: str) -> None:
    """Reject NaN/inf, integer counts and values outside the log1p range."""
    if adata.X is None:
        raise InputError(f"{which}: .X is empty")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{which}: .X has shape {adata.shape}; need cells and genes")
    values = _stored_values(adata.X)
    # min and max propagate NaN and reach +-inf: both finite means every value is.
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int((~np.isfinite(values)).sum())
        raise InputError(f"{which}: .X contains {bad} NaN/inf value(s)")
    if values.size and not _has_fraction(values):
        raise InputError(
            f"{which}: .X looks like integer counts (no value has a fractional part); "
            "evaluation expects log1p of library-size-normalised expression. Normalise first "
            "(e.g. scanpy.pp.normalize_total then scanpy.pp.log1p)."
        )
    if sp.issparse(adata.X):
        lo = min(lo, 0.0)
    if lo < 0:
        raise InputError(f"{which}: .X has negative values (min {lo:.3g}); expected log1p data")
    if hi >= LOG1P_MAX:
        raise InputError(
            f"{which}: .X max {hi:.3g} >= {LOG1P_MAX}, outside the log1p range; "
            "are these raw counts or values on another scale?"
        )


def check_genes(real: ad.AnnData, pred: ad.AnnData) -> np.ndarray:
    genes_real = np.asarray(real.var_names, dtype=str)
    genes_pred = np.asarray(pred.var_names, dtype=str)
    if genes_real.shape == genes_pred.shape and (genes_real == genes_pred).all():
        return genes_real
    only_real = sorted(set(genes_real) - set(genes_pred))
    only_pred = sorted(set(genes_pred) - set(genes_real))
    if only_real or only_pred:
        raise InputError(
            f"pred and real have different gene sets ({len(genes_pred)} vs {len(genes_real)} "
            f"genes): {len(only_real)} only in real (e.g. {only_real[:5]}), "
            f"{len(only_pred)} only in pred (e.g. {only_pred[:5]})"
        )
    if len(set(genes_real)) != len(genes_real):
        raise InputError("real has duplicated gene names; make var_names unique")
    first = int(np.flatnonzero(genes_real != genes_pred)[0])
    raise InputError(
        "pred and real have the same genes in a different order (first difference at "
        f"position {first}: real {genes_real[first]!r}, pred {genes_pred[first]!r}); "
        "reorder pred with pred[:, real.var_names]"
    )


def _labels(adata: ad.AnnData, key: str, which: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise InputError(
            f"{which}: obs key {key!r} not found; available: {list(adata.obs.columns)}"
        )
    col = adata.obs[key]
    if col.isna().any():
        raise InputError(f"{which}: obs[{key!r}] has {int(col.isna().sum())} missing label(s)")
    return col.to_numpy(dtype=str)


@dataclass(frozen=True)
class ContextGroups:
    """Cells of one context: control rows and per-perturbation rows in each file."""

    context: str | None
    perts: list[str]  # sorted, control excluded (cell-eval's order)
    real_rows: list[np.ndarray]
    pred_rows: list[np.ndarray]
    real_ctrl: np.ndarray
    pred_ctrl: np.ndarray


def _rows_by_label(labels: np.ndarray) -> dict[str, np.ndarray]:
    uniq, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    return dict(zip(uniq.tolist(), np.split(order, bounds)))


def group_cells(real: ad.AnnData, pred: ad.AnnData, pert_key: str, control_label: str,
                context_key: str | None = None) -> list[ContextGroups]:
    """Group both files by (context, perturbation); every group must exist in both."""
    pr, pp = _labels(real, pert_key, "real"), _labels(pred, pert_key, "pred")
    if context_key is None:
        cr, cp = np.full(len(pr), ""), np.full(len(pp), "")
    else:
        cr, cp = _labels(real, context_key, "real"), _labels(pred, context_key, "pred")
    by_ctx_real = _rows_by_label(cr)
    by_ctx_pred = _rows_by_label(cp)
    ctx_only = sorted(set(by_ctx_real) ^ set(by_ctx_pred))
    if ctx_only:
        raise InputError(
            f"context(s) present in only one file ({context_key!r}): {ctx_only[:10]}"
        )
    out = []
    for ctx in sorted(by_ctx_real):
        where = "" if context_key is None else f" in context {ctx!r}"
        rows_r, rows_p = by_ctx_real[ctx], by_ctx_pred[ctx]
        real_groups = {k: rows_r[v] for k, v in _rows_by_label(pr[rows_r]).items()}
        pred_groups = {k: rows_p[v] for k, v in _rows_by_label(pp[rows_p]).items()}
        for which, groups in (("real", real_groups), ("pred", pred_groups)):
            if control_label not in groups:
                raise InputError(
                    f"{which}: no control cells ({pert_key} == {control_label!r}){where}; "
                    "predictions must include the real control cells"
                )
        only_real = sorted(set(real_groups) - set(pred_groups))
        only_pred = sorted(set(pred_groups) - set(real_groups))
        if only_real or only_pred:
            raise InputError(
                f"perturbation labels ({pert_key!r}) differ between files{where}: "
                f"only in real {only_real[:10]}, only in pred {only_pred[:10]}"
            )
        perts = sorted(k for k in real_groups if k != control_label)
        if not perts:
            raise InputError(f"no perturbed cells{where}: only control {control_label!r}")
        out.append(ContextGroups(
            context=None if context_key is None else ctx,
            perts=perts,
            real_rows=[real_groups[p] for p in perts],
            pred_rows=[pred_groups[p] for p in perts],
            real_ctrl=real_groups[control_label],
            pred_ctrl=pred_groups[control_label],
        ))
    return out


def dense_tensor(block, device: torch.device, dtype: torch.dtype,
                 buffer: np.ndarray | None = None) -> torch.Tensor:
    """A dense or sparse matrix as a dense tensor on ``device``.

    A sparse block is written into the front of ``buffer`` (flat, of the block's dtype) when it
    fits: reused memory spares the page faults of a fresh array, much of the cost of densifying.
    The tensor may then share the buffer's memory.
    """
    if sp.issparse(block):
        size = block.shape[0] * block.shape[1]
        fits = buffer is not None and buffer.dtype == block.dtype and buffer.size >= size
        block = block.toarray(out=buffer[:size].reshape(block.shape) if fits else None)
    return torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=dtype)


def group_means(x, rows: list[np.ndarray]) -> np.ndarray:
    """Per-group mean expression [n_groups, n_genes] in float64, without densifying ``x``."""
    sizes = np.array([len(r) for r in rows])
    # Sum then divide (as polars/numpy means do) rather than summing pre-scaled values.
    if sp.issparse(x) and has_kernel("group_sums"):  # groups in parallel, in one pass
        x = sp.csr_matrix(x)
        index = np.promote_types(x.indptr.dtype, x.indices.dtype)
        data = x.data if x.data.dtype in (np.float32, np.float64) else x.data.astype(np.float64)
        sums = torch.ops.perturbdiff.group_sums(
            *(torch.from_numpy(np.asarray(a, dtype=index)) for a in (x.indptr, x.indices)),
            torch.from_numpy(data),
            torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])),
            torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)), x.shape[1])
        return sums.numpy() / sizes[:, None]
    indicator = sp.csr_matrix(
        (np.ones(sizes.sum()), (np.repeat(np.arange(len(rows)), sizes), np.concatenate(rows))),
        shape=(len(rows), x.shape[0]))
    sums = indicator @ (x.astype(np.float64) if x.dtype != np.float64 else x)
    sums = np.asarray(sums.toarray() if sp.issparse(sums) else sums)
    return sums / sizes[:, None]
