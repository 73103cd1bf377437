"""Algorithmic FLOP counts (kernels.md 2.6): one fixed formula per case, shared by every
implementation, so GFLOP/s compare like with like. Implementations that skip symmetric tiles do
fewer real FLOPs and show above-roof "naive-equivalent" rates, which is intended and visible."""

from .cases import Case


def forward_flops(c: Case) -> int:
    if c.op in ("energy", "mmd"):  # X.X^T, X.Y^T, Y.Y^T
        per_set = 2 * c.G * (c.n * c.n + c.m * c.m + c.n * c.m)
    elif c.op == "kme":  # X.Z^T, Z = the m query cells
        per_set = 2 * c.G * c.n * c.m
    else:  # rff: [X; Y] . W^T with W [D', G]
        per_set = 2 * (c.n + c.m) * c.G * c.features
    return c.sets * per_set


def backward_flops(c: Case) -> int:
    """Gradient w.r.t. x only (the predicted set): the products that give dL/dX."""
    if not c.backward:
        return 0
    if c.op in ("energy", "mmd"):  # W_xx . X and W_xy . Y: [n, n+m] x [n+m, G]
        per_set = 2 * c.G * c.n * (c.n + c.m)
    elif c.op == "kme":  # W . Z: [n, Q] x [Q, G]
        per_set = 2 * c.G * c.n * c.m
    else:  # rff: [n, D'] x [D', G]
        per_set = 2 * c.n * c.G * c.features
    return c.sets * per_set


def total_flops(c: Case) -> int:
    return forward_flops(c) + backward_flops(c)


def epilogue_evaluations(c: Case) -> int:
    """Kernel-function evaluations (exp / sqrt / sin+cos), reported apart from the GEMM FLOPs."""
    if c.op in ("energy", "mmd"):
        pairs = c.n * c.n + c.m * c.m + c.n * c.m
    elif c.op == "kme":
        pairs = c.n * c.m
    else:
        return c.sets * (c.n + c.m) * c.features
    return c.sets * pairs * max(c.n_bandwidths if c.kernel != "energy" else 1, 1)
