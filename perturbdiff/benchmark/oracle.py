"""fp64 reference results for a case: the value (and the gradient w.r.t. x) every implementation's
error is measured against. Small cases run the pure-torch reference backend in fp64 under autograd;
single large pairs (whose (n+m)^2 Gram would not fit) are summed block by block in fp64."""

import torch

from .. import ops
from ..ops import reference
from .cases import Case

# Beyond this many fp64 Gram entries per set, sum by blocks instead of materialising.
_MATERIALISE_LIMIT = 4096 * 4096
_BLOCK = 2048


def reference_result(case: Case, inputs: dict, feature_map=None, device="cpu") -> dict:
    """{"value": fp64 tensor (scalar or [B]), "grad": fp64 dL/dx of sum(value) or None, "method"}."""
    x = inputs["x"].to(device, torch.float64).requires_grad_(case.backward)
    y = inputs["y"].to(device, torch.float64)
    if case.op in ("energy", "mmd") and (case.n + case.m) ** 2 > _MATERIALISE_LIMIT:
        if case.backward:
            raise ValueError(f"{case.label}: no fp64 reference gradient for sets this large")
        return {"value": _blockwise_mmd(case, x.detach(), y, inputs["bandwidths"]).cpu(), "grad": None,
                "method": "fp64, summed by blocks"}
    with torch.enable_grad():
        value = evaluate(case, x, y, inputs["bandwidths"], backend="torch", feature_map=feature_map)
        grad = torch.autograd.grad(value.sum(), x)[0] if case.backward else None
    return {"value": value.detach().cpu(), "grad": None if grad is None else grad.cpu(),
            "method": "fp64, pure-torch backend"}


def evaluate(case: Case, x, y, bandwidths, backend: str, feature_map=None):
    """The case's quantity through the public perturbdiff API on one backend."""
    if case.op == "energy":
        return ops.energy_distance(x, y, convention="half", backend=backend)
    if case.op == "mmd":
        return ops.mmd(x, y, kernel=case.kernel, bandwidth=bandwidths, backend=backend)
    if case.op == "kme":
        return ops.kme(x, y, kernel=case.kernel, bandwidth=bandwidths, backend=backend)
    from ..ops import rff

    fmap = feature_map.to(dtype=x.dtype, device=x.device)
    return rff.rff_mmd(x, y, feature_map=fmap, backend=backend)


def _blockwise_mmd(case: Case, x, y, bandwidths) -> torch.Tensor:
    """Biased MMD^2 (energy: half convention) of one large pair, never holding more than a
    _BLOCK x _BLOCK tile; same centring, clamps and self-pair convention as the reference."""
    kernel = case.kernel
    bws = bandwidths or [1.0]
    center = torch.cat([x, y]).mean(0)
    x, y = x - center, y - center

    def block_sum(a, b, same):
        total = torch.zeros((), dtype=torch.float64, device=a.device)
        for i in range(0, len(a), _BLOCK):
            for j in range(i if same else 0, len(b), _BLOCK):
                diag = same and i == j
                d = reference.sqdist(a[i:i + _BLOCK], b[j:j + _BLOCK], same=diag)
                s = reference.radial(kernel, d, bws).sum()
                total += s if (diag or not same) else 2 * s  # off-diagonal tiles of a symmetric block
        return total

    n, m = len(x), len(y)
    value = block_sum(x, x, True) / n**2 + block_sum(y, y, True) / m**2 - 2 * block_sum(x, y, False) / (n * m)
    return 0.5 * value if kernel == "energy" else value
