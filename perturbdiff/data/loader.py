"""Torch loaders over a prepared store: training batches of sets, and evaluation groups.

Design: the epoch's set plan is computed once (vectorised, in the main process); the dataset is
a map-style list of ready batches indexed by batch number, loaded with ``batch_size=None`` so each
worker builds whole ``[B, S, G]`` batches (one sorted memory-mapped read for all targets of a batch,
one for all controls). Every random draw is seeded from (seed, epoch[, batch]) only, so a batch is
identical whatever the number of workers, and resuming at a batch offset replays exactly the rest
of the epoch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .contract import EmptyGroupError
from .sets import ControlMatcher, SetPlan, plan_sets
from .split import Split

_CONTROL_STREAM = 1  # RNG stream tag separating control draws from the set plan


def resolve_groups(store, split: str | Sequence[int], layout: Split | None) -> np.ndarray:
    """Group ids (rows of ``store.groups``) for a part name, ``"all"``, or explicit ids."""
    if isinstance(split, str):
        if split == "all":
            ids = np.arange(len(store.groups))
        elif layout is None:
            raise ValueError(f"split={split!r} needs layout=<Split> (from load_split/propose_split); "
                             "use split='all' to train on every group")
        else:
            ids = layout.group_ids(split)
    else:
        ids = np.asarray(split, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(store.groups)):
            raise IndexError(f"group ids must be in [0, {len(store.groups)})")
    if ids.size == 0:
        raise EmptyGroupError(f"split {split!r} has no groups")
    return ids


class SetBatches(Dataset):
    """Batch ``i`` of this rank's share of one epoch, as the dict described in ``make_loader``."""

    def __init__(self, store, group_ids: np.ndarray, set_size: int, sets_per_batch: int,
                 seed: int, epoch: int, rank: int, world_size: int, scale: float, drop_last: bool):
        if sets_per_batch < 1:
            raise ValueError(f"sets_per_batch must be >= 1, got {sets_per_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.store, self.scale, self.seed, self.epoch = store, scale, seed, epoch
        self.matcher = ControlMatcher(store)
        self.plan: SetPlan = plan_sets(store, group_ids, set_size, seed, epoch)
        n_sets, step = len(self.plan), sets_per_batch * world_size
        # Every rank must see the same number of batches (DDP): drop the remainder, or wrap
        # around to fill it (as torch's DistributedSampler does).
        n_rounds = n_sets // step if drop_last else -(-n_sets // step)
        if n_rounds == 0:
            raise EmptyGroupError(
                f"only {n_sets} sets of {set_size} cells but a round needs sets_per_batch x "
                f"world_size = {step}; lower set_size or sets_per_batch, or pass drop_last=False")
        order = np.arange(n_rounds * step) % max(n_sets, 1)
        # Round r: global batches r*W .. r*W+W-1; rank k takes batch r*W+k (disjoint shards).
        self.global_batch = np.arange(n_rounds) * world_size + rank
        self.sets = order.reshape(n_rounds, world_size, sets_per_batch)[:, rank]

    def __len__(self) -> int:
        return self.sets.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sets = self.sets[i]
        rows, mask, groups = self.plan.rows[sets], self.plan.mask[sets], self.plan.group[sets]
        n_sets, set_size = rows.shape
        table = self.store.groups
        context = table["context"].to_numpy()[groups]
        batch = table["batch"].to_numpy()[groups]
        rng = np.random.default_rng([self.seed, self.epoch, _CONTROL_STREAM, int(self.global_batch[i])])
        ctrl_rows = np.stack([self.matcher.draw(c, b, set_size, rng) for c, b in zip(context, batch)])
        genes = self.store.n_genes
        x = self.store.dense(rows.ravel(), self.scale).reshape(n_sets, set_size, genes)
        ctrl = self.store.dense(ctrl_rows.ravel(), self.scale).reshape(n_sets, set_size, genes)
        return {"x": torch.from_numpy(x), "ctrl": torch.from_numpy(ctrl),
                "mask": torch.from_numpy(mask),
                "pert": torch.from_numpy(table["perturbation"].to_numpy()[groups].astype(np.int64)),
                "context": torch.from_numpy(context.astype(np.int64)),
                "batch": torch.from_numpy(batch.astype(np.int64)),
                "group": torch.from_numpy(groups.astype(np.int64))}


def make_loader(store, split: str | Sequence[int] = "train", set_size: int = 256,
                sets_per_batch: int = 8, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, scale: float = 10.0, drop_last: bool = True,
                *, layout: Split | None = None, start_batch: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over one epoch of this rank's training batches. Each item is a dict::

        x       float32 [B, S, G]  target cells / scale      ctrl  float32 [B, S, G] matched controls
        mask    bool    [B, S]     True for real cells       pert, context, batch, group  int64 [B]

    ``split``: ``"train"``/``"val"``/``"test"`` (with ``layout``, a resolved :class:`Split`),
    ``"all"`` (every group), or explicit group ids. ``start_batch`` skips the first batches of
    this rank's epoch (resume: pass the number of batches already consumed).
    """
    dataset = SetBatches(store, resolve_groups(store, split, layout), set_size, sets_per_batch,
                         seed, epoch, rank, world_size, scale, drop_last)
    if not 0 <= start_batch <= len(dataset):
        raise ValueError(f"start_batch={start_batch} outside this epoch's {len(dataset)} batches")
    return DataLoader(dataset, batch_size=None, sampler=range(start_batch, len(dataset)),
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False)


def iter_eval_groups(store, split: str | Sequence[int] = "test", set_size: int | None = None,
                     seed: int = 0, scale: float = 10.0, *,
                     layout: Split | None = None) -> Iterator[dict]:
    """For each group of the split: every cell once, with matched controls.

    Without ``set_size``: ``x``/``ctrl`` are ``[n, G]`` (n = the group's cells, ``rows`` [n]).
    With ``set_size`` S: the cells are cut into ceil(n/S) sets, the last padded by resampling,
    so ``x``/``ctrl`` are ``[n_sets, S, G]``, ``rows`` ``[n_sets, S]`` and ``mask`` marks the
    real cells (keep ``mask`` positions to generate exactly n cells).
    """
    matcher = ControlMatcher(store)
    table = store.groups
    for g in resolve_groups(store, split, layout):
        row = table.iloc[int(g)]
        rng = np.random.default_rng([seed, _CONTROL_STREAM, int(g)])
        rows = np.arange(row["start"], row["stop"], dtype=np.int64)
        mask = np.ones(rows.size, dtype=bool)
        if set_size is not None:
            n_sets = -(-rows.size // set_size)
            pad = rng.integers(row["start"], row["stop"], size=n_sets * set_size - rows.size)
            rows = np.concatenate([rows, pad]).reshape(n_sets, set_size)
            mask = np.concatenate([mask, np.zeros(pad.size, dtype=bool)]).reshape(n_sets, set_size)
        ctrl_rows = matcher.draw(int(row["context"]), int(row["batch"]), rows.size, rng)
        shape = (*rows.shape, store.n_genes)
        yield {"group": int(g), "rows": rows, "mask": torch.from_numpy(mask),
               "x": torch.from_numpy(store.dense(rows.ravel(), scale).reshape(shape)),
               "ctrl": torch.from_numpy(store.dense(ctrl_rows, scale).reshape(shape)),
               "pert": int(row["perturbation"]), "context": int(row["context"]),
               "batch": int(row["batch"])}
