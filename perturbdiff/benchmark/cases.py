"""What the side-by-side benchmark measures (kernels.md 5.1) and the inputs it measures on."""

from dataclasses import asdict, dataclass

import torch

OPS = ("energy", "mmd", "kme", "rff")
# Multi-bandwidth RBF: a x2 ladder around the median heuristic. The CellOT gamma list
# {2, 1, 0.5, 0.1, 0.01, 0.005} would underflow to exp(-D) = 0 for every off-diagonal pair at these
# distances (kernels.md 2.5.4): same cost, but the error column would compare zeros.
_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``B == 0`` means a single pair of sets ``[n, G]``, ``[m, G]``;
    otherwise batches ``[B, n, G]``, ``[B, m, G]``. For kme, m is the number of query cells; for
    rff, ``features`` is the number of frequencies D'. ``backward``: forward + gradient w.r.t. x
    (the predicted set) only, as in training. ``sweeps``: the plot families it belongs to."""

    op: str
    B: int
    n: int
    m: int
    G: int
    kernel: str = "energy"
    n_bandwidths: int = 1
    backward: bool = False
    features: int = 0
    sweeps: tuple = ()

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if min(self.n, self.m, self.G) < 1 or self.B < 0:
            raise ValueError(f"bad shape in {self}")
        if (self.op == "energy") != (self.kernel == "energy"):
            raise ValueError(f"op {self.op!r} cannot use kernel {self.kernel!r}")
        if self.op == "rff" and self.features < 1:
            raise ValueError("an rff case needs features >= 1")

    @property
    def sets(self) -> int:
        return max(self.B, 1)

    @property
    def label(self) -> str:
        shape = f"n=m={self.n},G={self.G}" if self.B == 0 and self.n == self.m else (
            f"n={self.n},m={self.m},G={self.G}" if self.B == 0 else f"B={self.B},S={self.n},G={self.G}")
        kern = "" if self.kernel == "energy" else f" {self.kernel}x{self.n_bandwidths}"
        feats = f" D'={self.features}" if self.op == "rff" else ""
        direction = "fwd+bwd" if self.backward else "fwd"
        return f"{self.op}{kern}{feats} {direction} [{shape}]"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{**d, "sweeps": tuple(d.get("sweeps", ()))})


def _sweep_cases(B, S_values, G_values, S_fixed, G_fixed, **kw) -> list[Case]:
    """Cases of one op over S at G_fixed and over G at S_fixed (the shared point appears once)."""
    out = {}
    for S in S_values:
        out[(S, G_fixed)] = {"S"}
    for G in G_values:
        out.setdefault((S_fixed, G), set()).add("G")
    return [Case(B=B, n=S, m=S, G=G, sweeps=tuple(sorted(tags)), **kw) for (S, G), tags in out.items()]


def full_cases() -> list[Case]:
    """The matrix of kernels.md 5.1 at the sizes issues 3-5 name, the issues' targets first (a run
    cut short by --time-limit still has them)."""
    sweeps = _sweep_cases(8, (64, 256, 1024), (500, 2000, 8000, 18080), 256, 2000, op="energy", backward=True)
    targets = [(256, 2000), (256, 18080)]
    first = sorted((c for c in sweeps if (c.n, c.G) in targets), key=lambda c: c.G)
    return first + [
        Case("energy", 0, 8192, 8192, 2000),
        Case("mmd", 8, 256, 256, 2000, kernel="rbf", n_bandwidths=1, backward=True),
        Case("mmd", 8, 256, 256, 2000, kernel="rbf", n_bandwidths=6, backward=True),
        Case("rff", 0, 8192, 8192, 2000, kernel="rbf", features=1024),
        Case("kme", 8, 256, 256, 2000, kernel="rbf", backward=True),
        *(c for c in sweeps if (c.n, c.G) not in targets),
        Case("mmd", 8, 256, 256, 18080, kernel="rbf", n_bandwidths=6, backward=True),
        Case("energy", 8, 256, 256, 2000),
        Case("energy", 8, 256, 256, 18080),
        Case("kme", 0, 8192, 1024, 2000, kernel="rbf"),
        Case("rff", 8, 256, 256, 2000, kernel="rbf", features=1024, backward=True),
    ]


def quick_cases() -> list[Case]:
    """Tiny shapes with the same structure (sweeps, every op, both directions): seconds in total."""
    cases = _sweep_cases(2, (16, 48), (24, 96), 16, 24, op="energy", backward=True)
    cases += [
        Case("mmd", 2, 16, 16, 24, kernel="rbf", n_bandwidths=6, backward=True),
        Case("energy", 0, 96, 80, 32),
        Case("kme", 2, 16, 8, 24, kernel="rbf", backward=True),
        Case("rff", 0, 64, 64, 24, kernel="rbf", features=32),
    ]
    return cases


def select(cases: list[Case], op: str) -> list[Case]:
    if op == "all":
        return cases
    if op not in OPS:
        raise ValueError(f"--op must be one of {OPS + ('all',)}, got {op!r}")
    return [c for c in cases if c.op == op]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """log1p(Poisson) expression / 10 (the scale the model sees), float32 on CPU.

    Per-gene rates are log-normal (kernels.md 2.5's synthetic set); y shifts 10 % of the genes so
    the MMD is a real effect, not noise. Returns x, y ([n|m, G] or [B, n|m, G]) and the bandwidths.
    """
    g = torch.Generator().manual_seed(seed)
    rate = torch.exp(torch.randn(case.G, generator=g) * 1.5 - 1.0)
    shift = torch.where(torch.rand(case.G, generator=g) < 0.1, torch.exp(torch.randn(case.G, generator=g) * 0.5),
                        torch.ones(case.G))

    def cells(count, rates):
        shape = (case.B, count, case.G) if case.B else (count, case.G)
        return torch.log1p(torch.poisson(rates.expand(shape).contiguous(), generator=g)) / 10.0

    x, y = cells(case.n, rate), cells(case.m, rate * shift)
    return {"x": x, "y": y, "bandwidths": bandwidths(case, x, y)}


def bandwidths(case: Case, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """sigma ladder around the median heuristic (2 sigma^2 = median squared distance)."""
    if case.kernel == "energy":
        return []
    z = torch.cat([x.reshape(-1, case.G)[:256], y.reshape(-1, case.G)[:256]]).double()
    d = torch.cdist(z, z).square()
    med = d[torch.triu_indices(len(z), len(z), 1).unbind()].median().item()
    sigma = (med / 2) ** 0.5 if med > 0 else 1.0  # all cells identical (tiny test shapes)
    ladder = (1.0,) if case.n_bandwidths == 1 else _LADDER[: case.n_bandwidths]
    if len(ladder) != case.n_bandwidths:
        raise ValueError(f"n_bandwidths must be 1..{len(_LADDER)}, got {case.n_bandwidths}")
    return [sigma * f for f in ladder]
