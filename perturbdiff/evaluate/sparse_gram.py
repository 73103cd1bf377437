"""Euclidean distances (and radial kernels) between sparse cells: the evaluator's e-distance and
set distances on CPU.

log1p expression is mostly zeros (a few percent stored at 2,000 to 18,000 genes), so a dense
GEMM spends most of its multiply-adds on zeros. The products X Y^T behind the distances are sums
over genes, and each gene goes where it is cheaper: through Gustavson's sparse product (cost
~ nnz_x(g) nnz_y(g) scattered multiply-adds) or, for genes stored in a large fraction of both
sides' cells, through a dense GEMM on those columns (cost ~ n_x n_y multiply-adds at full SIMD
rate). ``SplitCells`` holds cells split that way once, so that the many products of a context
(each perturbation with itself, all of them with the controls) reuse the split. The compiled
kernels (``split_within``: pairs within segments, ``split_distance_to``: every cell against a
reference set) reduce each block of products to distances in cache and never hand the products
back. Values equal the dense computation's to rounding (float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch

from .._extension import has_kernel

# One scattered multiply-add of the sparse kernel costs about this many multiply-adds of a dense
# GEMM (2-core Zen 4, float64, the evaluator's warm time at 500 to 18,080 genes: 5 to 10 within
# 3 % of each other, 25 5-8 % slower since the sparse products go by gene tile). Gene g goes
# dense when density_x(g) density_y(g) SPARSE_COST > 1.
SPARSE_COST = 10.0
# The compiled CPU ops this module calls, with the arguments an older build's may lack.
KERNELS = {"within_distance": ("split",), "distance_to": (), "split_columns": ()}
DENSITY_ROWS = 1024  # cells a density is estimated from: it steers the cost only, never a value
# The products of cells with each other (within_distance) gain from the GEMM on genes stored in most
# of the cells even where their products with the reference (distance_to) do not: a prediction
# stored nearly everywhere against sparse controls. A second split of the cells pays when the GEMM's
# saving, ~WITHIN_GEMM_SAVING_NS per pair of cells of a segment and unit of density^2 of the genes it
# moves there, exceeds the split's ~SPLIT_NS per stored value (2-core Zen 4, float64, 2,000 genes:
# 0.04 ns and 0.8-1.4 ns; a prediction stored in 94 % of its entries saves 29 of within_distance's 71
# ms for an 8.5 ms split, the benchmark's predictions at 500 to 18,080 genes would save < 1 ms for
# 0.6-23 ms).
WITHIN_GEMM_SAVING_NS = 0.04
SPLIT_NS = 1.4


def available() -> bool:
    """Whether this build has every kernel of this module as called here (an older one may lack
    the newest, or take within_distance's earlier arguments)."""
    return all(has_kernel(op, args=args) for op, args in KERNELS.items())


def density(x: sp.spmatrix, rows: int = DENSITY_ROWS) -> np.ndarray:
    """Fraction of the cells with a stored value, per gene, from at most ``rows`` evenly spaced
    cells (counting a large file's stored values costs more than the split it steers saves)."""
    x = sp.csr_matrix(x)
    if x.shape[0] > rows:
        x = x[np.linspace(0, x.shape[0] - 1, rows).astype(np.int64)]
    counts = torch.bincount(torch.from_numpy(x.indices), minlength=x.shape[1]).numpy()
    return counts / max(x.shape[0], 1)


def dense_genes(density_x: np.ndarray, density_y: np.ndarray) -> np.ndarray:
    """Mask of the genes whose products a dense GEMM computes faster than the sparse kernel."""
    return density_x * density_y * SPARSE_COST > 1.0


def within_genes(density_x: np.ndarray, to_ref: np.ndarray, sizes, stored: int) -> np.ndarray | None:
    """The gene split of the products of cells with each other (segments of ``sizes`` cells,
    ``stored`` values in all) when splitting them apart from ``to_ref``, their split for the
    products with a reference, pays; None to reuse ``to_ref``."""
    own = dense_genes(density_x, density_x)
    pairs = float(np.sum(np.square(np.asarray(sizes, dtype=np.float64)))) / 2
    saving = WITHIN_GEMM_SAVING_NS * pairs * float(np.sum(density_x[own & ~to_ref] ** 2))
    return own if saving > SPLIT_NS * stored else None


@dataclass
class SplitCells:
    """Cells [n, G] as a CSR matrix of the sparse genes (the dense genes' entries removed) and a
    dense float64 tensor of the dense genes' columns."""

    sparse: sp.csr_matrix
    dense: torch.Tensor
    dense_genes: np.ndarray  # [G] bool: the split

    @classmethod
    def split(cls, x: sp.spmatrix, dense: np.ndarray) -> "SplitCells":
        """One pass of perturbdiff::split_columns over the stored values."""
        x = sp.csr_matrix(x, dtype=np.float64)
        position = torch.from_numpy(np.where(dense, np.cumsum(dense) - 1, -1).astype(np.int64))
        ptr, idx, val, values = torch.ops.perturbdiff.split_columns(
            *_csr_parts(x, x.indices.dtype), position, int(dense.sum()))
        sparse = sp.csr_matrix((val.numpy(), idx.numpy(), ptr.numpy()), shape=x.shape)
        return cls(sparse, values, dense)

    @property
    def shape(self) -> tuple[int, int]:
        return self.sparse.shape

    @cached_property
    def sparse_t(self) -> sp.csr_matrix:
        """The sparse part transposed, as CSR: the right operand of products (kept: the controls
        meet every block of a context)."""
        return self.sparse.T.tocsr()


def _csr_parts(m: sp.csr_matrix, index: np.dtype) -> list[torch.Tensor]:
    """Row pointers, column indices (both ``index``) and float64 values as tensors."""
    return [torch.from_numpy(np.ascontiguousarray(arr, dtype=dt))
            for arr, dt in ((m.indptr, index), (m.indices, index), (m.data, np.float64))]


def split_within(x: SplitCells, offsets, split=None, kernels: tuple[str, ...] = (),
                 bandwidths: tuple[float, ...] = ()) -> tuple[torch.Tensor, ...]:
    """The mean Euclidean distance over the pairs of rows within each segment
    offsets[i]:offsets[i + 1] of ``x`` (self-pairs included, as 0) and every row's squared norm:
    all segments in one call of perturbdiff::within_distance, which computes each segment's Gram
    matrix (upper triangle) and distances without handing them back.

    With ``split`` (one row per segment), each segment is two parts, rows before ``split[i]``
    and from it: the distances come per part ``[2, S]``, followed by the means of ``kernels``
    (``ops.reference.radial``'s, with ``bandwidths``) over the pairs within each part and
    between them, ``[K, 3, S]``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    cut = offsets[1:] if split is None else np.asarray(split, dtype=np.int64)
    distance, sq, kernel_means = torch.ops.perturbdiff.within_distance(
        *_csr_parts(x.sparse, x.sparse.indices.dtype), x.dense, torch.from_numpy(offsets),
        torch.from_numpy(cut), x.shape[1], list(kernels), [float(b) for b in bandwidths])
    return (distance[0], sq) if split is None else (distance, sq, kernel_means)


def split_distance_to(x: SplitCells, sq: torch.Tensor, ref: SplitCells, ref_sq: torch.Tensor
                      ) -> torch.Tensor:
    """Each row of ``x``'s mean Euclidean distance to the rows of ``ref`` (both split on the same
    genes; ``sq`` and ``ref_sq`` their squared norms), in one call of perturbdiff::distance_to,
    which reduces each block of products to distances without handing the products back."""
    if x.dense_genes is not ref.dense_genes and not np.array_equal(x.dense_genes, ref.dense_genes):
        raise ValueError("split_distance_to: x and ref are split on different genes")
    index = np.promote_types(x.sparse.indices.dtype, ref.sparse_t.indices.dtype)
    return torch.ops.perturbdiff.distance_to(*_csr_parts(x.sparse, index), x.dense, sq,
                                             *_csr_parts(ref.sparse_t, index), ref.dense, ref_sq)
