"""Triton kernels of the pairwise radial-kernel engine (see ``perturbdiff/ops/reference.py``).

The Gram tile is a K-loop of ``tl.dot`` over genes on centred rows (Triton tutorial 03) with the row
norms accumulated in the same loop; an epilogue turns it into squared distances D, evaluates
f(D) (or f'(D)) averaged over all bandwidths and reduces it with the cell weights.

* ``_mmd_fwd_kernel``: one program per (upper-triangle tile pair of Z = [X; Y], set). It writes the
  three block sums (XX, XY, YY) of its tile to a partial buffer; the host sums those in fp64 (a
  deterministic second stage: no float atomics).
* ``_radial_bwd_kernel``: backward by recomputation, shared by the MMD and the kernel mean
  embedding. A program owns BLOCK rows; for every column tile it recomputes D, forms
  W = c s_q a_p f'(D) and adds W @ Z_q to its own rows of the output, gene chunk by gene chunk
  (FlashSinkhorn's large-D scheme: read-modify-write of a tile nobody else touches), then turns
  them into factor * (rowsum(W) z_p - W Z).

Rows and columns are addressed in a virtual concatenation of two contiguous ``[B, S, G]`` tensors
("segments"), so [X; Y] is never materialised.
"""

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from triton.runtime.jit import JITFunction

from ..ops.reference import SQRT_CLAMP

KERNEL_IDS = {"rbf": 0, "laplacian": 1, "imq": 2, "energy": 3}


@triton.jit
def _segment_offsets(b, rows, n1, n2, ks, G):
    """Element offsets and masks of rows x genes ``ks`` in the segments [P1; P2] of set b."""
    kin = (ks < G)[None, :]
    in1 = (rows < n1)[:, None] & kin
    in2 = ((rows >= n1) & (rows < n1 + n2))[:, None] & kin
    off1 = (b * n1 + rows).to(tl.int64)[:, None] * G + ks[None, :]
    off2 = (b * n2 + rows - n1).to(tl.int64)[:, None] * G + ks[None, :]
    return off1, in1, off2, in2


@triton.jit
def _load_centred(p1, p2, ctr, b, rows, n1, n2, ks, G):
    """fp32 tile [rows, genes] of [P1; P2] minus the set's centre; exactly 0 outside them."""
    off1, in1, off2, in2 = _segment_offsets(b, rows, n1, n2, ks, G)
    v = tl.load(p1 + off1, mask=in1, other=0.0).to(tl.float32)
    v += tl.load(p2 + off2, mask=in2, other=0.0).to(tl.float32)
    c = tl.load(ctr + b.to(tl.int64) * G + ks, mask=ks < G, other=0.0)
    return tl.where(in1 | in2, v - c[None, :], 0.0)


@triton.jit
def _load_scales(s1, s2, b, rows, n1, n2):
    """Per-row scale (cell weight or upstream gradient) of [S1; S2]; 0 outside the segments."""
    in1 = rows < n1
    in2 = (rows >= n1) & (rows < n1 + n2)
    v = tl.load(s1 + b * n1 + rows, mask=in1, other=0.0)
    return v + tl.load(s2 + b * n2 + rows - n1, mask=in2, other=0.0)


@triton.jit
def _raw_sqdist(r1, r2, n1, n2, c1, c2, m1, m2, ctr, b, rows, cols, G,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, LOWP: tl.constexpr):
    """|r|^2 + |c|^2 - 2 r.c for a [BLOCK_R, BLOCK_C] tile (unclamped), norms from the same loop."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    nr = tl.zeros((BLOCK_R,), dtype=tl.float32)
    nc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(0, G, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _load_centred(r1, r2, ctr, b, rows, n1, n2, ks, G)
        c = _load_centred(c1, c2, ctr, b, cols, m1, m2, ks, G)
        nr += tl.sum(a * a, axis=1)
        nc += tl.sum(c * c, axis=1)
        if LOWP:  # fp16/bf16 inputs: tensor-core dot on the centred values, fp32 accumulation
            dt = r1.dtype.element_ty
            acc = tl.dot(a.to(dt), tl.trans(c.to(dt)), acc)
        else:
            acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
    return nr[:, None] + nc[None, :] - 2.0 * acc


@triton.jit
def _radial(d, bw, CLAMP: tl.constexpr, KERNEL: tl.constexpr, NB: tl.constexpr):
    """f(D) averaged over the NB per-bandwidth factors in ``bw`` (``bandwidth_coefficients``)."""
    if KERNEL == 3:  # energy: -sqrt(D), sqrt clamped like geomloss
        f = -tl.sqrt(tl.maximum(d, CLAMP))
    else:
        r = tl.sqrt(tl.maximum(d, CLAMP))
        f = tl.zeros_like(d)
        for i in tl.static_range(NB):
            a = tl.load(bw + i)
            if KERNEL == 0:
                f += tl.exp(-a * d)
            elif KERNEL == 1:
                f += tl.exp(-a * r)
            else:
                f += 1.0 / tl.sqrt(1.0 + a * d)
        f = f / NB
    return f


@triton.jit
def _radial_grad(d, bw, CLAMP: tl.constexpr, KERNEL: tl.constexpr, NB: tl.constexpr):
    """f'(D) = df/dD; zero below the sqrt clamp for the energy and Laplacian kernels."""
    r = tl.sqrt(tl.maximum(d, CLAMP))
    dr = tl.where(d >= CLAMP, 0.5 / r, 0.0)  # d sqrt(max(D, clamp)) / dD
    if KERNEL == 3:
        g = -dr
    else:
        g = tl.zeros_like(d)
        for i in tl.static_range(NB):
            a = tl.load(bw + i)
            if KERNEL == 0:
                g -= a * tl.exp(-a * d)
            elif KERNEL == 1:
                g -= a * tl.exp(-a * r) * dr
            else:
                t = 1.0 / (1.0 + a * d)
                g -= 0.5 * a * t * tl.sqrt(t)
        g = g / NB
    return g


@triton.jit
def _mmd_fwd_kernel(x, y, xw, yw, ctr, bw, part, n, m, G, CLAMP: tl.constexpr,
                    KERNEL: tl.constexpr, NB: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                    LOWP: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1)
    # t enumerates tile pairs (ti <= tj) column by column: t = tj (tj + 1) / 2 + ti. The float root
    # can be off by one near perfect squares, hence the two integer corrections.
    tj = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    ti = t - tj * (tj + 1) // 2
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)

    raw = _raw_sqdist(x, y, n, m, x, y, n, m, ctr, b, rows, cols, G,
                      BLOCK, BLOCK, BLOCK_K, PRECISION, LOWP)
    self_pair = rows[:, None] == cols[None, :]
    d = tl.where(self_pair, 0.0, tl.maximum(raw, 0.0))
    k = _radial(d, bw, CLAMP, KERNEL, NB)
    wr = _load_scales(xw, yw, b, rows, n, m)
    wc = _load_scales(xw, yw, b, cols, n, m)
    v = wr[:, None] * k * wc[None, :]  # weights are 0 outside the sets, so padding adds nothing
    if EXCLUDE_DIAG:
        v = tl.where(self_pair, 0.0, v)

    rx = (rows < n)[:, None]
    cx = (cols < n)[None, :]
    mult = tl.where(ti == tj, 1.0, 2.0)  # an off-diagonal tile stands for its mirror image too
    sxx = tl.sum(tl.where(rx & cx, v, 0.0)) * mult
    syy = tl.sum(tl.where(~rx & ~cx, v, 0.0)) * mult
    # S_xy counts each unordered X-Y pair once: a diagonal tile holds both orientations
    sxy = tl.sum(tl.where(rx != cx, v, 0.0)) * (mult * 0.5)
    out = part + (b * tl.num_programs(0) + t) * 3
    tl.store(out, sxx)
    tl.store(out + 1, sxy)
    tl.store(out + 2, syy)


@triton.jit
def _radial_bwd_kernel(r1, r2, c1, c2, a1, a2, s1, s2, coef, ctr, bw, g1, g2, gw1, gw2,
                       n1, n2, m1, m2, G, row0, row1, factor_z, factor_w, CLAMP: tl.constexpr,
                       KERNEL: tl.constexpr, NB: tl.constexpr, SAME: tl.constexpr,
                       EXCLUDE_SELF: tl.constexpr, NEED_Z: tl.constexpr, NEED_W: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, LOWP: tl.constexpr):
    """Gradients of sum_{p,q} coef[seg p, seg q] a_p s_q f(D_pq) for the rows [R1; R2].

    g[p]  = factor_z * (rowsum(W) r_p - sum_q W_pq c_q),  W_pq = coef a_p s_q f'(D_pq)
    gw[p] = factor_w * sum_q coef s_q f(D_pq)
    SAME: rows and columns are the same points (self-pairs have D = 0 and no gradient).
    Only rows in [row0, row1) are computed (the ones whose gradient is wanted).
    """
    # torch.compile passes Python floats as fp64 scalars (a launch from Python, as fp32): fp64 would
    # spread to W and clash with the fp32 operand of its tl.dot
    factor_z = tl.cast(factor_z, tl.float32)
    factor_w = tl.cast(factor_w, tl.float32)
    b = tl.program_id(1)
    rows = row0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.where(rows < row1, rows, n1 + n2)  # past the end of both segments: fully masked
    ar = _load_scales(a1, a2, b, rows, n1, n2)
    rseg1 = (rows < n1)[:, None]
    cf = coef + b * 4
    c11 = tl.load(cf)
    c12 = tl.load(cf + 1)
    c21 = tl.load(cf + 2)
    c22 = tl.load(cf + 3)
    rsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for col0 in range(0, m1 + m2, BLOCK_C):
        cols = col0 + tl.arange(0, BLOCK_C)
        raw = _raw_sqdist(r1, r2, n1, n2, c1, c2, m1, m2, ctr, b, rows, cols, G,
                          BLOCK_R, BLOCK_C, BLOCK_K, PRECISION, LOWP)
        d = tl.maximum(raw, 0.0)
        self_pair = (rows[:, None] == cols[None, :]) & SAME
        d = tl.where(self_pair, 0.0, d)
        cseg1 = (cols < m1)[None, :]
        cblk = tl.where(rseg1, tl.where(cseg1, c11, c12), tl.where(cseg1, c21, c22))
        cs = cblk * _load_scales(s1, s2, b, cols, m1, m2)[None, :]
        if NEED_W:
            k = _radial(d, bw, CLAMP, KERNEL, NB)
            if EXCLUDE_SELF:
                k = tl.where(self_pair, 0.0, k)
            wsum += tl.sum(cs * k, axis=1)
        if NEED_Z:
            # the reference's clamp_min(D, 0) passes no gradient where the raw value is negative
            live = (raw >= 0.0) & ~self_pair
            w = tl.where(live, cs * _radial_grad(d, bw, CLAMP, KERNEL, NB), 0.0) * ar[:, None]
            rsum += tl.sum(w, axis=1)
            for k0 in range(0, G, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                zc = _load_centred(c1, c2, ctr, b, cols, m1, m2, ks, G)
                off1, in1, off2, in2 = _segment_offsets(b, rows, n1, n2, ks, G)
                acc = tl.load(g1 + off1, mask=in1, other=0.0)
                acc += tl.load(g2 + off2, mask=in2, other=0.0)
                acc = tl.dot(w, zc, acc, input_precision=PRECISION)
                tl.store(g1 + off1, acc, mask=in1)
                tl.store(g2 + off2, acc, mask=in2)
    if NEED_Z:
        for k0 in range(0, G, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            zr = _load_centred(r1, r2, ctr, b, rows, n1, n2, ks, G)
            off1, in1, off2, in2 = _segment_offsets(b, rows, n1, n2, ks, G)
            acc = tl.load(g1 + off1, mask=in1, other=0.0) + tl.load(g2 + off2, mask=in2, other=0.0)
            grad = factor_z * (rsum[:, None] * zr - acc)
            tl.store(g1 + off1, grad, mask=in1)
            tl.store(g2 + off2, grad, mask=in2)
    if NEED_W:
        in1 = rows < n1
        in2 = (rows >= n1) & (rows < n1 + n2)
        tl.store(gw1 + b * n1 + rows, factor_w * wsum, mask=in1)
        tl.store(gw2 + b * n2 + rows - n1, factor_w * wsum, mask=in2)


# TRITON_INTERPRET=1 (read by triton at import) turns @triton.jit functions into interpreted ones.
INTERPRETED = not isinstance(_mmd_fwd_kernel, JITFunction)

# ----------------------------------------------------------------------------------------------
# Host-side launchers. Inputs are contiguous; weights, scales, centre and coefficients are fp32.


def bandwidth_coefficients(kernel: str, bandwidths, like):
    """fp32 tensor of the per-bandwidth factors the epilogue multiplies by (one per bandwidth)."""
    if kernel == "rbf":
        coefs = [0.5 / (s * s) for s in bandwidths]
    elif kernel == "laplacian":
        coefs = [1.0 / s for s in bandwidths]
    elif kernel == "imq":
        coefs = [1.0 / (s * s) for s in bandwidths]
    else:  # energy has no scale; one dummy entry keeps the pointer valid
        coefs = [0.0]
    return torch.tensor(coefs, dtype=torch.float32, device=like.device)


def can_launch(t) -> bool:
    """False only while tracing with fake tensors under the interpreter.

    Interpreted kernels launch as plain Python (``launcher``), so they would read the fake tensors'
    data; the fake implementation needs the output shapes alone, which the body has made by then.
    Compiled kernels always launch: with fake tensors ``wrap_triton`` records them into the graph.
    """
    return not (INTERPRETED and is_fake(t))


def launcher(kernel):
    """What to index with the grid: ``wrap_triton``'s traceable kernel when compiled, the kernel
    itself when interpreted (torch releases before 2.13 reject interpreted kernels there)."""
    return kernel if INTERPRETED else wrap_triton(kernel)


def is_low_precision(t) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def mmd_block_sums(x, y, xw, yw, center, kernel, bandwidths, exclude_diag, *, precision, block,
                   block_k):
    """[B, 3] fp64 block sums (S_xx, S_xy, S_yy) of w_p w_q k(z_p, z_q) over Z = [X; Y]."""
    B, n, G = x.shape
    m = y.shape[1]
    tiles = triton.cdiv(n + m, block)
    pairs = tiles * (tiles + 1) // 2
    part = torch.empty((B, pairs, 3), dtype=torch.float32, device=x.device)
    bw = bandwidth_coefficients(kernel, bandwidths, x)
    if can_launch(x):
        launcher(_mmd_fwd_kernel)[(pairs, B)](
            x, y, xw, yw, center, bw, part, n, m, G, CLAMP=SQRT_CLAMP,
            KERNEL=KERNEL_IDS[kernel], NB=bw.numel(), EXCLUDE_DIAG=exclude_diag, BLOCK=block,
            BLOCK_K=block_k, PRECISION=precision, LOWP=is_low_precision(x))
    return part.to(torch.float64).sum(1)


def radial_backward(r1, r2, c1, c2, a1, a2, s1, s2, coef, center, kernel, bandwidths, *, same,
                    exclude_self, factor_z, factor_w, need_r1, need_r2, need_z, need_w, precision,
                    block, block_k, block_d):
    """Launch ``_radial_bwd_kernel`` for the wanted row segments.

    Returns fp32 (g1 [B, n1, G], g2 [B, n2, G], gw1 [B, n1], gw2 [B, n2]); an output that is not
    wanted (segment not needed, or need_z / need_w off) is an empty tensor.
    """
    B, n1, G = r1.shape
    n2 = r2.shape[1]
    m1, m2 = c1.shape[1], c2.shape[1]
    f32 = dict(dtype=torch.float32, device=r1.device)

    def out(shape, wanted):  # a fresh tensor each: op outputs must not alias one another
        return torch.zeros(shape if wanted else (0,), **f32)

    g1 = out((B, n1, G), need_z and need_r1)
    g2 = out((B, n2, G), need_z and need_r2)
    gw1 = out((B, n1), need_w and need_r1)
    gw2 = out((B, n2), need_w and need_r2)
    row0 = 0 if need_r1 else n1
    row1 = n1 + n2 if need_r2 else n1
    bw = bandwidth_coefficients(kernel, bandwidths, r1)
    if row1 > row0 and (need_z or need_w) and can_launch(r1):
        grid = (triton.cdiv(row1 - row0, block), B)
        launcher(_radial_bwd_kernel)[grid](
            r1, r2, c1, c2, a1, a2, s1, s2, coef, center, bw, g1, g2, gw1, gw2,
            n1, n2, m1, m2, G, row0, row1, factor_z, factor_w, CLAMP=SQRT_CLAMP,
            KERNEL=KERNEL_IDS[kernel], NB=bw.numel(), SAME=same, EXCLUDE_SELF=exclude_self,
            NEED_Z=need_z, NEED_W=need_w, BLOCK_R=block, BLOCK_C=block, BLOCK_K=block_k,
            BLOCK_D=block_d, PRECISION=precision, LOWP=is_low_precision(r1))
    return g1, g2, gw1, gw2
