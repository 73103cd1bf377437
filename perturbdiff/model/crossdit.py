"""Cross-DiT: the PerturbDiff denoiser backbone (method.md section 4), in one readable file.

Tokens are cells: a set of S cells is a sequence of S tokens with no positional encoding, so the
network is equivariant to permuting the cells of a set. Two streams run side by side, the noisy
perturbed set (with its self-conditioning estimate concatenated on the gene axis) and the matched
control set. Each block modulates both streams with its own adaLN-Zero (6 chunks), concatenates them
on the *feature* axis (token i carries perturbed cell i and control cell i, width 2d), runs one
multi-head self-attention with QK-RMSNorm over the S tokens, splits the result back, and adds it in
parallel with a per-stream MLP of the block input. A ReLU head returns the predicted clean set x0.

Parameters of the authors' model that never influence the output are not created (method.md 8.8):
the control stream's final layer, the last block's control MLP, control gates/MLP modulation and the
control half of its attention output projection, the unused 5120-d gene-embedding Linear, and the
control input columns that only ever multiply the always-zero self-conditioning slot. Config keys
`dropout`, `qk_norm`, `dit_input_size` of the authors had no effect and do not exist here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: the autocast dtype inside autocast."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _FewRowsLinear(torch.autograd.Function):
    """F.linear for inputs of a handful of rows (the per-set conditioning vector, [B, d], B ~ 1-8).

    Memory-bound: the cost is reading (and in backward, writing) the [N, d] weight. MKL's sgemm
    for x W^T with 2 rows runs 2-3x below bandwidth; W x^T (and rank-1 updates for the weight
    gradient) stream it. Same values as F.linear up to float summation order; autocast-aware.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        dt = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            x, w, b = x.to(dt), weight.to(dt), bias.to(dt)
            ctx.save_for_backward(x, w)
            ctx.dtypes = (dt, weight.dtype)
            return torch.addmm(b[:, None], w, x.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        dt, param_dt = ctx.dtypes
        grad = grad.to(dt)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ w
        if ctx.needs_input_grad[1]:
            if x.shape[0] <= 8:
                gw = torch.outer(grad[0], x[0])
                for i in range(1, x.shape[0]):
                    gw.addr_(grad[i], x[i])
            else:
                gw = grad.t() @ x
            gw = gw.to(param_dt)
        if ctx.needs_input_grad[2]:
            gb = grad.sum(0).to(param_dt)
        return gx, gw, gb


class FewRowsLinear(nn.Linear):
    """nn.Linear (same parameters and names) that takes the streaming path of `_FewRowsLinear` for
    inputs of at most 8 rows: the per-set conditioning (adaLN, timestep and covariate MLPs)."""

    max_rows = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None or x.dim() < 2 or x.numel() > self.max_rows * x.shape[-1]:
            return super().forward(x)
        out = _FewRowsLinear.apply(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def adaln(width: int, chunks: int) -> nn.Sequential:
    """adaLN modulation net SiLU -> Linear(d -> chunks * d); zero-initialised in `init_weights`."""
    return nn.Sequential(nn.SiLU(), FewRowsLinear(width, chunks * width))


class TimestepEmbedder(nn.Module):
    """Raw integer t -> sinusoidal features [cos | sin] (256, max period 10 000) -> MLP -> d."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(FewRowsLinear(freq_dim, width), nn.SiLU(), FewRowsLinear(width, width))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class JointAttention(nn.Module):
    """Self-attention over the S cell tokens of width 2d (both streams side by side), QK-RMSNorm.

    `out_dim` < width drops output features nobody reads (the control half in the last block).
    """

    def __init__(self, width: int, heads: int, out_dim: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"joint attention width {width} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(width, out_dim or width)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, s, w = u.shape
        q, k, v = self.qkv(u).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, s, w))


class CrossDiTBlock(nn.Module):
    """One MM-DiT block: per-stream adaLN-Zero, feature-concatenated joint attention, parallel MLP.

    In the last block (`last=True`) the control stream's output is never read, so only its
    pre-attention modulation (shift1, scale1) exists: no control MLP, gates or output half.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, last: bool = False):
        super().__init__()
        self.width, self.last = width, last
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)  # no parameters: shared
        self.attn = JointAttention(2 * width, heads, out_dim=width if last else 2 * width)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = adaln(width, 6)
        self.ctrl_mlp = None if last else Mlp(width, int(width * mlp_ratio))
        self.ctrl_adaLN_modulation = adaln(width, 2 if last else 6)

    def forward(self, h: torch.Tensor, hc: torch.Tensor, c: torch.Tensor):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        ctrl_mod = self.ctrl_adaLN_modulation(c).chunk(2 if self.last else 6, dim=-1)
        n, nc = self.norm(h), self.norm(hc)
        delta = self.attn(torch.cat([modulate(n, shift1, scale1), modulate(nc, ctrl_mod[0], ctrl_mod[1])], -1))
        # parallel residual: the MLP reads LN of the block input, not of the post-attention state
        h = h + gate1 * delta[..., : self.width] + gate2 * self.mlp(modulate(n, shift2, scale2))
        if self.last:
            return h, None
        _, _, cgate1, cshift2, cscale2, cgate2 = ctrl_mod
        hc = hc + cgate1 * delta[..., self.width:] + cgate2 * self.ctrl_mlp(modulate(nc, cshift2, cscale2))
        return h, hc


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear(d -> G) -> ReLU: predicted clean cells are non-negative."""

    def __init__(self, width: int, n_genes: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, n_genes)
        self.adaLN_modulation = adaln(width, 2)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return F.relu(self.linear(modulate(self.norm(h), shift, scale)))


class _SelfCondEmbed(torch.autograd.Function):
    """h = [x | sc] W^T + b without materialising the concatenation (sc None = the zero slot).

    Autograd through column slices of W would zero-fill a full-size [d, 2G] gradient per slice and
    add them (two 74 MB buffers at G = 18 080); here both halves are written into one buffer.
    Autocast-aware (computes in the autocast dtype, returns gradients in the parameter dtype).
    """

    @staticmethod
    def forward(ctx, x, sc, weight, bias):
        dt, g = _compute_dtype(x, weight), x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dt)
            x2 = x.reshape(-1, g).to(dt)
            out = torch.addmm(bias.to(dt), x2, w[:, :g].t())
            sc2 = None
            if sc is not None:
                sc2 = sc.reshape(-1, g).to(dt)
                out.addmm_(sc2, w[:, g:].t())
        ctx.save_for_backward(x2, sc2, w)
        ctx.shapes = (x.shape, None if sc is None else sc.shape, x.dtype, weight.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, sc2, w = ctx.saved_tensors
        x_shape, sc_shape, x_dtype, param_dtype = ctx.shapes
        g = x2.shape[-1]
        go = grad.reshape(-1, w.shape[0]).to(w.dtype)
        gx = gsc = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (go @ w[:, :g]).view(x_shape).to(x_dtype)
        if sc2 is not None and ctx.needs_input_grad[1]:
            gsc = (go @ w[:, g:]).view(sc_shape).to(x_dtype)
        if ctx.needs_input_grad[2]:
            gw = torch.empty(w.shape, dtype=param_dtype, device=w.device)
            if w.dtype == param_dtype:
                torch.mm(go.t(), x2, out=gw[:, :g])
            else:
                gw[:, :g] = go.t() @ x2
            if sc2 is None:
                gw[:, g:].zero_()
            elif w.dtype == param_dtype:
                torch.mm(go.t(), sc2, out=gw[:, g:])
            else:
                gw[:, g:] = go.t() @ sc2
        if ctx.needs_input_grad[3]:
            gb = go.sum(0).to(param_dtype)
        return gx, gsc, gw, gb


class CrossDiT(nn.Module):
    """Denoiser x0 = f(x_t, x0_selfcond, controls, t, covariate code).

    x_t, self_cond, ctrl: [B, S, G]; t: [B] integers; cov: [B, cov_dim] per-set covariate code
    (None = the learned null embedding used for classifier-free guidance) -> x0 [B, S, G].
    Covariates are constant within a set, so the conditioning vector c = e_t + e_y is [B, 1, d] and
    broadcasts over cells (the authors compute the same values per cell).
    """

    def __init__(self, n_genes: int, cov_dim: int, width: int = 512, depth: int = 8, heads: int = 8,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.n_genes, self.width = n_genes, width
        self.x_embedder = nn.Linear(2 * n_genes, width)  # [x_t | self-conditioning x0]
        self.ctrl_embedder = nn.Linear(n_genes, width)   # [c0 | 0]: the zero half is dropped
        self.null_emb = nn.Parameter(torch.zeros(width))  # authors' "gene embedding" term: a shared bias
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Sequential(nn.SiLU(), FewRowsLinear(cov_dim, width))
        self.y_null = nn.Parameter(torch.zeros(width))   # unconditional (CFG) covariate embedding
        self.blocks = nn.ModuleList(CrossDiTBlock(width, heads, mlp_ratio, last=i == depth - 1)
                                    for i in range(depth))
        self.final_layer = FinalLayer(width, n_genes)
        self.init_weights()

    def init_weights(self) -> None:
        """Authors' init: xavier Linears with zero bias, N(0, .02) timestep MLP, zero adaLN."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.y_null, std=0.02)  # not specified by the authors; DiT's null-class init
        for block in (*self.blocks, self.final_layer):
            for mod in (block.adaLN_modulation, getattr(block, "ctrl_adaLN_modulation", None)):
                if mod is not None:
                    nn.init.zeros_(mod[-1].weight)
                    nn.init.zeros_(mod[-1].bias)

    def embed_noisy(self, x_t: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        # Linear on [x_t | sc] without materialising the concatenation; a None estimate is all zeros
        return _SelfCondEmbed.apply(x_t, self_cond, self.x_embedder.weight, self.x_embedder.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ctrl: torch.Tensor,
                cov: torch.Tensor | None, self_cond: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.dim() != 3 or x_t.shape[-1] != self.n_genes or ctrl.shape != x_t.shape:
            raise ValueError(f"expected x_t and ctrl of shape [B, S, {self.n_genes}], got "
                             f"{tuple(x_t.shape)} and {tuple(ctrl.shape)}")
        h = self.embed_noisy(x_t, self_cond) + self.null_emb
        hc = self.ctrl_embedder(ctrl) + self.null_emb
        e_y = self.y_null.expand(x_t.shape[0], -1) if cov is None else self.y_embedder(cov)
        c = (self.t_embedder(t) + e_y)[:, None]
        for block in self.blocks:
            h, hc = block(h, hc, c)
        return self.final_layer(h, c)
