"""Cell sets and matched controls (method.md 1.2), vectorised over all groups at once.

* :func:`plan_sets`: per epoch (RNG seeded by (seed, epoch)) the rows of every group are shuffled
  and cut into chunks of S; the last chunk of a group is padded by resampling rows of the same
  group (``mask`` False there); all chunks are then shuffled globally.
* :class:`ControlMatcher`: for each target cell one control drawn uniformly, with replacement,
  from the controls of the same (context, batch); fallback when that pair has none: controls of
  the same batch in other contexts, else of the same context in other batches, else any control.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

_warned_contexts: set[tuple[str, str]] = set()


@dataclass
class SetPlan:
    """``rows[i]`` = the S store rows of set i, ``mask[i]`` True for real (non-padded) cells,
    ``group[i]`` = its row in ``store.groups``."""

    rows: np.ndarray
    mask: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return self.group.size


def plan_sets(store, group_ids: np.ndarray, set_size: int, seed: int, epoch: int) -> SetPlan:
    """The sets of one epoch over ``group_ids`` (rows of ``store.groups``), globally shuffled."""
    if set_size < 1:
        raise ValueError(f"set_size must be >= 1, got {set_size}")
    group_ids = np.asarray(group_ids, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 0])
    starts = store.groups["start"].to_numpy()[group_ids]
    sizes = store.groups["n_cells"].to_numpy()[group_ids]
    n_sets = -(-sizes // set_size)
    set_offset = np.cumsum(n_sets) - n_sets
    cell_offset = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    which = np.repeat(np.arange(group_ids.size), sizes)
    # Groups are contiguous row ranges, so one argsort of (group index + U[0,1)) shuffles every
    # group independently in a single vectorised call.
    order = np.argsort(which + rng.random(total), kind="stable")
    rows_flat = np.repeat(starts - cell_offset, sizes) + order
    pos = np.arange(total) - cell_offset[which]

    rows = np.empty((int(n_sets.sum()), set_size), dtype=np.int64)
    mask = np.zeros(rows.shape, dtype=bool)
    set_id = set_offset[which] + pos // set_size
    rows[set_id, pos % set_size] = rows_flat
    mask[set_id, pos % set_size] = True

    n_pad = n_sets * set_size - sizes
    pad_group = np.repeat(np.arange(group_ids.size), n_pad)
    pad_pos = sizes[pad_group] + np.arange(int(n_pad.sum())) - np.repeat(np.cumsum(n_pad) - n_pad, n_pad)
    pad_set = set_offset[pad_group] + pad_pos // set_size
    rows[pad_set, pad_pos % set_size] = starts[pad_group] + np.floor(
        rng.random(pad_group.size) * sizes[pad_group]).astype(np.int64)

    perm = rng.permutation(rows.shape[0])
    return SetPlan(rows=rows[perm], mask=mask[perm],
                   group=np.repeat(group_ids, n_sets)[perm])


class ControlMatcher:
    """Draws matched control rows per (context, batch); see the module docstring for the rule."""

    def __init__(self, store):
        ctrl = store.control_groups
        if ctrl.empty:
            raise ValueError(f"store {store.path} has no control cells ({store.control_label!r})")
        self._start = ctrl["start"].to_numpy()
        self._size = ctrl["n_cells"].to_numpy()
        self._ctx = ctrl["context"].to_numpy()
        self._batch = ctrl["batch"].to_numpy()
        self._store = store
        self._pools: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.fallback: dict[tuple[int, int], str] = {}

    def pool(self, context: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(start rows, cumulative sizes) of the control groups that cells of (context, batch) use."""
        key = (int(context), int(batch))
        if key not in self._pools:
            same_ctx, same_batch = self._ctx == context, self._batch == batch
            for rule, members in (("same context and batch", same_ctx & same_batch),
                                  ("same batch, other context", same_batch),
                                  ("same context, other batch", same_ctx),
                                  ("any control", np.ones_like(same_ctx))):
                if members.any():
                    break
            self.fallback[key] = rule
            if not same_ctx.any():
                self._warn_no_controls(context, rule)
            self._pools[key] = (self._start[members], np.cumsum(self._size[members]))
        return self._pools[key]

    def _warn_no_controls(self, context: int, rule: str) -> None:
        label = self._store.vocab["context"][context]
        token = (str(self._store.path), label)
        if token not in _warned_contexts:
            _warned_contexts.add(token)
            warnings.warn(f"context {label!r} has no control cells; its sets use matched controls "
                          f"from the fallback ({rule})", stacklevel=4)

    def draw(self, context: int, batch: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` control rows drawn uniformly with replacement from the pool of (context, batch)."""
        starts, cum = self.pool(context, batch)
        u = rng.integers(0, cum[-1], size=n)
        k = np.searchsorted(cum, u, side="right")
        before = cum - np.diff(cum, prepend=0)  # cells in the pool's earlier control groups
        return starts[k] + u - before[k]
