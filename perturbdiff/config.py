"""Run configuration: documented defaults (the authors' settings), TOML presets, key=value overrides.

A config is a two-level dict ``{section: {key: value}}``. ``DEFAULTS`` reproduces the authors'
from-scratch runs (method.md section 5); ``configs/authors.toml`` spells them out and
``configs/cpu-small.toml`` is a preset that trains in minutes on a laptop CPU. User files and
overrides may only set keys that exist here, with values of the default's type.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent / "configs"

# (default, help) per key; the help text is what `perturbdiff train --help-config` prints.
SCHEMA: dict[str, dict[str, tuple[object, str]]] = {
    "run": {
        "dir": ("runs/perturbdiff", "run folder: checkpoints, loss log, copy of the config"),
        "seed": (42, "seed of the model init, the data order and the diffusion noise"),
        "device": ("auto", "auto | cpu | cuda | cuda:N (under torchrun cuda:LOCAL_RANK)"),
    },
    "data": {
        "store": ("", "prepared store folder (perturbdiff prepare); required"),
        "split": ("", "split TOML (perturbdiff split); empty = every group trains, no validation"),
        "set_size": (256, "cells per set S (authors: 256 PBMC/Tahoe, 32 Replogle)"),
        "sets_per_batch": (8, "sets per micro-batch per process B (authors: 2048 cells / S)"),
        "num_workers": (0, "DataLoader worker processes"),
        "scale": (10.0, "the model sees log1p values / scale"),
    },
    "model": {
        "width": (512, "hidden width d"),
        "depth": (8, "number of Cross-DiT blocks"),
        "heads": (8, "attention heads (joint attention has width 2d)"),
        "mlp_ratio": (4.0, "MLP hidden width / d"),
        "cov_dim": (128, "embedding width per covariate role"),
        "cov_hidden": (0, "covariate projection width; 0 = number of genes, as the authors"),
        "perturbation_encoding": ("onehot", "onehot | none (constant: unconditional pretraining) | table"),
        "context_encoding": ("onehot", "onehot | none | table (authors: an LLM text-embedding table)"),
        "batch_encoding": ("onehot", "onehot | none | table"),
        "perturbation_table": ("", "label -> vector table (.csv/.tsv, or .npy + .labels.txt)"),
        "context_table": ("", "as perturbation_table, for contexts"),
        "batch_table": ("", "as perturbation_table, for batches"),
    },
    "diffusion": {
        "timesteps": (1000, "diffusion steps T of the linear beta schedule"),
        "beta_start": (1e-4, "first beta"),
        "beta_end": (0.02, "last beta"),
        "p_drop_cond": (0.5, "probability (one coin per batch) of the null covariate embedding"),
        "p_self_cond": (0.5, "probability (one coin per batch) of self-conditioning"),
        "p_drop_control": (0.0, "probability of zeroing the control stream (1 = pretraining)"),
    },
    "loss": {
        "mmd_weight": (1.0, "weight of the set discrepancy term"),
        "use_mse": (True, "add the mean squared error term"),
        "kernel": ("energy", "energy (half energy distance, authors) | rbf | rff-rbf"),
        "bandwidths": ([0.5, 1.0, 2.0, 4.0, 8.0], "RBF bandwidths (rbf, rff-rbf)"),
        "rff_features": (1024, "random Fourier features (rff-rbf)"),
        "exclude_padding": (True, "weight padded duplicate cells out of the loss (authors: false)"),
    },
    "optim": {
        "lr": (2e-4, "peak learning rate (authors: 2e-4; 2e-3 Replogle)"),
        "betas": ([0.9, 0.98], "AdamW betas"),
        "eps": (1e-8, "AdamW eps"),
        "weight_decay": (0.01, "weight decay, not applied to biases and LayerNorm parameters"),
        "decay_embeddings": (True, "apply weight decay to embedding tables (authors: yes)"),
        "warmup_steps": (200, "linear warm-up steps"),
        "plateau_frac": (0.1, "constant-LR phase after warm-up, as a fraction of max_steps"),
        "final_lr_frac": (0.1, "half-cosine decay ends at this fraction of lr at max_steps"),
        "clip_grad": (1.0, "gradient-norm clipping (0 = off)"),
        "fused": (True, "fused AdamW kernel (falls back to foreach where unsupported)"),
    },
    "train": {
        "max_steps": (200_000, "optimizer steps"),
        "grad_accum": (1, "micro-batches per optimizer step"),
        "ema_decay": (0.99, "EMA decay"),
        "ema_every": (10, "EMA update period in optimizer steps"),
        "bf16": (False, "bf16 autocast for the network (loss stays fp32)"),
        "compile": (False, "torch.compile the network"),
        "keep_freed_memory": (True, "CPU: keep freed memory in the process instead of returning it "
                                    "to the system (no page faults per step; RSS stays at its peak)"),
        "log_every": (50, "optimizer steps between loss-log rows"),
        "val_every": (1000, "optimizer steps between validation losses (0 = off)"),
        "val_batches": (5, "batches per validation (authors: limit_val_batches = 5)"),
        "checkpoint_every": (10_000, "optimizer steps between checkpoints"),
        "keep_checkpoints": (0, "keep only the newest N step checkpoints (0 = all)"),
        "resume": ("auto", "auto (continue from RUN/checkpoints/last.pt if present) | never | PATH"),
        "stop_after": (0, "end this invocation after N more steps (checkpointed; run again to go on)"),
        "init_from": ("", "fine-tune: initialise from this checkpoint, mapping genes/labels by name"),
        "reinit_final_layer": (False, "fine-tune: re-initialise the output layer (authors: yes)"),
        "progress": (True, "show a progress bar"),
    },
    "sample": {
        "schedule": ("truncated", "truncated (t = steps-1..0, authors) | strided (steps over 0..T-1)"),
        "steps": (100, "sampling steps (truncated: the start time, authors 100)"),
        "guidance": (1.0, "classifier-free guidance w; 0 = conditional model only"),
        "cutoff": (1e-4, "predicted values below this are set to 0"),
        "clip_to_data": (True, "clip x0 estimates at the store's largest value (authors: no clip; "
                               "an under-trained model otherwise emits values outside the log1p range)"),
        "batch_cells": (2048, "cells generated per network call"),
    },
}

DEFAULTS = {sec: {k: v[0] for k, v in keys.items()} for sec, keys in SCHEMA.items()}


class ConfigError(ValueError):
    """Unknown key, wrong type or unreadable config file."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(source: dict | str | Path | None = None, overrides=()) -> dict:
    """Defaults <- preset/file/dict <- overrides ("section.key=value", value in TOML syntax or a
    bare string). A preset name (e.g. "cpu-small") may be given instead of a path."""
    cfg = copy.deepcopy(DEFAULTS)
    if source is not None:
        data, origin = (source, "config dict") if isinstance(source, dict) else _read(source)
        for sec, keys in data.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"{origin}: top-level key {sec!r} must be a [section]")
            for key, value in keys.items():
                _set(cfg, f"{sec}.{key}", value, origin)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set(cfg, key.strip(), _parse_value(raw.strip()), "override")
    return cfg


def to_toml(cfg: dict) -> str:
    """TOML text of a config (strings, numbers, booleans, lists of those)."""
    lines = []
    for sec, keys in cfg.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def _read(source) -> tuple[dict, str]:
    path = Path(source)
    if not path.exists() and str(source) in preset_names():
        return _loads((PRESET_DIR / f"{source}.toml").read_text(), f"preset {source!r}"), f"preset {source!r}"
    if not path.is_file():
        raise ConfigError(f"config {source!s} is neither a file nor a preset (presets: {', '.join(preset_names())})")
    return _loads(path.read_text(), str(path)), str(path)


def _loads(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: invalid TOML: {err}") from None


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string such as runs/x or cpu


def _set(cfg: dict, dotted: str, value, origin: str) -> None:
    sec, _, key = dotted.partition(".")
    if sec not in SCHEMA or key not in SCHEMA[sec]:
        known = [f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]]
        hint = difflib.get_close_matches(dotted, known, n=3)
        raise ConfigError(f"{origin}: unknown config key {dotted!r}"
                          + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    cfg[sec][key] = _coerce(value, SCHEMA[sec][key][0], f"{origin}: {dotted}")


def _coerce(value, default, where: str):
    def fail():
        raise ConfigError(f"{where} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail()
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            fail()
        return [_coerce(v, default[0], where) for v in value]
    if not isinstance(value, str):
        fail()
    return value


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
