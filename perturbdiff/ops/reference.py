"""Pure-torch reference of the pairwise radial-kernel reductions.

It materialises the (n+m) x (n+m) Gram matrix, runs in any dtype (fp64 makes it the test oracle) on
any device, and is differentiable through autograd. Every other backend computes exactly what these
functions compute, with the same argument conventions:

* ``x [B, n, G]``, ``y [B, m, G]``: sets of cells; ``xw [B, n]``, ``yw [B, m]``: raw cell weights.
* ``coef [B, 3]``: block coefficients (c_xx, c_xy, c_yy) chosen by the estimator (see ``api.py``).
* ``center [B, G]``: subtracted from every cell before the Gram product (numerics only: distances
  are translation invariant).
* ``value_b = sum_{p,q} c_blk(p,q) w_p w_q k(z_p, z_q)`` over Z = [X; Y], i.e.
  c_xx * Sxx + 2 c_xy * Sxy + c_yy * Syy, with the i == j terms of Sxx and Syy left out when
  ``exclude_diag``.
* ``k(D) = mean_b f(D; sigma_b)`` on squared distances D (clamped at 0, self-pairs exactly 0).
"""

import torch

KERNELS = ("rbf", "laplacian", "imq", "energy")
# geomloss evaluates sqrt(clamp_min(D, 1e-8)): value 1e-4 at D = 0 and zero gradient below the clamp.
SQRT_CLAMP = 1e-8


def radial(kernel: str, d: torch.Tensor, bandwidths) -> torch.Tensor:
    """k(D): the kernel as a function of squared distance, averaged over the bandwidth list."""
    if kernel == "energy":
        return -torch.sqrt(torch.clamp_min(d, SQRT_CLAMP))
    out = torch.zeros_like(d)
    for s in bandwidths:
        if kernel == "rbf":
            out = out + torch.exp(d * (-0.5 / (s * s)))
        elif kernel == "laplacian":
            out = out + torch.exp(torch.sqrt(torch.clamp_min(d, SQRT_CLAMP)) * (-1.0 / s))
        elif kernel == "imq":
            out = out + torch.rsqrt(1.0 + d * (1.0 / (s * s)))
        else:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return out / len(bandwidths)


def sqdist(a: torch.Tensor, b: torch.Tensor, same: bool = False) -> torch.Tensor:
    """Squared distances [B, P, Q] by norm expansion, clamped at 0; exact 0 on the diagonal if same."""
    an = (a * a).sum(-1)
    bn = an if same else (b * b).sum(-1)
    d = torch.clamp_min(an[..., :, None] + bn[..., None, :] - 2.0 * a @ b.transpose(-1, -2), 0.0)
    if same:
        d = d * (1.0 - torch.eye(d.shape[-1], dtype=d.dtype, device=d.device))
    return d


def pairwise_mmd(x, y, xw, yw, coef, center, kernel: str, bandwidths, exclude_diag: bool):
    """Weighted block reduction over Z = [X; Y] (see module docstring). Returns [B]."""
    n = x.shape[1]
    z = torch.cat([x, y], dim=1) - center[:, None, :]
    w = torch.cat([xw, yw], dim=1)
    k = radial(kernel, sqdist(z, z, same=True), bandwidths)
    if exclude_diag:
        k = k * (1.0 - torch.eye(k.shape[-1], dtype=k.dtype, device=k.device))
    wk = w[:, :, None] * k * w[:, None, :]
    sxx = wk[:, :n, :n].sum((1, 2))
    sxy = wk[:, :n, n:].sum((1, 2))
    syy = wk[:, n:, n:].sum((1, 2))
    return coef[:, 0] * sxx + 2.0 * coef[:, 1] * sxy + coef[:, 2] * syy


def kme(x, xw, z, center, kernel: str, bandwidths):
    """Weighted kernel mean embedding: out[b, q] = sum_i xw[b, i] k(x_bi, z_bq). Returns [B, Q]."""
    k = radial(kernel, sqdist(x - center[:, None, :], z - center[:, None, :]), bandwidths)
    return (xw[:, :, None] * k).sum(1)
