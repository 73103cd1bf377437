"""Train/val/test splits over the groups of a store (the PerturbDiff held-out scheme).

Only held-out contexts hold val/test groups: a group of a held-out context whose perturbation is
in ``test_perturbations`` is test, in ``val_perturbations`` val, anything else is train (so a
held-out context keeps part of its perturbations in training). A zero-shot context is held out
whole: all its groups are test. Control cells are inputs in every split, never targets, so they
belong to no split part.
"""
from __future__ import annotations

import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from .contract import EmptyGroupError, MissingLabelError

PARTS = ("train", "val", "test")
LIST_FIELDS = ("holdout_contexts", "val_perturbations", "test_perturbations", "zero_shot_contexts")


@dataclass
class Split:
    """A split config and, once resolved against a store, the group ids of each part."""

    holdout_contexts: list[str] = field(default_factory=list)
    val_perturbations: list[str] = field(default_factory=list)
    test_perturbations: list[str] = field(default_factory=list)
    zero_shot_contexts: list[str] = field(default_factory=list)
    allow_empty: bool = False
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, store) -> "Split":
        unknown = sorted(set(config) - set(LIST_FIELDS) - {"allow_empty"})
        if unknown:
            raise ValueError(f"unknown split config keys {unknown}; expected {list(LIST_FIELDS)} "
                             "and optionally allow_empty")
        lists = {}
        for name in LIST_FIELDS:
            value = config.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"split config {name!r} must be a list of strings, got {value!r}")
            lists[name] = value
        split = cls(**lists, allow_empty=bool(config.get("allow_empty", False)))
        split.resolve(store)
        return split

    def resolve(self, store) -> None:
        """Check every label against the store and compute ``groups`` per part."""
        _check_labels(self.holdout_contexts + self.zero_shot_contexts, store.vocab["context"],
                      "context")
        _check_labels(self.val_perturbations + self.test_perturbations,
                      store.vocab["perturbation"], "perturbation")
        if store.control_label in self.val_perturbations + self.test_perturbations:
            raise ValueError(f"the control label {store.control_label!r} cannot be a val/test "
                             "perturbation: control cells are inputs in every split")
        for a, b in (("val_perturbations", "test_perturbations"),
                     ("holdout_contexts", "zero_shot_contexts")):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if both:
                raise ValueError(f"labels {both} are in both {a} and {b}")
        ctx = store.groups["context_label"].to_numpy()
        pert = store.groups["perturbation_label"].to_numpy()
        held = np.isin(ctx, self.holdout_contexts)
        test = (held & np.isin(pert, self.test_perturbations)) | np.isin(ctx, self.zero_shot_contexts)
        val = held & np.isin(pert, self.val_perturbations) & ~test
        self._check_not_empty(store, held, pert, ctx)
        self.groups = {"train": np.flatnonzero(~(test | val)), "val": np.flatnonzero(val),
                       "test": np.flatnonzero(test)}

    def _check_not_empty(self, store, held: np.ndarray, pert: np.ndarray, ctx: np.ndarray) -> None:
        problems = [f"perturbation {p!r} has no cells in the held-out contexts {self.holdout_contexts}"
                    for p in self.val_perturbations + self.test_perturbations
                    if not (held & (pert == p)).any()]
        problems += [f"zero-shot context {c!r} has no perturbed cells"
                     for c in self.zero_shot_contexts if not (ctx == c).any()]
        if not problems:
            return
        message = "empty split groups: " + "; ".join(problems[:10]) + (
            f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        if not self.allow_empty:
            raise EmptyGroupError(message + " (set allow_empty = true in the config to accept)")
        warnings.warn(message, stacklevel=3)

    def group_ids(self, part: str) -> np.ndarray:
        if part not in PARTS:
            raise ValueError(f"unknown split part {part!r}; expected one of {PARTS}")
        if not self.groups:
            raise ValueError("this Split is not resolved against a store; call resolve(store)")
        return self.groups[part]

    def to_toml(self) -> str:
        lines = ["# perturbdiff split: val/test groups = held-out contexts x listed perturbations;",
                 "# zero-shot contexts are held out whole (all their perturbations -> test)."]
        for name in LIST_FIELDS:
            lines.append(f"{name} = [{', '.join(_toml_string(v) for v in getattr(self, name))}]")
        if self.allow_empty:
            lines.append("allow_empty = true")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_toml())
        return Path(path)


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _check_labels(labels: list[str], vocab: list[str], what: str) -> None:
    known = set(vocab)
    unknown = [label for label in dict.fromkeys(labels) if label not in known]
    if unknown:
        raise MissingLabelError(f"split config names {what} labels not in the store: {unknown}; "
                                f"known {what}s (first 20): {vocab[:20]}")


def load_split(toml_path: str | os.PathLike, store) -> Split:
    path = Path(toml_path)
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"split config {path} is not valid TOML: {err}") from err
    return Split.from_config(config, store)


def propose_split(store, n_holdout_contexts: int = 1, frac_test: float = 0.6,
                  frac_val: float = 0.1, seed: int = 0) -> Split:
    """A PerturbDiff-style split for a new dataset.

    Held-out contexts are drawn (seeded) among those with the most perturbations that also occur
    in another context, because only those test *unseen combinations* of a known perturbation and
    a known context. Of the shared perturbations, ``frac_test`` go to test and ``frac_val`` to val
    (at least one each); the rest stay in training (the paper keeps ~30 % in training).
    """
    if not (0 < frac_test and frac_val >= 0 and frac_test + frac_val < 1):
        raise ValueError(f"need 0 < frac_test, 0 <= frac_val, frac_test + frac_val < 1; got "
                         f"{frac_test}, {frac_val}")
    rng = np.random.default_rng(seed)
    g = store.groups
    per_ctx = g.groupby("context_label")["perturbation_label"].apply(lambda s: set(s)).to_dict()
    contexts = sorted(per_ctx)
    if len(contexts) <= n_holdout_contexts or n_holdout_contexts < 1:
        raise ValueError(f"cannot hold out {n_holdout_contexts} of {len(contexts)} contexts "
                         "(at least one must stay in training)")

    def shared(c: str) -> set[str]:
        return per_ctx[c] & set().union(*(per_ctx[o] for o in contexts if o != c))

    score = np.array([len(shared(c)) for c in contexts], dtype=float)
    # Random tie-break among the best-covered contexts.
    ranked = np.lexsort((rng.random(len(contexts)), -score))
    holdout = sorted(contexts[i] for i in ranked[:n_holdout_contexts])
    candidates = sorted(set().union(*(shared(c) for c in holdout)))
    if len(candidates) < 2:
        raise EmptyGroupError(f"held-out contexts {holdout} share fewer than 2 perturbations with "
                              "the other contexts; no val/test combination can be formed")
    candidates = list(rng.permutation(candidates))
    n_test = max(1, int(round(frac_test * len(candidates))))
    n_val = max(1 if frac_val > 0 else 0, int(round(frac_val * len(candidates))))
    n_val = min(n_val, len(candidates) - n_test)
    split = Split(holdout_contexts=holdout, test_perturbations=sorted(candidates[:n_test]),
                  val_perturbations=sorted(candidates[n_test:n_test + n_val]))
    split.resolve(store)
    return split


def split_report(split: Split, store) -> str:
    """Cells and groups per split part, plus the control cells every part can draw from."""
    n_cells = store.groups["n_cells"].to_numpy()
    lines = [f"{'part':<6} {'groups':>8} {'cells':>10}  contexts"]
    for part in PARTS:
        ids = split.group_ids(part)
        ctx = sorted(set(store.groups["context_label"].to_numpy()[ids]))
        shown = ", ".join(ctx[:6]) + (f" (+{len(ctx) - 6})" if len(ctx) > 6 else "")
        lines.append(f"{part:<6} {ids.size:>8} {int(n_cells[ids].sum()):>10}  {shown}")
    lines.append(f"control cells (inputs in every part): {int(store.is_control.sum())} in "
                 f"{len(store.control_groups)} (context, batch) groups")
    lines.append(f"held-out contexts: {split.holdout_contexts or '-'}; zero-shot: "
                 f"{split.zero_shot_contexts or '-'}")
    return "\n".join(lines)
