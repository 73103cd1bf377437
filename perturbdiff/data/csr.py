"""Vectorised CSR row gathering and densification (no Python loop over rows)."""
from __future__ import annotations

import numpy as np


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of the ranges ``starts[k] : starts[k] + lengths[k]``, vectorised."""
    offsets = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)


def segment_index(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``data``/``indices`` of the non-zeros of ``rows`` (concatenated in row order)
    and the number of non-zeros of each row."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(indptr[rows], dtype=np.int64)
    lengths = np.asarray(indptr[rows + 1], dtype=np.int64) - starts
    return _segments(starts, lengths), lengths


def take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]`` for an ascending index into a (memory-mapped) array: one slice read when
    the index is dense in its span (a set is a contiguous row range), page-wise reads otherwise."""
    if index.size == 0:
        return np.asarray(array[:0])
    lo, hi = int(index[0]), int(index[-1]) + 1
    if hi - lo <= 2 * index.size:
        return np.asarray(array[lo:hi])[index - lo]
    return np.asarray(array[index])


def densify(indices: np.ndarray, data: np.ndarray, lengths: np.ndarray, n_cols: int) -> np.ndarray:
    """Scatter concatenated CSR rows (``lengths`` non-zeros each) into a dense float32 matrix."""
    out = np.zeros((lengths.size, n_cols), dtype=np.float32)
    # Flat positions row * n_cols + col: ~2x faster than 2-D fancy assignment.
    flat = np.repeat(np.arange(0, lengths.size * n_cols, n_cols, dtype=np.int64), lengths)
    flat += indices
    out.reshape(-1)[flat] = data
    return out


def gather_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                 n_cols: int, scale: float = 1.0) -> np.ndarray:
    """Dense ``[len(rows), n_cols]`` float32 rows of a (memory-mapped) CSR matrix, divided by
    ``scale``. Each distinct row is read once, in ascending order, so memory-mapped reads are
    sequential and duplicated rows (padding, controls drawn with replacement) cost no extra I/O;
    the scatter then writes straight into the output in request order (no second dense copy)."""
    rows = np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    index, lengths = segment_index(indptr, unique)
    cols = take(indices, index)
    vals = take(data, index).astype(np.float32, copy=False)
    if scale != 1.0:
        vals = vals * np.float32(1.0 / scale)
    seg_start = np.cumsum(lengths) - lengths
    order = _segments(seg_start[inverse], lengths[inverse])
    return densify(cols[order], vals[order], lengths[inverse], n_cols)
