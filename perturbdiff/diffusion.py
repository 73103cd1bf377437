"""Gaussian diffusion over cell sets (method.md 3.2-3.4): schedule, noising, loss, DDIM sampler.

Linear beta schedule (1e-4 .. 0.02, T = 1000, float64 tables), one timestep per set, x0 prediction.
Training loss per set = mean squared error + weight x set-level discrepancy (the authors: geomloss
energy loss = half the energy distance, V-statistic) through ``perturbdiff.ops``. Classifier-free
guidance drops the covariates (one coin per batch) and self-conditioning feeds a no-grad first
estimate of x0 back in (one coin per batch). Sampling: DDIM eta = 0 with guidance in epsilon space;
by default the authors' truncated start (t = 99..0 with stride 1 from pure N(0, I) noise).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from . import ops

LOSS_KERNELS = ("energy", "rbf", "rff-rbf")
SCHEDULES = ("truncated", "strided")


@dataclass
class LossConfig:
    """Loss settings. exclude_padding=False reproduces the authors, whose padded duplicate cells
    (sets topped up by resampling the group) enter both terms; True weights them out."""

    mmd_weight: float = 1.0
    use_mse: bool = True
    kernel: str = "energy"
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    rff_features: int = 1024
    exclude_padding: bool = True

    def __post_init__(self):
        if self.kernel not in LOSS_KERNELS:
            raise ValueError(f"loss.kernel must be one of {LOSS_KERNELS}, got {self.kernel!r}")


def mse_per_set(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over cells x genes of each set ([B]); weights [B, S] select cells."""
    err = (pred - target).pow(2).mean(-1)
    if weights is None:
        return err.mean(-1)
    return (err * weights).sum(-1) / weights.sum(-1)


def set_discrepancy(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                    cfg: LossConfig) -> torch.Tensor:
    """Per-set discrepancy [B] between predicted and real sets with the configured kernel."""
    if cfg.kernel == "energy":
        return ops.energy_distance(target, pred, convention="half", x_weights=weights, y_weights=weights)
    if cfg.kernel == "rbf":
        return ops.mmd(target, pred, kernel="rbf", bandwidth=list(cfg.bandwidths),
                       x_weights=weights, y_weights=weights)
    # rff-rbf: one fixed seeded feature map (cached by ops.rff_mmd), i.e. an exact MMD under the
    # random-feature kernel, linear in the set size
    return ops.rff_mmd(target, pred, bandwidth=list(cfg.bandwidths), num_features=cfg.rff_features,
                       x_weights=weights, y_weights=weights)


class GaussianDiffusion:
    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"bad schedule: timesteps={timesteps}, betas {beta_start}..{beta_end}")
        self.timesteps = timesteps
        self.betas = torch.from_numpy(np.linspace(beta_start, beta_end, timesteps, dtype=np.float64))
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, one t per set."""
        ab = self.alphas_cumprod
        return self._coef(ab.sqrt(), t, x0) * x0 + self._coef((1 - ab).sqrt(), t, x0) * noise

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod
        return (self._coef(1 / ab.sqrt(), t, x_t) * x_t - x0) / self._coef((1 / ab - 1).sqrt(), t, x_t)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod
        return self._coef(1 / ab.sqrt(), t, x_t) * x_t - self._coef((1 / ab - 1).sqrt(), t, x_t) * eps

    # ------------------------------------------------------------------ training
    def training_losses(self, model, batch: dict, loss_cfg: LossConfig, generator: torch.Generator,
                        p_drop_cond: float = 0.5, p_self_cond: float = 0.5, p_drop_control: float = 0.0,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        drop_cond: bool | None = None, self_cond: bool | None = None,
                        drop_control: bool | None = None, autocast=None) -> dict[str, torch.Tensor]:
        """One stochastic training objective on a batch {"x", "ctrl", "mask", "pert", "context", "batch"}.

        Randomness comes from `generator` (t per set, noise, and the three per-batch coins) unless
        given explicitly, so a step is reproducible from (seed, step) alone. `autocast` is a context
        manager factory wrapping the network calls (bf16); the loss itself is computed in fp32.
        Returns {"loss", "mse", "mmd"} (scalars; mse/mmd detached).
        """
        x0, ctrl = batch["x"], batch["ctrl"]
        dev, b = x0.device, x0.shape[0]

        def coin(p):
            return bool(torch.rand((), generator=generator, device=generator.device) < p)

        if t is None:
            t = torch.randint(0, self.timesteps, (b,), generator=generator, device=generator.device).to(dev)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(dev)
        drop_cond = coin(p_drop_cond) if drop_cond is None else drop_cond
        self_cond = coin(p_self_cond) if self_cond is None else self_cond
        drop_control = coin(p_drop_control) if drop_control is None else drop_control
        if drop_control:
            ctrl = torch.zeros_like(ctrl)
        x_t = self.q_sample(x0, t, noise)
        cond = (batch["pert"], batch["context"], batch["batch"])
        ctx = autocast or nullcontext
        sc = None
        if self_cond:
            with torch.no_grad(), ctx():
                sc = model(x_t, t, ctrl, *cond, self_cond=None, drop_cond=drop_cond).detach()
        with ctx():
            pred = model(x_t, t, ctrl, *cond, self_cond=sc, drop_cond=drop_cond)
        pred = pred.float()
        target = x0.float()
        weights = batch["mask"].to(pred.dtype) if loss_cfg.exclude_padding else None
        mse = mse_per_set(pred, target, weights).mean()
        disc = set_discrepancy(pred, target, weights, loss_cfg).nanmean()
        loss = (mse if loss_cfg.use_mse else 0.0) + loss_cfg.mmd_weight * disc
        return {"loss": loss, "mse": mse.detach(), "mmd": disc.detach()}

    # ------------------------------------------------------------------ sampling
    def sample_timesteps(self, schedule: str = "truncated", steps: int = 100) -> list[int]:
        """Descending timesteps. "truncated": steps-1, ..., 0 with stride 1 (the authors' sampler,
        steps = start_time = 100); "strided": `steps` timesteps evenly spread over [0, T)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        if schedule == "truncated":
            return list(range(steps - 1, -1, -1))
        return sorted({int(round(v)) for v in np.linspace(0, self.timesteps - 1, steps)}, reverse=True)

    @torch.no_grad()
    def ddim_sample(self, model, ctrl: torch.Tensor, pert, context, batch, generator: torch.Generator,
                    guidance: float = 1.0, schedule: str = "truncated", steps: int = 100,
                    cutoff: float = 1e-4, clip_max: float | None = None, autocast=None) -> torch.Tensor:
        """DDIM (eta = 0) from x ~ N(0, I) with classifier-free guidance in epsilon space:
        eps = (1 + w) eps_cond - w eps_uncond, so w = 0 is exactly the conditional model. The
        self-conditioning input is the previous step's x0 estimate (zeros first); x0 entries below
        `cutoff` are set to 0 at every step, and above `clip_max` (if given) clipped to it.
        Returns x0 [B, S, G] on the model scale (values / 10)."""
        ctx = autocast or nullcontext
        x = torch.randn(ctrl.shape, generator=generator, device=generator.device, dtype=ctrl.dtype).to(ctrl.device)
        ts = self.sample_timesteps(schedule, steps)
        x0 = None
        for i, step in enumerate(ts):
            t = torch.full((ctrl.shape[0],), step, device=ctrl.device, dtype=torch.long)
            with ctx():
                x0_c = model(x, t, ctrl, pert, context, batch, self_cond=x0).float()
                if guidance != 0:
                    x0_u = model(x, t, ctrl, pert, context, batch, self_cond=x0, drop_cond=True).float()
            if guidance != 0:
                eps = (1 + guidance) * self.eps_from_x0(x, t, x0_c) - guidance * self.eps_from_x0(x, t, x0_u)
                x0_c = self.x0_from_eps(x, t, eps)
            x0 = torch.where(x0_c < cutoff, torch.zeros_like(x0_c), x0_c)
            if clip_max is not None:
                x0 = x0.clamp(max=clip_max)
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            ab_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
            eps = self.eps_from_x0(x, t, x0)
            x = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
        return x

