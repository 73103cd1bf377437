"""The implementations measured side by side (kernels.md 5.1, anchors A0-A5 and ours).

Each is an ``Impl`` whose ``run()`` computes the case once and returns ``(value, grad_x)``
(``grad_x`` only for forward+backward cases; the GEMM roofs return ``(None, None)``). Peers compute
what a user would write without perturbdiff, in the same conventions as the perturbdiff op
(biased MMD^2, energy in geomloss's half convention, kme = mean kernel over the set), so their
errors against the fp64 reference are comparable.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from .cases import Case
from .oracle import evaluate

SQRT_CLAMP = 1e-8  # geomloss's clamp inside sqrt, which the energy loss convention follows


@dataclass
class Impl:
    name: str
    kind: str  # "roof" | "peer" | "perturbdiff"
    run: Callable | None  # None when it cannot run here (see skip)
    skip: str = ""


# ----------------------------------------------------------------------------------------------
# GEMM roofs: the same matrix products as the fused op, no epilogue
# ----------------------------------------------------------------------------------------------

def _roof(case: Case, x, y, freq, cast=None, tf32=False) -> Callable:
    if cast is not None:
        x, y, freq = x.to(cast), y.to(cast), None if freq is None else freq.to(cast)
    t = lambda a: a.transpose(-1, -2)  # noqa: E731

    def products():
        if case.op in ("energy", "mmd"):
            xx, xy, _ = x @ t(x), x @ t(y), y @ t(y)
            if case.backward:  # W_xx . X and W_xy . Y (the Gram buffers stand in for W)
                xx @ x, xy @ y
        elif case.op == "kme":
            xz = x @ t(y)
            if case.backward:
                xz @ y
        else:
            px, _ = x @ freq, y @ freq
            if case.backward:
                px @ t(freq)

    def run():
        if not tf32:
            products()
            return None, None
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            products()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return None, None

    return run


# ----------------------------------------------------------------------------------------------
# Peers: what a user would write instead
# ----------------------------------------------------------------------------------------------

def _kernel_of_sqdist(case: Case, d2, bws):
    if case.kernel == "energy":
        return -torch.sqrt(torch.clamp_min(d2, SQRT_CLAMP))
    return sum(torch.exp(d2 * (-0.5 / (s * s))) for s in bws) / len(bws)


def _assemble(case: Case, kxx, kxy, kyy):
    value = kxx.mean((-2, -1)) + kyy.mean((-2, -1)) - 2 * kxy.mean((-2, -1))
    return 0.5 * value if case.kernel == "energy" else value


def _naive(case: Case, bws, freq) -> Callable:
    """torch.cdist then the kernel: sqrt then square for RBF, one N^2 temporary per block."""
    if case.op == "rff":
        return lambda x, y: _rff_eager(x, y, freq)

    def k(a, b):
        dist = torch.cdist(a, b)
        if case.kernel == "energy":
            return -dist
        return _kernel_of_sqdist(case, dist.square(), bws)

    if case.op == "kme":
        return lambda x, z: k(x, z).mean(-2)
    return lambda x, y: _assemble(case, k(x, x), k(x, y), k(y, y))


def _sqdist_expand(a, b):
    """|a|^2 + |b|^2 - 2 a.b^T in one fused GEMM call (addmm/baddbmm), clamped at 0."""
    an = (a * a).sum(-1, keepdim=True)
    bn = (b * b).sum(-1).unsqueeze(-2)
    gemm = torch.addmm if a.dim() == 2 else torch.baddbmm
    return torch.clamp_min(gemm(an + bn, a, b.transpose(-1, -2), alpha=-2.0), 0.0)


def _expand(case: Case, bws, freq) -> Callable:
    """Norm expansion (Falkon / geomloss tensorized style): GEMM + clamp + kernel per block."""
    if case.op == "rff":
        return lambda x, y: _rff_eager(x, y, freq)

    def k(a, b):
        return _kernel_of_sqdist(case, _sqdist_expand(a, b), bws)

    if case.op == "kme":
        return lambda x, z: k(x, z).mean(-2)
    return lambda x, y: _assemble(case, k(x, x), k(x, y), k(y, y))


def _rff_eager(x, y, freq):
    """|mean z(x) - mean z(y)|^2 with paired cos/sin features, as plain torch."""
    def embed(a):
        p = a @ freq
        return torch.cat([torch.cos(p), torch.sin(p)], -1).mean(-2) * p.shape[-1] ** -0.5

    return (embed(x) - embed(y)).square().sum(-1)


def _geomloss(case: Case, bws) -> Callable:
    from geomloss import SamplesLoss

    if case.kernel == "energy":
        loss = SamplesLoss("energy", backend="tensorized")
        return lambda x, y: loss(x, y)
    # geomloss's gaussian loss is half the biased MMD^2 of one bandwidth: sum one loss per sigma
    losses = [SamplesLoss("gaussian", blur=s, backend="tensorized") for s in bws]
    return lambda x, y: sum(loss(x, y) for loss in losses) * (2.0 / len(losses))


def _pykeops(case: Case, bws) -> Callable:
    from pykeops.torch import LazyTensor

    def k(a, b):
        d2 = ((LazyTensor(a.unsqueeze(-2)) - LazyTensor(b.unsqueeze(-3))) ** 2).sum(-1)
        if case.kernel == "energy":
            return -((d2 + SQRT_CLAMP).sqrt())  # LazyTensor has no clamp: a softened sqrt
        return sum((-d2 * (0.5 / (s * s))).exp() for s in bws) / len(bws)

    # LazyTensor reductions count dims after the batch dims: i (rows) = a.dim() - 2, j = a.dim() - 1
    def mean(a, b):
        return k(a, b).sum(dim=a.dim() - 1).sum((-2, -1)) / (a.shape[-2] * b.shape[-2])

    if case.op == "kme":
        return lambda x, z: k(x, z).sum(dim=x.dim() - 2).squeeze(-1) / x.shape[-2]

    def fwd(x, y):
        v = mean(x, x) + mean(y, y) - 2 * mean(x, y)
        return 0.5 * v if case.kernel == "energy" else v

    return fwd


# ----------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------

def _with_grad(case: Case, fwd: Callable, x, y) -> Callable:
    """run() -> (value, dL/dx of sum(value)); no autograd graph for forward-only cases."""
    if not case.backward:
        def run():
            with torch.no_grad():
                return fwd(x, y), None
        return run
    xg = x.detach().requires_grad_()

    def run():
        value = fwd(xg, y)
        return value.detach(), torch.autograd.grad(value.sum(), xg)[0]

    return run


def _perturbdiff_backends(case: Case, device: torch.device) -> list[str]:
    """The backends that run the case's op on ``device``."""
    if case.op == "rff":
        from ..ops import rff

        return [b.removesuffix("-interpreter") for b in rff.available_rff_backends(device)]
    return ops.available_backends(device)


PEERS = ("torch-naive", "torch-expand", "torch-compile", "geomloss", "pykeops")


def known_names() -> list[str]:
    """Names accepted by ``implementations(names=...)`` in this process."""
    from ..ops import rff

    backends = set(ops.available_backends()) | {b.removesuffix("-interpreter") for b in rff.available_rff_backends()}
    return list(PEERS) + [f"perturbdiff[{b}]" for b in sorted(backends)]


def implementations(case: Case, x, y, bws, feature_map=None, names=None) -> list[Impl]:
    """Every implementation of ``case`` for inputs on ``x.device`` (filtered by ``names``)."""
    freq = None if feature_map is None else feature_map.frequencies.to(x.device, x.dtype)
    on_gpu = x.device.type == "cuda"
    impls = [Impl("gemm-roof", "roof", _roof(case, x, y, freq))]
    if on_gpu:  # tensor-core roofs: what TF32 / bf16 GEMMs reach on the same products
        impls += [Impl("gemm-roof-tf32", "roof", _roof(case, x, y, freq, tf32=True)),
                  Impl("gemm-roof-bf16", "roof", _roof(case, x, y, freq, cast=torch.bfloat16))]

    pairwise = case.op in ("energy", "mmd")
    peers = {
        "torch-naive": lambda: _naive(case, bws, freq),
        "torch-expand": (lambda: _expand(case, bws, freq)) if case.op != "rff" else None,
        "torch-compile": lambda: torch.compile(_expand(case, bws, freq), dynamic=False),
        "geomloss": (lambda: _geomloss(case, bws)) if pairwise else None,
        "pykeops": (lambda: _pykeops(case, bws)) if case.op != "rff" else None,
    }
    wanted = lambda name: not names or name in names  # noqa: E731  (the roofs always run)
    for name, build in peers.items():
        if build is None or not wanted(name):
            continue
        module = {"geomloss": "geomloss", "pykeops": "pykeops"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            impls.append(Impl(name, "peer", None, skip=f"{module} is not installed"))
            continue
        impls.append(Impl(name, "peer", _with_grad(case, build(), x, y)))

    for backend in _perturbdiff_backends(case, x.device):
        name = f"perturbdiff[{backend}]"
        if not wanted(name):
            continue
        if backend == "triton" and not on_gpu:
            impls.append(Impl(name, "perturbdiff", None, skip="Triton on CPU is the interpreter: never timed"))
            continue

        def fwd(a, b, backend=backend):
            return evaluate(case, a, b, bws, backend=backend, feature_map=feature_map)

        impls.append(Impl(name, "perturbdiff", _with_grad(case, fwd, x, y)))
    return impls
