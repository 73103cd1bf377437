"""Trainer: single process or torchrun DDP, EMA, bf16/compile, atomic checkpoints, exact resume.

`train(config, overrides)` runs the authors' recipe (method.md section 5) on a prepared store and
returns the run folder: ``checkpoints/step_*.pt`` + ``checkpoints/last.pt``, ``loss.csv`` (and
TensorBoard events when tensorboard is installed) and ``config.toml``.

Determinism: the data order is a function of (seed, epoch, batch) (perturbdiff.data), and the
diffusion randomness of every micro-batch (t, noise, guidance/self-conditioning coins) comes from a
generator seeded with (seed, step, micro-batch, rank). A run interrupted after a checkpoint and
resumed therefore continues bit-identically (on the same device and thread count).
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ConfigError, load_config, to_toml
from .diffusion import GaussianDiffusion, LossConfig
from .heap import keep_freed_memory
from .model import build_model
from .model.checkpoint import link_atomically, load_checkpoint, save_checkpoint
from .model.finetune import transfer_weights

LOG_FIELDS = ["step", "epoch", "lr", "loss", "mse", "mmd", "val_loss", "cells_per_s", "elapsed_s"]


# ---------------------------------------------------------------------------- distributed setup
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Rank/world from torchrun's environment; gloo on CPU, NCCL on GPU. No env = one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """DDP wrapper. Unused parameters are expected: the covariate encoder on guidance-dropout
    batches and the null embedding otherwise (the authors also set find_unused_parameters)."""
    if dist.world_size == 1:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


TRAIN_STREAM, VAL_STREAM = 0, 1


def step_generator(seed: int, stream: int, step: int, micro: int, rank: int,
                   device: torch.device) -> torch.Generator:
    """Generator for the diffusion randomness of one micro-batch, a function of its position only
    (stream separates training from validation draws)."""
    state = np.random.SeedSequence([seed, stream, step, micro, rank]).generate_state(2)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


# ---------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm parameters (the authors' rule; RMSNorm
    scales and adaLN weights are decayed), embeddings optionally exempt."""
    no_decay_ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if (name == "bias" or isinstance(module, nn.LayerNorm)
                    or (isinstance(module, nn.Embedding) and not decay_embeddings)):
                no_decay_ids.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay_ids], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, optim: dict) -> torch.optim.AdamW:
    groups = param_groups(model, optim["weight_decay"], optim["decay_embeddings"])
    kwargs = dict(lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])
    if optim["fused"]:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # device/dtype without a fused kernel
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


@torch.no_grad()
def clip_and_step(opt: torch.optim.Optimizer, params, clip: float) -> torch.Tensor | None:
    """Gradient-norm clipping to `clip` (0 = off) followed by `opt.step()`; returns the total norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (scale by clip / (norm + 1e-6) when that is
    below 1), but for a fused optimizer the scale is handed to its kernel as ``grad_scale``, which
    divides the gradients while it reads them: one pass over the gradients less than multiplying
    them first (clip_grad_norm_ also multiplies by 1.0 when no clipping is needed).
    """
    if clip <= 0:
        opt.step()
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        opt.step()
        return None
    total = torch.nn.utils.get_total_norm(grads)  # the norm clip_grad_norm_ computes
    coef = clip / (total + 1e-6)
    if bool(coef < 1):  # clip_grad_norm_'s clamp: otherwise the gradients stay as they are
        if opt.defaults.get("fused"):
            opt.grad_scale = 1 / coef  # fused kernels compute grad / grad_scale
            try:
                opt.step()
            finally:
                del opt.grad_scale
            return total
        torch._foreach_mul_(grads, coef)
    opt.step()
    return total


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here (bf16 autocast on a CPU without
    AVX512-BF16/AMX emulates them and is many times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def lr_factor(step: int, max_steps: int, warmup: int, plateau_frac: float, final_frac: float) -> float:
    """Linear warm-up, constant plateau of plateau_frac * max_steps, half-cosine to final_frac."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = warmup + int(plateau_frac * max_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt, optim: dict, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step):
        return lr_factor(step, max_steps, optim["warmup_steps"], optim["plateau_frac"], optim["final_lr_frac"])

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class EMA:
    """Exponential moving average of all parameters and floating buffers of a model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        cur = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ema, cur, 1 - self.decay)


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- logging
class LossLog:
    """CSV loss log (rewritten atomically on resume to drop rows past the checkpoint) and
    TensorBoard scalars when tensorboard is installed."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "loss.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.path.with_name(".loss.csv.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, LOG_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self.fh.flush()
        if self.tb is not None:
            for key in ("lr", "loss", "mse", "mmd", "val_loss", "cells_per_s"):
                if row.get(key) not in (None, ""):
                    self.tb.add_scalar(key, float(row[key]), row["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------- the training run
def _resume_path(cfg: dict, run_dir: Path) -> Path | None:
    mode = cfg["train"]["resume"]
    last = run_dir / "checkpoints" / "last.pt"
    if mode == "never":
        if last.exists():
            raise ConfigError(f"{run_dir} already holds checkpoints; use train.resume=auto to continue "
                              "or choose another run.dir")
        return None
    if mode == "auto":
        return last if last.exists() else None
    return Path(mode)


def _check_resumable(ckpt: dict, cfg: dict, store, path: Path) -> None:
    if ckpt["genes"] != store.genes or ckpt["vocab"] != store.vocab:
        raise ConfigError(f"checkpoint {path} was trained on other genes or labels than store "
                          f"{cfg['data']['store']}; use train.init_from to fine-tune instead")
    changed = [f"{sec}.{k}" for sec in ("model", "diffusion") for k, v in cfg[sec].items()
               if ckpt["config"][sec].get(k) != v]
    changed += [f"data.{k}" for k in ("set_size", "sets_per_batch", "scale", "split")
                if ckpt["config"]["data"][k] != cfg["data"][k]]
    if changed:
        raise ConfigError(f"cannot resume from {path}: settings differ from the checkpoint: {changed}")
    if ckpt.get("world_size", 1) != int(os.environ.get("WORLD_SIZE", "1")):
        raise ConfigError(f"checkpoint {path} was written by {ckpt.get('world_size')} processes; "
                          "resume with the same number (the data shards depend on it)")


def _open_data(cfg: dict):
    from .data import PerturbStore, load_split

    if not cfg["data"]["store"]:
        raise ConfigError("data.store is not set (path of a store made by `perturbdiff prepare`)")
    store = PerturbStore.open(cfg["data"]["store"])
    layout = load_split(cfg["data"]["split"], store) if cfg["data"]["split"] else None
    return store, layout


def _loader(store, layout, cfg: dict, part: str, epoch: int, start: int, dist: Dist, drop_last=True):
    from .data import make_loader

    d = cfg["data"]
    return make_loader(store, part if layout is not None else "all", d["set_size"], d["sets_per_batch"],
                       seed=cfg["run"]["seed"], epoch=epoch, num_workers=d["num_workers"],
                       rank=dist.rank, world_size=dist.world_size, scale=d["scale"],
                       drop_last=drop_last, layout=layout, start_batch=start,
                       pin_memory=dist.device.type == "cuda")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """State of one training run; `fit()` runs it. Use :func:`train` unless embedding it."""

    def __init__(self, cfg: dict, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg["run"]["dir"])
        if cfg["train"]["keep_freed_memory"] and dist.device.type == "cpu":
            keep_freed_memory()
        self.store, self.layout = _open_data(cfg)
        tc, optim = cfg["train"], cfg["optim"]
        resume = _resume_path(cfg, self.run_dir)
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt is not None:
            _check_resumable(ckpt, cfg, self.store, resume)
        torch.manual_seed(cfg["run"]["seed"])  # identical init on every rank
        self.model = build_model(cfg["model"], self.store.genes, self.store.vocab, self.store.control_label)
        if ckpt is None and tc["init_from"]:
            self._init_from(tc["init_from"])
        self.model.to(dist.device)
        self.ema = EMA(self.model, tc["ema_decay"])
        self.opt = make_optimizer(self.model, optim)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sched = make_scheduler(self.opt, optim, tc["max_steps"])
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.ema.model.load_state_dict(ckpt["ema"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            self.step = ckpt["step"]
            self.epoch, self.batch_in_epoch = ckpt["data_position"]["epoch"], ckpt["data_position"]["batch"]
            self._say(f"resumed from {resume} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        self.diffusion = GaussianDiffusion(cfg["diffusion"]["timesteps"], cfg["diffusion"]["beta_start"],
                                           cfg["diffusion"]["beta_end"])
        lc = cfg["loss"]
        self.loss_cfg = LossConfig(lc["mmd_weight"], lc["use_mse"], lc["kernel"], tuple(lc["bandwidths"]),
                                   lc["rff_features"], lc["exclude_padding"])
        net = wrap_ddp(self.model, dist)
        self.net = torch.compile(net) if tc["compile"] else net
        self.autocast = ((lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16))
                         if tc["bf16"] else None)
        if tc["bf16"] and not bf16_is_native(dist.device):
            self._say(f"warning: train.bf16 on a {dist.device.type} without native bf16 matrix "
                      "products: expect it to be much slower than fp32")
        self.resumed_step = self.step if ckpt is not None else None

    def _say(self, msg: str) -> None:
        if self.dist.main:
            print(f"[perturbdiff train] {msg}", flush=True)

    def _init_from(self, path: str) -> None:
        src = load_checkpoint(path)
        reinit = ("backbone.final_layer.",) if self.cfg["train"]["reinit_final_layer"] else ()
        report = transfer_weights(self.model, src["ema"], src["genes"], self.store.genes, src["vocab"],
                                  self.store.vocab, reinit)
        self._say(f"fine-tuning from {path}:\n  " + "\n  ".join(report))

    def _losses(self, batch: dict, gen: torch.Generator, net=None) -> dict:
        d = self.cfg["diffusion"]
        return self.diffusion.training_losses(self.net if net is None else net, batch, self.loss_cfg, gen, d["p_drop_cond"],
                                              d["p_self_cond"], d["p_drop_control"], autocast=self.autocast)

    def _batches(self):
        """Endless micro-batches from the saved data position; tracks (epoch, batch) as it goes."""
        while True:
            for batch in _loader(self.store, self.layout, self.cfg, "train", self.epoch,
                                 self.batch_in_epoch, self.dist):
                self.batch_in_epoch += 1
                yield batch
            if self.batch_in_epoch == 0:
                raise ValueError("the training split yields no batch: lower data.set_size or "
                                 "data.sets_per_batch (drop_last drops incomplete batches)")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, batches) -> dict:
        """One optimizer step over grad_accum micro-batches; returns loss terms and cell count."""
        accum, clip = self.cfg["train"]["grad_accum"], self.cfg["optim"]["clip_grad"]
        self.opt.zero_grad(set_to_none=True)
        totals, cells = {"loss": 0.0, "mse": 0.0, "mmd": 0.0}, 0
        for micro in range(accum):
            batch = _to_device(next(batches), self.dist.device)
            gen = step_generator(self.cfg["run"]["seed"], TRAIN_STREAM, self.step, micro, self.dist.rank, self.dist.device)
            sync = micro == accum - 1 or not hasattr(self.net, "no_sync")
            with nullcontext() if sync else self.net.no_sync():
                out = self._losses(batch, gen)
                (out["loss"] / accum).backward()
            for k in totals:
                totals[k] += out[k].item() / accum
            cells += int(batch["mask"].sum()) * self.dist.world_size
        clip_and_step(self.opt, self.params, clip)
        self.sched.step()
        self.step += 1
        if self.step % self.cfg["train"]["ema_every"] == 0:
            self.ema.update(self.model)
        return {**totals, "cells": cells}

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean stochastic training loss of the EMA model over val_batches validation batches."""
        if self.layout is None or len(self.layout.group_ids("val")) == 0:
            return None
        total, n = 0.0, 0
        loader = _loader(self.store, self.layout, self.cfg, "val", 0, 0, self.dist, drop_last=False)
        for i, batch in enumerate(loader):
            if i >= self.cfg["train"]["val_batches"]:
                break
            gen = step_generator(self.cfg["run"]["seed"], VAL_STREAM, 0, i, self.dist.rank, self.dist.device)
            total += (self._losses(_to_device(batch, self.dist.device), gen, net=self.ema.model)["loss"]).item()
            n += 1
        stats = torch.tensor([total, n], dtype=torch.float64)
        if self.dist.world_size > 1:
            stats = stats.to(self.dist.device)
            torch.distributed.all_reduce(stats)
        return float(stats[0] / stats[1]) if stats[1] > 0 else None

    def checkpoint(self) -> Path | None:
        if not self.dist.main:
            return None
        ckpt_dir = self.run_dir / "checkpoints"
        payload = {"config": self.cfg, "genes": list(self.store.genes), "vocab": self.store.vocab,
                   "control_label": self.store.control_label, "obs_keys": dict(self.store.keys),
                   "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                   "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                   "rng": rng_state(), "step": self.step, "world_size": self.dist.world_size,
                   "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch}}
        path = save_checkpoint(payload, ckpt_dir / f"step_{self.step:08d}.pt")
        link_atomically(path, ckpt_dir / "last.pt")
        keep = self.cfg["train"]["keep_checkpoints"]
        if keep > 0:
            for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink()
        return path

    def fit(self) -> Path:
        tc = self.cfg["train"]
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / ".config.toml.tmp"
            tmp.write_text(to_toml(self.cfg))
            os.replace(tmp, self.run_dir / "config.toml")
        log = LossLog(self.run_dir, self.resumed_step) if self.dist.main else None
        stop = tc["max_steps"] if tc["stop_after"] == 0 else min(tc["max_steps"], self.step + tc["stop_after"])
        bar = None
        if self.dist.main and tc["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc["max_steps"], initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        batches = self._batches()
        self.model.train()
        start, window_cells, window_t = time.perf_counter(), 0, time.perf_counter()
        try:
            while self.step < stop:
                out = self.train_step(batches)
                window_cells += out["cells"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
                val = None
                if tc["val_every"] and self.step % tc["val_every"] == 0:
                    val = self.validate()
                if self.step % tc["log_every"] == 0 or val is not None or self.step == stop:
                    now = time.perf_counter()
                    speed = window_cells / max(now - window_t, 1e-9)
                    window_cells, window_t = 0, now
                    if bar is not None:
                        bar.set_postfix(loss=f"{out['loss']:.4f}", cells_s=f"{speed:.0f}")
                    if log is not None:
                        log.write({"step": self.step, "epoch": self.epoch, "lr": self.sched.get_last_lr()[0],
                                   "loss": out["loss"], "mse": out["mse"], "mmd": out["mmd"],
                                   "val_loss": "" if val is None else val, "cells_per_s": round(speed, 1),
                                   "elapsed_s": round(now - start, 2)})
                if self.step % tc["checkpoint_every"] == 0 or self.step == stop:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return self.run_dir


def train(config: dict | str | Path, overrides=()) -> Path:
    """Train from a config (dict, TOML path or preset name) plus "section.key=value" overrides.

    Under torchrun each process calls this; rank 0 writes the run folder. Returns the run folder.
    """
    cfg = load_config(config, overrides)
    started = not torch.distributed.is_initialized()
    dist = setup_distributed(cfg["run"]["device"])
    try:
        out = Trainer(cfg, dist).fit()
        if dist.world_size > 1:
            torch.distributed.barrier()  # no rank tears down while another still communicates
        return out
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
