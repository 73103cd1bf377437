"""Triton forward kernel of the kernel mean embedding mu_x(z_q) = sum_i w_i k(x_i, z_q).

The rectangular instance of the pairwise engine: one program per (query tile, set) loops over the
cell tiles of its set, so each output element has one owner and is summed in a fixed order. The
backward reuses ``pairwise._radial_bwd_kernel`` (rows x against columns z, and z against x).
"""

import torch
import triton
import triton.language as tl

from ..ops.reference import SQRT_CLAMP
from .pairwise import (KERNEL_IDS, _load_scales, _radial, _raw_sqdist,
                       bandwidth_coefficients, can_launch, is_low_precision, launcher)


@triton.jit
def _kme_fwd_kernel(x, xw, z, ctr, bw, out, n, Q, G, CLAMP: tl.constexpr,
                    KERNEL: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                    LOWP: tl.constexpr):
    b = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for row0 in range(0, n, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        # x and z are single segments here (second segment empty)
        raw = _raw_sqdist(x, x, n, 0, z, z, Q, 0, ctr, b, rows, cols, G,
                          BLOCK_N, BLOCK_Q, BLOCK_K, PRECISION, LOWP)
        k = _radial(tl.maximum(raw, 0.0), bw, CLAMP, KERNEL, NB)
        w = _load_scales(xw, xw, b, rows, n, 0)
        acc += tl.sum(w[:, None] * k, axis=0)
    tl.store(out + b * Q + cols, acc, mask=cols < Q)


def kme_forward(x, xw, z, center, kernel, bandwidths, *, precision, block, block_k):
    """fp32 [B, Q]: sum_i xw[b, i] k(x_bi - c_b, z_bq - c_b)."""
    B, n, G = x.shape
    Q = z.shape[1]
    out = torch.empty((B, Q), dtype=torch.float32, device=x.device)
    bw = bandwidth_coefficients(kernel, bandwidths, x)
    if can_launch(x):
        launcher(_kme_fwd_kernel)[(triton.cdiv(Q, block), B)](
            x, xw, z, center, bw, out, n, Q, G, CLAMP=SQRT_CLAMP,
            KERNEL=KERNEL_IDS[kernel], NB=bw.numel(), BLOCK_N=block, BLOCK_Q=block,
            BLOCK_K=block_k, PRECISION=precision, LOWP=is_low_precision(x))
    return out
