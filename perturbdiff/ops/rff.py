"""Random Fourier features: set embeddings, linear-time MMD and all-pairs distances between cell sets.

Bochner: a shift-invariant kernel is k(x - y) = E_w[cos(w . (x - y))] for w drawn from its spectral
density. With F frequencies (columns of W) the paired features z(x) = [cos(xW), sin(xW)] / sqrt(F)
give z(x) . z(y) = mean_f cos(w_f . (x - y)) -> k(x, y), and |z(x)|^2 = 1 exactly. Paired cos/sin
has strictly lower variance than the random-phase map for the Gaussian kernel (Sutherland &
Schneider, UAI 2015). A set then becomes one vector, its approximate kernel mean embedding, and the
MMD between two sets is a squared Euclidean distance: O(S G F) per set instead of O(S^2 G) per pair.

Every public function here reduces to one op (``reference_embed_sums`` states it exactly):

    rff_embed(x [B,S,G], w [B,S], center [B,G], freq [G,F]) -> [B, 2F]
    out[b] = sum_s w[b,s] * [cos((x[b,s] - center[b]) @ freq), sin((x[b,s] - center[b]) @ freq)]

i.e. raw weighted *sums* of the unscaled features. Backends: "torch" (this file, materialises
[B,S,F]), "cpu" and "cuda" (``perturbdiff._C``: tiles over cells, never stores [B,S,F]), "triton"
(``perturbdiff.kernels.rff``; on CPU tensors only under TRITON_INTERPRET=1 and only when asked for).
Centring changes each frequency's (cos, sin) pair by a rotation, so MMD values are unchanged by it;
it only keeps the phases small, which matters for fp32 accuracy on log-expression values.
"""

import functools
import importlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .. import _extension
from . import _backends, api

KINDS = ("orthogonal", "iid")
RFF_KERNELS = ("rbf", "laplacian", "imq")  # shift-invariant positive-definite kernels of api.mmd
_REFERENCE_CHUNK = 1 << 26  # cells x frequencies per embedding call in set_distances
_MAP_CACHE_SIZE = 8  # feature maps kept by rff_mmd / set_distances when none is passed


# ----------------------------------------------------------------------------------------------
# Frequencies and the feature map
# ----------------------------------------------------------------------------------------------

def draw_frequencies(n_genes: int, num_features: int, bandwidth=1.0, kind: str = "orthogonal",
                     seed: int = 0, kernel: str = "rbf") -> torch.Tensor:
    """The frequency matrix ``[n_genes, num_features * len(bandwidths)]`` (fp64, CPU).

    Each column is w = direction * radius / sigma. "iid": Gaussian columns. "orthogonal" (Yu et al.,
    NeurIPS 2016): blocks of up to ``n_genes`` exactly orthogonal directions with chi_G-distributed
    norms, so every column keeps the Gaussian marginal (unbiased) while the block's columns are
    negatively correlated (lower variance). The kernel enters through a per-frequency radial factor
    r: rbf exp(-D/2s^2): r = 1; laplacian exp(-|d|/s) (multivariate Cauchy): r = 1/|g|;
    imq (1 + D/s^2)^(-1/2) (Gaussian scale mixture over t ~ Gamma(1/2), sqrt(2t) = |g|): r = |g|,
    g ~ N(0, 1). One base draw serves every bandwidth (columns ordered bandwidth-major).
    Drawn on the CPU from ``seed`` so the same seed gives the same map on any device.
    """
    n_genes, num_features, bandwidths = _check_map_args(n_genes, num_features, bandwidth, kind, kernel)
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "iid":
        base = torch.randn(n_genes, num_features, generator=gen, dtype=torch.float64)
    else:
        blocks = []
        for start in range(0, num_features, n_genes):
            cols = min(n_genes, num_features - start)
            q, r = torch.linalg.qr(torch.randn(n_genes, cols, generator=gen, dtype=torch.float64))
            q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # Haar-distributed directions
            norms = torch.randn(n_genes, cols, generator=gen, dtype=torch.float64).norm(dim=0)
            blocks.append(q * norms)
        base = torch.cat(blocks, 1)
    if kernel != "rbf":
        g = torch.randn(num_features, generator=gen, dtype=torch.float64).abs()
        base = base / g if kernel == "laplacian" else base * g
    return torch.cat([base / s for s in bandwidths], 1)


class RFFMap(torch.nn.Module):
    """A random Fourier feature map with its frequencies drawn once (a buffer: saved with a model).

    n_genes: input dimension G. num_features: D, random frequencies per bandwidth; each gives a cos
    and a sin feature, so embeddings have ``2 * D * len(bandwidths)`` entries (``num_outputs``).
    bandwidth: sigma, or a list (the kernel is then the mean over sigmas, as in ``ops.mmd``).
    kind: "orthogonal" (lower variance) or "iid". kernel: "rbf", "laplacian" or "imq", same
    conventions as ``ops.mmd``. Calling the module returns the per-cell features (``rff_features``).
    """

    def __init__(self, n_genes: int, num_features: int = 1024, bandwidth=1.0, kind: str = "orthogonal",
                 seed: int = 0, kernel: str = "rbf", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.n_genes, self.num_features, bws = _check_map_args(n_genes, num_features, bandwidth, kind, kernel)
        self.bandwidths, self.kind, self.seed, self.kernel = tuple(bws), kind, int(seed), kernel
        freq = draw_frequencies(n_genes, num_features, bws, kind, seed, kernel)
        self.register_buffer("frequencies", freq.to(dtype=dtype, device=device))

    @property
    def num_outputs(self) -> int:
        return 2 * self.frequencies.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rff_features(x, self)

    def extra_repr(self) -> str:
        return (f"n_genes={self.n_genes}, num_features={self.num_features}, bandwidths={list(self.bandwidths)}, "
                f"kind={self.kind!r}, seed={self.seed}, kernel={self.kernel!r}")


def rff_features(x: torch.Tensor, feature_map: RFFMap) -> torch.Tensor:
    """Per-cell features ``[..., G] -> [..., 2F]`` with z(x) . z(y) ~ k(x, y) (materialised; use
    :func:`set_embedding` for set means, which never stores them)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_genes("x", x, feature_map)
    x = _compute_dtype(x)
    p = x @ _frequencies(feature_map, x)
    return torch.cat([torch.cos(p), torch.sin(p)], -1) * p.shape[-1] ** -0.5


# ----------------------------------------------------------------------------------------------
# Public set-level API
# ----------------------------------------------------------------------------------------------

def set_embedding(x: torch.Tensor, feature_map: RFFMap, x_weights=None, center=None,
                  backend: str = "auto") -> torch.Tensor:
    """Approximate kernel mean embedding of each set: the weighted mean of ``rff_features``.

    x: ``[n, G]`` (returns ``[2F]``) or ``[B, S, G]`` (returns ``[B, 2F]``); x_weights ``[n]`` /
    ``[B, S]`` (0 = padding). center: optional ``[G]`` or ``[B, G]`` subtracted first (a constant:
    distances between sets embedded with the same center do not depend on it). Differentiable in x.
    """
    (xb,), single = api._as_batches(("x", _compute_dtype(x)))
    _check_genes("x", xb, feature_map)
    w = api._weights("x_weights", x_weights, xb, single)
    ctr = _center_arg(center, xb)
    sums = embed_sums(xb, w, ctr, _frequencies(feature_map, xb), backend)
    emb = sums / w.sum(1, keepdim=True) * (sums.shape[1] // 2) ** -0.5
    return emb[0] if single else emb


def rff_mmd(x: torch.Tensor, y: torch.Tensor, feature_map: RFFMap | None = None, num_features: int = 1024,
            bandwidth=1.0, kernel: str = "rbf", kind: str = "orthogonal", estimator: str = "biased",
            x_weights=None, y_weights=None, seed: int = 0, backend: str = "auto", center: bool = True):
    """Linear-time MMD^2 estimate from random Fourier features (the training loss ``kernel="rff-rbf"``).

    Same shapes and weights as ``ops.mmd``: ``[n, G]``, ``[m, G]`` -> scalar, ``[B, S, G]`` batches
    -> ``[B]``. biased: |mu_x - mu_y|^2 (V-statistic; its expectation over frequencies is the exact
    biased MMD^2). unbiased: leaves out the self-pairs, whose feature products are exactly 1, so the
    expectation is the exact unbiased MMD^2. Without ``feature_map`` one is built from
    (num_features, bandwidth, kernel, kind, seed) and cached; bandwidth may be "median".
    Differentiable in x and y.
    """
    if estimator not in api.ESTIMATORS:
        raise ValueError(f"estimator must be one of {api.ESTIMATORS}, got {estimator!r}")
    (xb, yb), single = api._as_batches(("x", _compute_dtype(x)), ("y", _compute_dtype(y)))
    fmap = feature_map if feature_map is not None else _cached_map(
        xb.shape[-1], num_features, api._bandwidths(kernel, bandwidth, xb, yb), kind, seed, kernel, xb)
    _check_genes("x", xb, fmap)
    xw = api._weights("x_weights", x_weights, xb, single)
    yw = api._weights("y_weights", y_weights, yb, single)
    ctr = api._pooled_mean(xb, xw, yb, yw) if center else xb.new_zeros(xb.shape[0], xb.shape[2])
    freq = _frequencies(fmap, xb)
    sx, sy = embed_sums(xb, xw, ctr, freq, backend), embed_sums(yb, yw, ctr, freq, backend)
    out = _mmd_from_sums(sx.double(), xw.double(), sy.double(), yw.double(), estimator).to(xb.dtype)
    return out[0] if single else out


def set_distances(sets, method: str = "exact", kernel: str = "rbf", bandwidth=1.0, estimator: str = "biased",
                  weights=None, feature_map: RFFMap | None = None, num_features: int = 1024,
                  kind: str = "orthogonal", seed: int = 0, backend: str = "auto",
                  progress: bool = False) -> torch.Tensor:
    """All-pairs MMD^2 matrix ``[K, K]`` among K cell sets (zero diagonal).

    sets: a list of ``[S_k, G]`` tensors (sizes may differ) or a ``[K, S, G]`` batch; weights: a
    matching list of ``[S_k]`` or ``[K, S]`` (0 = padding). method "exact": through the kernel
    engine (``ops.mmd``'s backends): each set's self term is computed once (K of them) and only the
    K(K-1)/2 cross blocks are evaluated, each set against all later sets in one rectangular
    reduction. method "rff": embed every set once, then a Gram of the K x 2F embedding matrix.
    Exact entry (i, j) equals ``ops.mmd(sets[i], sets[j], ...)``; the RFF entry its estimate.
    """
    if method not in ("exact", "rff"):
        raise ValueError(f"method must be 'exact' or 'rff', got {method!r}")
    if estimator not in api.ESTIMATORS:
        raise ValueError(f"estimator must be one of {api.ESTIMATORS}, got {estimator!r}")
    xs, ws = _as_set_list(sets, weights)
    batch = _compute_dtype(sets) if isinstance(sets, torch.Tensor) else None
    pooled = batch.reshape(-1, batch.shape[-1]) if batch is not None else torch.cat(xs)
    pooled_w = torch.cat(ws)
    if estimator == "unbiased":
        _unbiased_denominators(ws)
    center = (pooled_w @ pooled / pooled_w.sum()).detach()[None]
    if method == "rff":
        fmap = feature_map if feature_map is not None else _cached_map(
            pooled.shape[1], num_features, api._bandwidths(kernel, bandwidth, _subsample(pooled), pooled[None, :0]),
            kind, seed, kernel, pooled)
        _check_genes("sets", pooled, fmap)
        return _rff_distances(xs, ws, batch, center, _frequencies(fmap, pooled), estimator, backend, progress)
    api._check_kernel(kernel)
    bw = api._bandwidths(kernel, bandwidth, _subsample(pooled), pooled[None, :0])
    return _exact_distances(xs, ws, pooled, center, kernel, bw, estimator, backend, progress)


# ----------------------------------------------------------------------------------------------
# The embedding op and its backends
# ----------------------------------------------------------------------------------------------

def reference_embed_sums(x, w, center, freq):
    """Pure-torch definition of rff_embed (see the module docstring). Materialises [B, S, F]."""
    p = (x - center[:, None, :]) @ freq
    return torch.cat([torch.einsum("bs,bsf->bf", w, torch.cos(p)),
                      torch.einsum("bs,bsf->bf", w, torch.sin(p))], 1)


def embed_sums(x, w, center, freq, backend: str = "auto"):
    """rff_embed through the chosen backend (validated inputs, ``[B, S, G]``)."""
    global _LAST
    _LAST, fn = _resolve(backend, x)
    return fn(x, w, center.to(x.dtype), freq)


def available_rff_backends(device=None) -> list[str]:
    """Backends that can run rff_embed here (auto picks the first that supports the tensor); with
    ``device``, only those that run tensors on it."""
    kind = None if device is None else torch.device(device).type
    return [b.name for b in _CANDIDATES if kind is None or b.device_type in (None, kind)]


def last_rff_backend() -> str | None:
    """Name of the backend that ran the most recent embedding (or exact ``set_distances``)."""
    return _LAST


_LAST = None


def _resolve(backend: str, x: torch.Tensor):
    cands = _CANDIDATES
    if backend == "auto":
        for b in cands:
            if b.name != "triton-interpreter" and b.supports(x):
                return b.name, b.ops[_OP]
        raise RuntimeError(f"no backend computes random Fourier features for {x.dtype} tensors on {x.device}")
    for b in cands:
        if backend == b.name or (backend == "triton" and b.name == "triton-interpreter"):
            if not b.supports(x):
                raise ValueError(f"backend {backend!r} does not run {x.dtype} tensors on {x.device.type}")
            return b.name, b.ops[_OP]
    raise ValueError(f"backend {backend!r} is not available for random Fourier features here; "
                     f"available: {[b.name.removesuffix('-interpreter') for b in cands]}")


def _candidates() -> tuple:
    """The backends of rff_embed (``_backends.Backend``: device and dtypes) in auto-priority order;
    built once at import (constant for torch.compile)."""
    def backend(name, device_type, fn, dtypes=(torch.float32, torch.float64)):
        return _backends.Backend(name, device_type, {_OP: fn}, dtypes=dtypes)

    from . import _triton  # where its kernels run: "cuda", "cpu" (TRITON_INTERPRET=1) or nowhere (None)

    cands = []
    triton_fn = _triton_embed() if _triton.DEVICE_TYPE else None
    if triton_fn is not None and _triton.DEVICE_TYPE == "cuda":
        cands.append(backend("triton", "cuda", triton_fn, (torch.float32,)))
    if _extension.has_kernel("rff_embed", "CUDA"):
        cands.append(backend("cuda", "cuda", torch.ops.perturbdiff.rff_embed))
    if _extension.has_kernel("rff_embed", "CPU"):
        cands.append(backend("cpu", "cpu", torch.ops.perturbdiff.rff_embed))
    cands.append(backend("torch", None, reference_embed_sums, _backends.ALL_FLOATS))
    if triton_fn is not None and _triton.DEVICE_TYPE == "cpu":
        cands.append(backend("triton-interpreter", "cpu", triton_fn, (torch.float32,)))
    return tuple(cands)


_OP = "rff_embed"


def _register_compiled_op() -> None:
    """Fake (shape) implementation and autograd for the C++ op, when the extension defines it."""
    if not _extension.has_kernel("rff_embed", "CPU"):
        return

    @torch.library.register_fake("perturbdiff::rff_embed")
    def _(x, w, center, freq):
        return x.new_empty(x.shape[0], 2 * freq.shape[1])

    @torch.library.register_fake("perturbdiff::rff_embed_backward")
    def _(grad, x, w, center, freq):
        return torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        x, w, center, freq = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable composite for higher-order grads
            return _reference_embed_grad(grad, x, w, center, freq), None, None, None
        return torch.ops.perturbdiff.rff_embed_backward(grad.contiguous(), x, w, center, freq), None, None, None

    torch.library.register_autograd("perturbdiff::rff_embed", backward, setup_context=setup)


def _reference_embed_grad(grad, x, w, center, freq):
    """d/dx of sum(grad * rff_embed(x, ...)) in torch ops (materialises [B, S, F])."""
    p = (x - center[:, None, :]) @ freq
    f = freq.shape[1]
    h = w[..., None] * (torch.cos(p) * grad[:, None, f:] - torch.sin(p) * grad[:, None, :f])
    return h @ freq.T


def _triton_embed():
    """The Triton op with its autograd, or None when its module does not import."""
    try:
        mod = _import_triton_kernels()
    except ImportError:
        return None
    op = mod.rff_embed

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        x, w, center, freq = ctx.saved_tensors
        h = mod.rff_embed_coeffs(grad.contiguous(), x, w, center, freq)
        return h @ freq.T, None, None, None  # one GEMM with the frequency matrix

    torch.library.register_autograd(op, backward, setup_context=setup)
    return op


def _import_triton_kernels():
    from . import _triton  # finds perturbdiff.kernels, also in an uninstalled checkout

    _triton._load_kernels()
    return importlib.import_module("perturbdiff.kernels.rff")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _mmd_from_sums(sx, xw, sy, yw, estimator):
    """MMD^2 from raw feature sums (fp64). Feature products are scaled by 1/F; |z(x)|^2 = 1."""
    f = sx.shape[1] // 2
    wx, wy = xw.sum(1), yw.sum(1)
    cross = (sx * sy).sum(1) / (f * wx * wy)
    if estimator == "biased":
        return (sx * sx).sum(1) / (f * wx**2) + (sy * sy).sum(1) / (f * wy**2) - 2 * cross
    return _unbiased_self(sx, xw) + _unbiased_self(sy, yw) - 2 * cross


def _unbiased_self(s, w):
    """sum_{i != j} w_i w_j z_i.z_j / (W^2 - sum w^2) from the feature sums s of each set: the
    diagonal of the product is sum w_i^2 |z_i|^2 = sum w_i^2. w: [B, S] or a list of [S_k]."""
    _, w2 = _weight_stats(w)
    return ((s * s).sum(1) / (s.shape[1] // 2) - w2) / _unbiased_denominators(w)


def _weight_stats(w):
    """(sum w, sum w^2) per set, for a [B, S] tensor or a list of [S_k] tensors."""
    if isinstance(w, torch.Tensor):
        return w.sum(1), (w * w).sum(1)
    return torch.stack([wk.sum() for wk in w]), torch.stack([(wk * wk).sum() for wk in w])


def _unbiased_denominators(w):
    """W^2 - sum w^2 per set; it must be positive."""
    tot, w2 = _weight_stats(w)
    denom = tot**2 - w2
    if not torch.compiler.is_compiling() and (denom <= 0).any():
        raise ValueError("the unbiased estimator needs at least two cells with non-zero weight in every set")
    return denom


def _rff_distances(xs, ws, batch, center, freq, estimator, backend, progress):
    if batch is None:  # ragged: one set per call
        groups = [(x[None], w[None]) for x, w in zip(xs, ws)]
    else:  # equal sizes: views of the batch, sized so the torch backend's [sets, S, F] stays bounded
        step = max(1, _REFERENCE_CHUNK // (batch.shape[1] * freq.shape[1]))
        wb = torch.stack(ws)
        groups = [(batch[i:i + step], wb[i:i + step]) for i in range(0, len(xs), step)]
    sums = torch.cat([embed_sums(x, w, center.expand(len(x), -1), freq, backend)
                      for x, w in tqdm(groups, desc="rff embeddings", disable=not progress)]).double()
    w = [wk.double() for wk in ws]
    tot, _ = _weight_stats(w)
    cross = sums @ sums.T / (sums.shape[1] // 2 * tot[:, None] * tot[None, :])
    self_terms = cross.diagonal() if estimator == "biased" else _unbiased_self(sums, w)
    return _assemble(self_terms, cross, xs[0].dtype)


def _exact_distances(xs, ws, pooled, center, kernel, bw, estimator, backend, progress):
    global _LAST
    unbiased = estimator == "unbiased"
    _, pairwise = _backends.resolve(backend, "pairwise_mmd", xs[0])
    _LAST, kme = _backends.resolve(backend, "kme", xs[0])
    tot = _weight_stats(ws)[0].double()
    # Self terms: the pair engine on (x_k, one dummy cell) with block coefficients (c_xx, 0, 0).
    self_terms = []
    for x, w in zip(xs, ws):
        coef = w.new_zeros(1, 3)
        coef[0, 0] = 1.0 / (w.sum() ** 2 - ((w * w).sum() if unbiased else 0.0))
        self_terms.append(pairwise(x[None], x[None, :1], w[None], w.new_zeros(1, 1), coef, center, kernel, bw,
                                   unbiased)[0])
    self_terms = torch.stack(self_terms).double()
    # Cross sums: set i against all later sets in one rectangular kernel-mean reduction.
    k = len(xs)
    cross = self_terms.new_zeros(k, k)
    sizes = torch.tensor([len(x) for x in xs])
    owner = torch.repeat_interleave(torch.arange(k), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    pooled_w = torch.cat(ws)
    for i in tqdm(range(k - 1), desc="exact cross terms", disable=not progress):
        rest = slice(int(starts[i + 1]), None)
        mu = kme(xs[i][None], ws[i][None], pooled[None, rest], center, kernel, bw)[0]
        row = torch.zeros(k, dtype=torch.float64).index_add_(0, owner[rest], (mu * pooled_w[rest]).double())
        cross[i, i + 1:] = row[i + 1:]
    cross = cross + cross.T
    cross = cross / (tot[:, None] * tot[None, :])
    return _assemble(self_terms, cross, xs[0].dtype)


def _assemble(self_terms, cross, dtype):
    d = self_terms[:, None] + self_terms[None, :] - 2 * cross
    return d.fill_diagonal_(0.0).to(dtype)


def _as_set_list(sets, weights):
    """Validated lists of [S_k, G] sets and [S_k] weights (same dtype and device)."""
    if isinstance(sets, torch.Tensor):  # one batch: validated at once
        if sets.dim() != 3 or sets.shape[0] < 2:
            raise ValueError("sets must be a [K >= 2, S, G] tensor or a list of [S_k, G] tensors, "
                             f"got shape {tuple(sets.shape)}")
        (batch,), _ = api._as_batches(("sets", _compute_dtype(sets)))
        return list(batch.unbind(0)), list(api._weights("weights", weights, batch, False).unbind(0))
    if not isinstance(sets, Sequence) or len(sets) < 2:
        raise ValueError("set_distances needs at least two sets")
    if weights is not None and (not isinstance(weights, Sequence) or len(weights) != len(sets)):
        raise ValueError(f"weights must hold one [S_k] tensor per set ({len(sets)} sets)")
    xs, ws = [], []
    for i, x in enumerate(sets):
        (xb,), _ = api._as_batches((f"sets[{i}]", x if not isinstance(x, torch.Tensor) else _compute_dtype(x)))
        if xb.dim() != 3 or xb.shape[0] != 1:
            raise ValueError(f"sets[{i}] must be a [cells, genes] tensor, got shape {tuple(x.shape)}")
        if xs and (xb.shape[-1] != xs[0].shape[-1] or xb.dtype != xs[0].dtype or xb.device != xs[0].device):
            raise ValueError(f"sets[{i}] has shape {tuple(x.shape)}, {xb.dtype} on {xb.device}; sets[0] has "
                             f"{tuple(xs[0].shape)}, {xs[0].dtype} on {xs[0].device}: genes, dtype and device "
                             "must match")
        ws.append(api._weights(f"weights[{i}]", None if weights is None else weights[i], xb, True)[0])
        xs.append(xb[0])
    return xs, ws


def _check_map_args(n_genes, num_features, bandwidth, kind, kernel):
    for name, v in (("n_genes", n_genes), ("num_features", num_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kernel not in RFF_KERNELS:
        hint = " (the energy distance has no random-feature map)" if kernel == "energy" else ""
        raise ValueError(f"random Fourier features support kernels {RFF_KERNELS}, got {kernel!r}{hint}")
    if isinstance(bandwidth, str):
        raise ValueError(f"a feature map needs numeric bandwidths, got {bandwidth!r} "
                         "(rff_mmd and set_distances resolve 'median' from the data)")
    return n_genes, num_features, api._bandwidths(kernel, bandwidth, None, None)


def _subsample(pooled):
    """[1, <=1024, G] evenly strided cells for the median heuristic (all sets represented)."""
    step = max(1, len(pooled) // api._MEDIAN_ROWS)
    return pooled[None, ::step]


def _cached_map(n_genes, num_features, bandwidths, kind, seed, kernel, like: torch.Tensor):
    """Drawing an orthogonal map costs a QR per call; the map is a pure function of its arguments,
    so it is kept per (arguments, dtype, device) and never copied to the device twice."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _cached_map_on(n_genes, num_features, tuple(bandwidths), kind, seed, kernel, like.dtype, like.device)


@functools.lru_cache(maxsize=_MAP_CACHE_SIZE)
def _cached_map_on(n_genes, num_features, bandwidths, kind, seed, kernel, dtype, device):
    return RFFMap(n_genes, num_features, list(bandwidths), kind, seed, kernel, dtype=dtype, device=device)


def _frequencies(fmap, x):
    return fmap.frequencies.to(device=x.device, dtype=x.dtype)


def _check_genes(name, x, fmap):
    if not isinstance(fmap, RFFMap):
        raise TypeError(f"feature_map must be an RFFMap, got {type(fmap).__name__}")
    if x.shape[-1] != fmap.frequencies.shape[0]:
        raise ValueError(f"{name} has {x.shape[-1]} genes but the feature map was drawn for "
                         f"{fmap.frequencies.shape[0]} genes (n_genes)")


def _compute_dtype(x):
    """Phases need at least fp32: half-precision inputs are computed (and returned) in fp32."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _center_arg(center, x):
    if center is None:
        return x.new_zeros(x.shape[0], x.shape[2])
    c = torch.as_tensor(center, dtype=x.dtype, device=x.device).detach()
    if c.shape == (x.shape[2],):
        c = c.expand(x.shape[0], -1)
    if c.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"center must have shape [{x.shape[2]}] or [{x.shape[0]}, {x.shape[2]}], got {tuple(c.shape)}")
    return c.contiguous()


_register_compiled_op()
_CANDIDATES = _candidates()
