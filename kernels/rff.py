"""Triton kernels for random Fourier feature set embeddings (``perturbdiff.ops.rff`` defines the op).

rff_embed(x [B,S,G], w [B,S], center [B,G], freq [G,F]) -> [B, 2F]: one program per
(cell block, frequency block, set) computes the projection tile P = (X - c) @ W over gene chunks
(fp32 accumulator, centring folded into the load), applies cos/sin and reduces the block's cells
with their weights (column-sum epilogue). Per-program partial sums go to a [B, cell blocks, 2F]
buffer that is summed in a fixed order afterwards: no float atomics, deterministic, and the
[B, S, F] feature matrix is never stored.

The backward needs H = w * (cos(P) * g_sin - sin(P) * g_cos) ([B, S, F], recomputing P);
grad_x = H @ W^T is then a plain GEMM, left to the vendor BLAS.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import get_settings
from .pairwise import launcher

# tl.dot precision comes from the package settings (default "ieee"); keep it "ieee" or "tf32x3"
# for statistics: TF32 puts ~1e-3 relative errors into the phases, which cos/sin then amplify.
BLOCK_S, BLOCK_F, BLOCK_G = 32, 64, 32


@triton.jit
def _projection(x_ptr, c_ptr, f_ptr, b, offs_s, offs_f, S, G, F,
                sxb, sxs, sxg, scb, scg, sfg, sff,
                BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr, PRECISION: tl.constexpr):
    """(X[b, offs_s] - c[b]) @ W[:, offs_f] as a [BLOCK_S, BLOCK_F] fp32 tile; padded rows give 0."""
    row_ok = offs_s < S
    col_ok = offs_f < F
    acc = tl.zeros((BLOCK_S, BLOCK_F), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        xt = tl.load(x_ptr + b * sxb + offs_s[:, None] * sxs + offs_g[None, :] * sxg,
                     mask=row_ok[:, None] & g_ok[None, :], other=0.0)
        ct = tl.load(c_ptr + b * scb + offs_g * scg, mask=g_ok, other=0.0)
        xt = tl.where(row_ok[:, None], xt - ct[None, :], 0.0)
        ft = tl.load(f_ptr + offs_g[:, None] * sfg + offs_f[None, :] * sff,
                     mask=g_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xt, ft, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _embed_kernel(x_ptr, w_ptr, c_ptr, f_ptr, part_ptr, S, G, F,
                  sxb, sxs, sxg, swb, sws, scb, scg, sfg, sff,
                  BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_s, pid_f, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    p = _projection(x_ptr, c_ptr, f_ptr, b, offs_s, offs_f, S, G, F,
                    sxb, sxs, sxg, scb, scg, sfg, sff, BLOCK_S, BLOCK_F, BLOCK_G, PRECISION)
    w = tl.load(w_ptr + b * swb + offs_s * sws, mask=offs_s < S, other=0.0)
    cos_sum = tl.sum(tl.cos(p) * w[:, None], axis=0)
    sin_sum = tl.sum(tl.sin(p) * w[:, None], axis=0)
    # partial buffer [B, n_sblocks, 2F], contiguous
    base = part_ptr + (b * tl.num_programs(0) + pid_s) * 2 * F
    tl.store(base + offs_f, cos_sum, mask=offs_f < F)
    tl.store(base + F + offs_f, sin_sum, mask=offs_f < F)


@triton.jit
def _coeff_kernel(x_ptr, w_ptr, c_ptr, f_ptr, g_ptr, h_ptr, S, G, F,
                  sxb, sxs, sxg, swb, sws, scb, scg, sfg, sff,
                  BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_s, pid_f, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    p = _projection(x_ptr, c_ptr, f_ptr, b, offs_s, offs_f, S, G, F,
                    sxb, sxs, sxg, scb, scg, sfg, sff, BLOCK_S, BLOCK_F, BLOCK_G, PRECISION)
    f_ok = offs_f < F
    g_cos = tl.load(g_ptr + b * 2 * F + offs_f, mask=f_ok, other=0.0)
    g_sin = tl.load(g_ptr + b * 2 * F + F + offs_f, mask=f_ok, other=0.0)
    w = tl.load(w_ptr + b * swb + offs_s * sws, mask=offs_s < S, other=0.0)
    h = (tl.cos(p) * g_sin[None, :] - tl.sin(p) * g_cos[None, :]) * w[:, None]
    # H [B, S, F], contiguous
    tl.store(h_ptr + (b * S + offs_s[:, None]) * F + offs_f[None, :], h,
             mask=(offs_s[:, None] < S) & f_ok[None, :])


def _grid(x, freq):
    return (triton.cdiv(x.shape[1], BLOCK_S), triton.cdiv(freq.shape[1], BLOCK_F), x.shape[0])


def _strides(x, w, center, freq):
    return (*x.stride(), *w.stride(), *center.stride(), *freq.stride())


@triton_op("perturbdiff::triton_rff_embed", mutates_args=())
def rff_embed(x: torch.Tensor, w: torch.Tensor, center: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Weighted sums of [cos, sin] features per set: [B, 2F] (fp32)."""
    grid = _grid(x, freq)
    partial = x.new_empty(x.shape[0], grid[0], 2 * freq.shape[1])
    launcher(_embed_kernel)[grid](
        x, w, center, freq, partial, x.shape[1], x.shape[2], freq.shape[1], *_strides(x, w, center, freq),
        BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F, BLOCK_G=BLOCK_G, PRECISION=get_settings().precision)
    return partial.sum(1)


@triton_op("perturbdiff::triton_rff_embed_coeffs", mutates_args=())
def rff_embed_coeffs(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, center: torch.Tensor,
                     freq: torch.Tensor) -> torch.Tensor:
    """H [B, S, F] with grad_x = H @ freq^T, for the upstream gradient ``grad`` [B, 2F]."""
    h = x.new_empty(x.shape[0], x.shape[1], freq.shape[1])
    launcher(_coeff_kernel)[_grid(x, freq)](
        x, w, center, freq, grad.contiguous(), h, x.shape[1], x.shape[2], freq.shape[1],
        *_strides(x, w, center, freq),
        BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F, BLOCK_G=BLOCK_G, PRECISION=get_settings().precision)
    return h
