"""The public ops API and the pure-torch reference, against brute-force fp64 definitions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perturbdiff import ops
from perturbdiff.ops import reference


def brute_mmd(x, y, kernel, sigmas, unbiased=False, xw=None, yw=None):
    """Direct-difference definition of (weighted) MMD^2, fp64, no norm expansion, no vectorisation tricks."""
    x, y = x.double(), y.double()
    xw = torch.ones(len(x), dtype=torch.float64) if xw is None else xw.double()
    yw = torch.ones(len(y), dtype=torch.float64) if yw is None else yw.double()

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        if kernel == "energy":
            return -math.sqrt(max(d2, 1e-8))
        vals = {"rbf": [math.exp(-d2 / (2 * s * s)) for s in sigmas],
                "laplacian": [math.exp(-math.sqrt(max(d2, 1e-8)) / s) for s in sigmas],
                "imq": [1 / math.sqrt(1 + d2 / (s * s)) for s in sigmas]}[kernel]
        return sum(vals) / len(vals)

    def block(a, aw, b, bw, same):
        tot = norm = 0.0
        for i in range(len(a)):
            for j in range(len(b)):
                if same and unbiased and i == j:
                    continue
                tot += float(aw[i] * bw[j]) * k(a[i], b[j])
                norm += float(aw[i] * bw[j])
        return tot / norm

    return block(x, xw, x, xw, True) + block(y, yw, y, yw, True) - 2 * block(x, xw, y, yw, False)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), m=st.integers(2, 7), g=st.integers(1, 6),
       kernel=st.sampled_from(reference.KERNELS), unbiased=st.booleans(),
       offset=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 2**16))
def test_reference_matches_brute_force(n, m, g, kernel, unbiased, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, generator=gen, dtype=torch.float64) + offset
    y = torch.randn(m, g, generator=gen, dtype=torch.float64) * 1.5 + offset + 0.3
    xw = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    sig = [0.7, 2.0]
    got = ops.mmd(x, y, kernel, sig, "unbiased" if unbiased else "biased", x_weights=xw, backend="torch")
    want = brute_mmd(x, y, kernel, sig, unbiased, xw=xw)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_energy_half_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    x = torch.randn(4, 30, 12, dtype=torch.float64) + 3
    y = torch.randn(4, 25, 12, dtype=torch.float64) + 3.2
    want = geomloss.SamplesLoss("energy", backend="tensorized")(x, y)
    torch.testing.assert_close(ops.energy_distance(x, y, backend="torch"), want, rtol=1e-10, atol=1e-12)
    full = ops.energy_distance(x, y, convention="full", backend="torch")
    torch.testing.assert_close(full, 2 * want)
    gauss = geomloss.SamplesLoss("gaussian", blur=1.5, backend="tensorized")(x, y)
    torch.testing.assert_close(ops.mmd(x, y, "rbf", 1.5, backend="torch"), 2 * gauss)


def test_zero_weights_equal_dropping_cells():
    x, y = torch.randn(2, 10, 5, dtype=torch.float64), torch.randn(2, 8, 5, dtype=torch.float64)
    w = torch.ones(2, 10, dtype=torch.float64)
    w[:, 7:] = 0
    for est in ("biased", "unbiased"):
        padded = ops.mmd(x, y, "imq", 1.0, est, x_weights=w, backend="torch")
        dropped = ops.mmd(x[:, :7], y, "imq", 1.0, est, backend="torch")
        torch.testing.assert_close(padded, dropped)


def test_single_pair_and_batch_agree_and_gradients_flow():
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    batch = ops.mmd(x, y, "rbf", "median", backend="torch")
    single = ops.mmd(x[1], y[1], "rbf", [ops.api._median_bandwidth(x.detach(), y.detach())], backend="torch")
    torch.testing.assert_close(batch[1], single)
    assert torch.autograd.gradcheck(lambda a, b: ops.energy_distance(a, b, backend="torch"), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: ops.kme(a, b, "laplacian", 2.0, backend="torch"), (x, y))


def test_kme_and_witness():
    x, z = torch.randn(9, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    want = torch.tensor([sum(math.exp(-float(((xi - zq) ** 2).sum()) / 2) for xi in x) / 9 for zq in z])
    torch.testing.assert_close(ops.kme(x, z, "rbf", 1.0, backend="torch"), want.double())
    y = torch.randn(7, 3, dtype=torch.float64)
    w = ops.witness(x, y, z, "rbf", 1.0, backend="torch")
    torch.testing.assert_close(w, ops.kme(x, z, backend="torch") - ops.kme(y, z, backend="torch"))
    # MMD^2 is the witness' norm: mean witness over x minus over y
    mm = ops.witness(x, y, x, backend="torch").mean() - ops.witness(x, y, y, backend="torch").mean()
    torch.testing.assert_close(mm, ops.mmd(x, y, "rbf", 1.0, backend="torch"))


def test_loss_module():
    x, y = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    loss = ops.MMDLoss()(x, y)
    torch.testing.assert_close(loss, ops.energy_distance(x, y).mean())
    assert "energy" in repr(ops.MMDLoss())


@pytest.mark.parametrize("call, match", [
    (lambda x, y: ops.mmd(x, y[:, :-1]), "gene counts differ"),
    (lambda x, y: ops.mmd(x[:0], y), "empty set"),
    (lambda x, y: ops.mmd(x.masked_fill(x > 1, float("nan")), y), "NaN or Inf"),
    (lambda x, y: ops.mmd(x.long(), y.long()), "floating-point"),
    (lambda x, y: ops.mmd(x, y, bandwidth=0.0), "positive"),
    (lambda x, y: ops.mmd(x, y, bandwidth=[1.0, -2.0]), "positive"),
    (lambda x, y: ops.mmd(x, y, x_weights=torch.zeros(len(x))), "all zero"),
    (lambda x, y: ops.mmd(x, y, x_weights=torch.ones(3)), "x_weights must have shape"),
    (lambda x, y: ops.mmd(x, y, kernel="cosine"), "unknown kernel"),
    (lambda x, y: ops.mmd(x, y, estimator="v"), "estimator"),
    (lambda x, y: ops.mmd(x, y[None]), "both be single sets or both batches"),
    (lambda x, y: ops.mmd(x, y, backend="nope"), "not available"),
    (lambda x, y: ops.mmd(x[:1], y, estimator="unbiased"), "at least two cells"),
    (lambda x, y: ops.energy_distance(x, y, convention="third"), "convention"),
])
def test_bad_input_is_named(call, match):
    x, y = torch.randn(5, 4), torch.randn(6, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, y)


def test_non_contiguous_inputs():
    x = torch.randn(4, 7, 5, dtype=torch.float64).transpose(0, 1)[:, :3]  # [7, 3, 5] strided
    y = torch.randn(7, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.mmd(x, y, backend="torch"), ops.mmd(x.contiguous(), y, backend="torch"))


def test_backends_listed_per_device():
    """The backends that run tensors on a device, in auto's order (benchmarks and tests pick their
    parametrisations from these)."""
    from perturbdiff.ops import available_backends, rff

    everywhere = available_backends()
    on_cpu = available_backends("cpu")
    assert "torch" in on_cpu and "cuda" not in on_cpu and on_cpu == [b for b in everywhere if b in on_cpu]
    assert "cpu" not in available_backends("cuda") and "torch" in available_backends("cuda")
    assert "cuda" not in rff.available_rff_backends("cpu") and "torch" in rff.available_rff_backends("cpu")
    assert "cpu" not in rff.available_rff_backends("cuda") and "torch" in rff.available_rff_backends("cuda")
