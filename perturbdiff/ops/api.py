"""Public kernel API: MMD, energy distance, kernel mean embeddings, witness functions.

Every op is one weighted radial-kernel reduction over Z = [X; Y] (``reference.py`` states it
exactly); this module turns the user's arguments (shapes, weights, estimator, bandwidths) into that
reduction's inputs and hands it to a backend. The estimator lives only in the block coefficients:

* biased (V-statistic):  c_xx = 1/Wx^2,           c_yy = 1/Wy^2,           c_xy = -1/(Wx Wy)
* unbiased (U-statistic): c_xx = 1/(Wx^2 - sum wx^2), c_yy = 1/(Wy^2 - sum wy^2), c_xy as above,
  self-pairs left out,
with Wx = sum of the x weights (n for unit weights). The energy distance is the biased MMD under
k(D) = -sqrt(D); ``convention="half"`` halves it like geomloss's ``SamplesLoss("energy")``.
"""

from collections.abc import Sequence

import torch

from . import _backends
from .reference import KERNELS

ESTIMATORS = ("biased", "unbiased")
_MEDIAN_ROWS = 1024  # rows sampled per set for the median heuristic


def mmd(x, y, kernel: str = "rbf", bandwidth=1.0, estimator: str = "biased", x_weights=None,
        y_weights=None, backend: str = "auto", center: bool = True):
    """Squared maximum mean discrepancy between cell sets.

    x: ``[n, G]`` and y: ``[m, G]`` (returns a scalar) or ``[B, S, G]`` batches (returns ``[B]``).
    kernel: "rbf" (exp(-D / 2 sigma^2)), "laplacian" (exp(-|x-y| / sigma)), "imq"
    ((1 + D / sigma^2)^-1/2) or "energy" (-|x-y|, no bandwidth). With several bandwidths the kernel
    is their mean; "median" sets sigma^2 = median(D) / 2 over the pooled cells.
    x_weights, y_weights: per-cell weights ``[n]``/``[B, S]``; 0 marks padding.
    """
    return _reduce(x, y, kernel, bandwidth, estimator, x_weights, y_weights, backend, center, 1.0)


def energy_distance(x, y, convention: str = "half", estimator: str = "biased", x_weights=None,
                    y_weights=None, backend: str = "auto", center: bool = True):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| ("full") or half of it ("half", geomloss's
    energy loss and PerturbDiff's training term). Same shapes and weights as :func:`mmd`."""
    if convention not in ("half", "full"):
        raise ValueError(f"convention must be 'half' or 'full', got {convention!r}")
    scale = 0.5 if convention == "half" else 1.0
    return _reduce(x, y, "energy", None, estimator, x_weights, y_weights, backend, center, scale)


def kme(x, z, kernel: str = "rbf", bandwidth=1.0, x_weights=None, backend: str = "auto"):
    """Kernel mean embedding of the set(s) x evaluated at query points z.

    x: ``[n, G]`` / ``[B, S, G]``, z: ``[Q, G]`` / ``[B, Q, G]`` -> ``[Q]`` / ``[B, Q]``:
    mu_x(z_q) = sum_i w_i k(x_i, z_q) / sum_i w_i. Differentiable in x and z.
    """
    _check_kernel(kernel)
    (x, z), single = _as_batches(("x", x), ("z", z))
    xw = _weights("x_weights", x_weights, x, single)
    bw = _bandwidths(kernel, bandwidth, x, z)
    xw = xw / xw.sum(1, keepdim=True)
    center = _pooled_mean(x, xw, None, None)
    name, fn = _backends.resolve(backend, "kme", x)
    out = fn(x, xw, z, center, kernel, bw)
    return out[0] if single else out


def witness(x, y, z, kernel: str = "rbf", bandwidth=1.0, x_weights=None, y_weights=None,
            backend: str = "auto"):
    """MMD witness function mu_x(z) - mu_y(z): where (at which query cells) the two sets differ."""
    if isinstance(bandwidth, str):  # resolve once so both embeddings use the same kernel
        (xb, yb), _ = _as_batches(("x", x), ("y", y))
        bandwidth = _bandwidths(kernel, bandwidth, xb, yb)
    return (kme(x, z, kernel, bandwidth, x_weights, backend)
            - kme(y, z, kernel, bandwidth, y_weights, backend))


class MMDLoss(torch.nn.Module):
    """``nn.Module`` wrapper: mean over the batch of :func:`mmd` (or the energy distance)."""

    def __init__(self, kernel: str = "energy", bandwidth=1.0, estimator: str = "biased",
                 convention: str = "half", backend: str = "auto", reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.kernel, self.bandwidth, self.estimator = kernel, bandwidth, estimator
        self.convention, self.backend, self.reduction = convention, backend, reduction

    def forward(self, x, y, x_weights=None, y_weights=None):
        if self.kernel == "energy":
            v = energy_distance(x, y, self.convention, self.estimator, x_weights, y_weights, self.backend)
        else:
            v = mmd(x, y, self.kernel, self.bandwidth, self.estimator, x_weights, y_weights, self.backend)
        return v.mean() if self.reduction == "mean" else v.sum() if self.reduction == "sum" else v

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, bandwidth={self.bandwidth!r}, estimator={self.estimator!r}"


def last_backend() -> str | None:
    """Name of the backend that ran the most recent op in this process (for reports and tests)."""
    return _LAST


_LAST = None


def _reduce(x, y, kernel, bandwidth, estimator, x_weights, y_weights, backend, center, scale):
    global _LAST
    _check_kernel(kernel)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    # With centring, the pooled mean doubles as the NaN/Inf check (one pass over the cells less).
    (x, y), single = _as_batches(("x", x), ("y", y), check_finite=not center)
    xw = _weights("x_weights", x_weights, x, single)
    yw = _weights("y_weights", y_weights, y, single)
    bw = _bandwidths(kernel, bandwidth, x, y)
    coef = _coefficients(xw, yw, estimator) * scale
    if center:
        ctr = _pooled_mean(x, xw, y, yw)
        if not torch.compiler.is_compiling() and not torch.isfinite(ctr).all():
            _check_finite(("x", x), ("y", y))  # names the culprit (else the sum overflowed)
    else:
        ctr = x.new_zeros(x.shape[0], x.shape[2])
    _LAST, fn = _backends.resolve(backend, "pairwise_mmd", x)
    out = fn(x, y, xw, yw, coef, ctr, kernel, bw, estimator == "unbiased")
    return out[0] if single else out


def _check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _as_batches(*named, check_finite: bool = True):
    """Validate and bring the inputs to [B, S, G]; True when they came as single sets."""
    dims = {t.dim() if isinstance(t, torch.Tensor) else None for _, t in named}
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [cells, genes] or [sets, cells, genes], got shape {tuple(t.shape)}")
        if t.shape[-2] == 0:
            raise ValueError(f"{name} is an empty set (shape {tuple(t.shape)})")
    (n0, t0), rest = named[0], named[1:]
    for name, t in rest:
        if len(dims) > 1:
            raise ValueError(f"{n0} and {name} must both be single sets or both batches, got shapes "
                             f"{tuple(t0.shape)} and {tuple(t.shape)}")
        if t.shape[-1] != t0.shape[-1]:
            raise ValueError(f"gene counts differ: {n0} has {t0.shape[-1]} genes, {name} has {t.shape[-1]}")
        if t.dim() == 3 and t.shape[0] != t0.shape[0]:
            raise ValueError(f"batch sizes differ: {n0} has {t0.shape[0]} sets, {name} has {t.shape[0]}")
        if t.device != t0.device:
            raise ValueError(f"{n0} is on {t0.device} but {name} is on {t.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{n0} is {t0.dtype} but {name} is {t.dtype}")
    if check_finite and not torch.compiler.is_compiling():
        _check_finite(*named)
    single = t0.dim() == 2
    return [t[None] if single else t for _, t in named], single


def _check_finite(*named):
    for name, t in named:
        # one reduction instead of a full boolean mask: a NaN or Inf anywhere makes the sum
        # non-finite (a sum that overflows is re-checked element-wise)
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf values")


def _weights(name, w, t, single):
    if w is None:
        return t.new_ones(t.shape[:2])
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(w)
    w = (w[None] if single else w).to(device=t.device, dtype=t.dtype)
    if w.shape != t.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(t.shape[:2][1:] if single else t.shape[:2])}, "
                         f"got {tuple(w.shape[1:] if single else w.shape)}")
    if not torch.compiler.is_compiling():
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{name} must be finite and non-negative")
        empty = (w.sum(1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{name} are all zero for set(s) {empty[:10]}: nothing to compare")
    return w


def _bandwidths(kernel, bandwidth, x, y) -> list[float]:
    if kernel == "energy":
        return [1.0]  # unused: the energy kernel has no scale
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be a number, a list of numbers or 'median', got {bandwidth!r}")
        return [_median_bandwidth(x, y)]
    bws = [float(b) for b in (bandwidth if isinstance(bandwidth, Sequence) else [bandwidth])]
    if not bws or any(not (b > 0 and b < float("inf")) for b in bws):
        raise ValueError(f"bandwidths must be positive and finite, got {bandwidth!r}")
    return bws


@torch.no_grad()
def _median_bandwidth(x, y) -> float:
    """sigma with 2 sigma^2 = median pooled squared distance (so k = exp(-D / median))."""
    from .reference import sqdist

    z = torch.cat([x, y], 1)[:, :_MEDIAN_ROWS].double()
    z = z - z.mean(1, keepdim=True)
    d = sqdist(z, z, same=True)
    iu = torch.triu_indices(z.shape[1], z.shape[1], 1, device=z.device)
    med = d[:, iu[0], iu[1]].median().item()
    if not med > 0:
        raise ValueError("median heuristic: all cells are identical, the bandwidth would be 0")
    return (med / 2) ** 0.5


def _coefficients(xw, yw, estimator) -> torch.Tensor:
    wx, wy = xw.sum(1), yw.sum(1)
    cxy = -1.0 / (wx * wy)
    if estimator == "biased":
        return torch.stack([1.0 / wx**2, cxy, 1.0 / wy**2], 1)
    nx, ny = wx**2 - (xw**2).sum(1), wy**2 - (yw**2).sum(1)
    if not torch.compiler.is_compiling() and ((nx <= 0).any() or (ny <= 0).any()):
        raise ValueError("the unbiased estimator needs at least two cells with non-zero weight in every set")
    return torch.stack([1.0 / nx, cxy, 1.0 / ny], 1)


@torch.no_grad()
def _pooled_mean(x, xw, y, yw) -> torch.Tensor:
    """Weighted mean of the pooled cells [B, G]: centring before the Gram product keeps the
    norm expansion accurate for values offset far from zero (log-expression)."""
    s = torch.einsum("bs,bsg->bg", xw, x)
    tot = xw.sum(1, keepdim=True)
    if y is not None:
        s = s + torch.einsum("bs,bsg->bg", yw, y)
        tot = tot + yw.sum(1, keepdim=True)
    return s / tot
