"""pytest-benchmark suite over every public op and backend (issue 5).

Full run (long; one documented command):
    PYTHONPATH=. python -m pytest benchmarks --benchmark-only --benchmark-columns=median,ops,rounds
Quick mode, tiny shapes, seconds (the test suite runs it so the benchmarks cannot rot):
    PERTURBDIFF_BENCH_QUICK=1 PYTHONPATH=. python -m pytest benchmarks --benchmark-disable
PERTURBDIFF_BENCH_THREADS=N sets torch's thread count (default: torch's own).
"""

import functools
import os

import pytest
import torch

from perturbdiff import ops
from perturbdiff.benchmark.cases import Case, make_inputs

QUICK = os.environ.get("PERTURBDIFF_BENCH_QUICK") == "1"
if os.environ.get("PERTURBDIFF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PERTURBDIFF_BENCH_THREADS"]))

# [B, S, G] training shapes and single large pairs (n = m), kernels.md 5.1 / issue 5.
BATCH_SHAPES = [(2, 8, 16), (2, 16, 40)] if QUICK else [(8, s, g) for s in (64, 256, 1024) for g in (2000, 18080)]
PAIR_SHAPES = [(48, 24)] if QUICK else [(1024, 2000), (8192, 2000)]
RFF_FEATURES = 16 if QUICK else 1024
# training step: ((B, S, G), (width, depth, heads)), bench_train_step's shapes
TRAIN_SHAPES = [((2, 8, 16), (32, 1, 2))] if QUICK else [((2, 64, 2000), (512, 8, 8)), ((1, 64, 18080), (512, 8, 8))]
ROUNDS = 5


def pairwise_backends() -> list[str]:
    """Timed backends: those that run on the benchmark device; Triton on a CPU tensor is the
    interpreter, never timed."""
    dev = _device()
    return [b for b in ops.available_backends(dev) if b != "triton" or dev.type == "cuda"]


def rff_backends() -> list[str]:
    from perturbdiff.ops import rff

    return [b for b in rff.available_rff_backends(_device()) if b != "triton-interpreter"]


def pytest_generate_tests(metafunc):
    """The grid: tests name the axes they need as arguments."""
    axes = {
        "batch_shape": (BATCH_SHAPES, lambda s: "B{}xS{}xG{}".format(*s)),
        "pair_shape": (PAIR_SHAPES, lambda s: "n=m={}xG{}".format(*s)),
        "backend": (pairwise_backends(), str),
        "rff_backend": (rff_backends(), str),
        "direction": (["fwd", "fwd+bwd"], str),
        "train_shape": (TRAIN_SHAPES, lambda s: "B{}xS{}xG{}-width{}xdepth{}".format(*s[0], *s[1][:2])),
    }
    for name, (values, ids) in axes.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[ids(v) for v in values])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def _inputs(op: str, B: int, n: int, m: int, G: int, kernel: str, n_bandwidths: int) -> dict:
    data = make_inputs(Case(op, B, n, m, G, kernel=kernel, n_bandwidths=n_bandwidths,
                            features=RFF_FEATURES if op == "rff" else 0))
    dev = _device()
    return {"x": data["x"].to(dev), "y": data["y"].to(dev), "bandwidths": data["bandwidths"]}


@pytest.fixture
def make_case_inputs():
    """make_case_inputs(op, B, n, m, G, kernel="energy", n_bandwidths=1) -> {"x", "y", "bandwidths"}:
    perturbdiff.benchmark's synthetic log-expression on the benchmark device, cached per shape."""
    return lambda op, B, n, m, G, kernel="energy", n_bandwidths=1: _inputs(op, B, n, m, G, kernel, n_bandwidths)


@pytest.fixture(scope="session")
def quick() -> bool:
    return QUICK


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.fixture
def measure(benchmark):
    """measure(fn, direction="fwd", x=None): time fn (synchronised on GPU) and return the last
    result, checked finite. "fwd": fn(x) (or fn()) under no_grad; "fwd+bwd": fn(x_with_grad) is
    differentiated w.r.t. x (the predicted set, as in training), the result is (value, grad);
    "call": fn() as it is (it runs its own backward). Under --benchmark-disable it runs once."""
    def run(fn, direction="fwd", x=None):
        def call():
            if direction == "call":
                out = (fn(),)
            elif direction == "fwd":
                with torch.no_grad():
                    out = (fn(x) if x is not None else fn(),)
            else:
                xg = x.detach().requires_grad_()
                value = fn(xg)
                out = (value.detach(), torch.autograd.grad(value.sum(), xg)[0])
            _sync()
            return out
        out = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        for t in out:
            assert torch.isfinite(t).all(), "non-finite benchmark result"
        return out
    return run


@functools.lru_cache(maxsize=4)
def _feature_map(G: int, bandwidths: tuple):
    from perturbdiff.ops.rff import RFFMap

    return RFFMap(G, RFF_FEATURES, list(bandwidths), seed=0).to(_device())


@pytest.fixture
def make_feature_map():
    """make_feature_map(G, bandwidths) -> RFFMap with RFF_FEATURES orthogonal frequencies, cached."""
    return lambda G, bandwidths: _feature_map(G, tuple(bandwidths))
