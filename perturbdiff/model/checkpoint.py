"""Checkpoint files: atomic writes, safe loading (``weights_only=True``), clear errors.

A checkpoint is a plain dict of tensors and plain containers, so loading it never executes code:
``format``/``version`` identify it; ``config``, ``genes``, ``vocab`` and ``control_label``
describe the model; ``model`` and ``ema`` are state dicts; ``optimizer``, ``scheduler``, ``rng``,
``step`` and ``data_position`` (epoch, batch) make resuming exact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = "perturbdiff-checkpoint"
VERSION = 1
REQUIRED = ("config", "genes", "vocab", "model", "ema", "step")


class CheckpointError(ValueError):
    """The file is not a readable perturbdiff checkpoint."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write `payload` (format keys added) to `path` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_atomically(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` (hard link, else copy), replacing it atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a checkpoint; a foreign or damaged file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickled code objects...
        raise CheckpointError(f"checkpoint {path} is corrupted or not a torch file that loads "
                              f"safely (weights_only=True): {type(err).__name__}: {str(err)[:300]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and ("state_dict" in ckpt or "pytorch-lightning_version" in ckpt):
            hint = " (it looks like a PyTorch Lightning checkpoint, e.g. the authors' release)"
        raise CheckpointError(f"{path} is not a perturbdiff checkpoint: missing format marker "
                              f"{FORMAT!r}{hint}")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')!r}; "
                              f"this perturbdiff reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return ckpt
