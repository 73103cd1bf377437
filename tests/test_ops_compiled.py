"""The compiled backends (perturbdiff._C: CPU, and CUDA where a GPU and a CUDA build are present)
against the fp64 pure-torch reference. The backend's name is also the device its tensors live on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import perturbdiff
from perturbdiff._extension import has_kernel
from perturbdiff.ops import _cpp, api, energy_distance, kme, mmd, reference

pytestmark = pytest.mark.skipif(not perturbdiff.has_extension(),
                                reason=f"perturbdiff._C is not built: {perturbdiff.extension_error()}")

KERNELS = ("rbf", "laplacian", "imq", "energy")
ESTIMATORS = ("biased", "unbiased")
ROOT = Path(__file__).resolve().parents[1]
COMPILED = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_kernel("pairwise_mmd", "CUDA") else [])
each_backend = pytest.mark.parametrize("backend", COMPILED)


def block_terms(x, y, xw, yw, kernel, bandwidths, estimator):
    """fp64 reference value and its three block terms c_xx Sxx, 2 c_xy Sxy, c_yy Syy."""
    x, y, xw, yw = (t.double() for t in (x, y, xw, yw))
    coef = api._coefficients(xw, yw, estimator)
    center = api._pooled_mean(x, xw, y, yw)
    terms = [reference.pairwise_mmd(x, y, xw, yw, coef * mask, center, kernel, bandwidths,
                                    estimator == "unbiased")
             for mask in torch.eye(3, dtype=torch.float64)]
    return sum(terms), torch.stack(terms, 1)


def fp32_leaves(backend, *tensors):
    """float32 copies on the backend's device that collect gradients."""
    return [t.float().to(backend).requires_grad_() for t in tensors]


def grad_error(got, want):
    """Relative norm error of a gradient against the fp64 reference's."""
    return (got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)


def min_genes(kernel):
    """Fewest genes to draw. Laplacian and energy are not smooth at D = 0: for two distinct cells
    closer than fp32 can resolve (|D| ~ 1e-7 |z|^2, likely among hundreds of cells in 1-3 genes) the
    direction of the gradient is noise in any fp32 code. Exact duplicates are drawn on purpose."""
    return 8 if kernel in ("laplacian", "energy") else 1


@st.composite
def problems(draw, max_cells=200, max_genes=300):
    estimator = draw(st.sampled_from(ESTIMATORS))
    low = 2 if estimator == "unbiased" else 1
    B = draw(st.integers(1, 3))
    n, m = draw(st.integers(low, max_cells)), draw(st.integers(low, max_cells))
    kernel = draw(st.sampled_from(KERNELS))
    G = draw(st.integers(min_genes(kernel), max_genes))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 40.0]))  # log-expression sits far from zero
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, G, generator=gen, dtype=torch.float64) + offset
    y = 1.2 * torch.randn(B, m, G, generator=gen, dtype=torch.float64) + offset + 0.3
    if draw(st.booleans()) and n > 1:
        x[:, 1] = x[:, 0]  # duplicate cells (sets padded by repetition)
    if draw(st.booleans()) and m > 1:
        y[:, -1] = x[:, 0]  # a cell in both sets
    xw = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.1
    yw = torch.ones(B, m, dtype=torch.float64)
    if draw(st.booleans()):  # padding: weight 0, keeping the estimator defined
        xw[:, low:] *= (torch.rand(B, n - low, generator=gen) > 0.3)
        yw[:, low:] *= (torch.rand(B, m - low, generator=gen) > 0.3)
    bandwidths = draw(st.lists(st.floats(0.5, 3.0), min_size=1, max_size=4))
    scale = G ** 0.5  # bandwidths relative to typical distances so values are not all 0 or 1
    return x, y, xw, yw, kernel, [b * scale for b in bandwidths], estimator


@each_backend
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_forward_matches_fp64_reference(backend, problem):
    x, y, xw, yw, kernel, bandwidths, estimator = problem
    ref, terms = block_terms(x, y, xw, yw, kernel, bandwidths, estimator)
    x, y, xw, yw = (t.to(backend) for t in (x, y, xw, yw))
    out = mmd(x.float(), y.float(), kernel, bandwidths, estimator, xw.float(), yw.float(), backend=backend).cpu()
    assert api.last_backend() == backend
    scale = terms.abs().amax(1)
    assert ((out.double() - ref).abs() <= 1e-5 * scale + 1e-12).all(), (out, ref, scale)
    out64 = mmd(x, y, kernel, bandwidths, estimator, xw, yw, backend=backend).cpu()
    assert ((out64 - ref).abs() <= 1e-12 * scale + 1e-15).all(), (out64, ref)


@each_backend
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_cells=120, max_genes=200))
def test_gradients_match_fp64_reference(backend, problem):
    x, y, xw, yw, kernel, bandwidths, estimator = problem
    upstream = torch.linspace(-1.0, 2.0, x.shape[0], dtype=torch.float64)
    xd, yd = x.clone().requires_grad_(), y.clone().requires_grad_()
    (mmd(xd, yd, kernel, bandwidths, estimator, xw, yw, backend="torch") * upstream).sum().backward()
    xf, yf = fp32_leaves(backend, x, y)
    (mmd(xf, yf, kernel, bandwidths, estimator, xw.float().to(backend), yw.float().to(backend), backend=backend)
     * upstream.float().to(backend)).sum().backward()
    for got, want in ((xf.grad, xd.grad), (yf.grad, yd.grad)):
        err = grad_error(got, want)
        assert err <= 1e-4, err


@each_backend
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(300, 520, 40), (300, 270, 700)], ids=["recompute", "saved"])
def test_several_tiles_forward_and_backward(backend, kernel, shape):
    """Sets larger than one tile (256 rows), both backward paths (saved matrix when N <= genes)."""
    n, m, G = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, n, G, generator=gen, dtype=torch.float64) * 4 + 1
    y = torch.rand(2, m, G, generator=gen, dtype=torch.float64) * 4 + 1.05
    bw = [0.5 * G ** 0.5, 2.0 * G ** 0.5]
    for estimator in ESTIMATORS:
        xd, yd = x.clone().requires_grad_(), y.clone().requires_grad_()
        ref = mmd(xd, yd, kernel, bw, estimator, backend="torch")
        ref.sum().backward()
        xf, yf = fp32_leaves(backend, x, y)
        out = mmd(xf, yf, kernel, bw, estimator, backend=backend)
        out.sum().backward()
        _, terms = block_terms(x, y, torch.ones(2, n), torch.ones(2, m), kernel, bw, estimator)
        assert ((out.double().cpu() - ref).abs() <= 1e-5 * terms.abs().amax(1)).all()
        for got, want in ((xf.grad, xd.grad), (yf.grad, yd.grad)):
            assert grad_error(got, want) <= 1e-4


def test_backward_saves_the_derivative_matrix_only_when_small():
    x, y = torch.randn(2, 5, 20, requires_grad=True), torch.randn(2, 6, 20)
    ones_x, ones_y = torch.ones(2, 5), torch.ones(2, 6)
    coef, center = torch.ones(2, 3), torch.zeros(2, 20)
    calls = []
    real = torch.ops.perturbdiff.pairwise_mmd

    class Spy:
        def __call__(self, *args):
            calls.append(args[-1])
            return real(*args)

    original, torch.ops.perturbdiff.pairwise_mmd = torch.ops.perturbdiff.pairwise_mmd, Spy()
    try:
        _cpp.pairwise_mmd(x, y, ones_x, ones_y, coef, center, "energy", [1.0], False)
        _cpp.pairwise_mmd(x[:, :, :3], y[:, :, :3], ones_x, ones_y, coef, center[:, :3], "energy", [1.0], False)
        with torch.no_grad():
            _cpp.pairwise_mmd(x, y, ones_x, ones_y, coef, center, "energy", [1.0], False)
    finally:
        torch.ops.perturbdiff.pairwise_mmd = original
    assert calls == [True, False, False]  # N = 11 <= 20 genes; 11 > 3 genes; no gradient wanted


@each_backend
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 300), st.integers(1, 280), st.integers(0, 200),
       st.sampled_from(KERNELS), st.integers(0, 2**31 - 1))
def test_kme_forward_and_backward(backend, B, n, Q, extra_genes, kernel, seed):
    G = min_genes(kernel) + extra_genes
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, G, generator=gen, dtype=torch.float64) + 20
    z = torch.randn(B, Q, G, generator=gen, dtype=torch.float64) + 20
    w = torch.rand(B, n, generator=gen, dtype=torch.float64) * (torch.rand(B, n, generator=gen) > 0.2) + 1e-3
    bw = [G ** 0.5, 3 * G ** 0.5]
    upstream = torch.randn(B, Q, generator=gen, dtype=torch.float64)
    xd, zd = x.clone().requires_grad_(), z.clone().requires_grad_()
    ref = kme(xd, zd, kernel, bw, w, backend="torch")
    (ref * upstream).sum().backward()
    xf, zf = fp32_leaves(backend, x, z)
    out = kme(xf, zf, kernel, bw, w.float().to(backend), backend=backend)
    (out * upstream.float().to(backend)).sum().backward()
    # kme values are means of kernel values: scale of the largest term is max |k| <= |ref| + spread
    scale = ref.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert ((out.double().cpu() - ref).abs() <= 1e-5 * scale).all()
    for got, want in ((xf.grad, xd.grad), (zf.grad, zd.grad)):
        assert grad_error(got, want) <= 1e-4


@each_backend
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(3, 4, 9), (5, 4, 3)], ids=["saved", "recompute"])
def test_gradcheck_fp64_with_duplicate_points(backend, kernel, shape):
    n, m, G = shape
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, n, G, generator=gen, dtype=torch.float64)
    y = torch.randn(1, m, G, generator=gen, dtype=torch.float64)
    x[:, 1] = x[:, 0]
    y[:, 2] = x[:, 0]
    w = torch.rand(1, m, generator=gen, dtype=torch.float64) + 0.5
    z = torch.randn(1, 4, G, generator=gen, dtype=torch.float64)
    z[:, 0] = x[:, 0]
    x, y, w, z = (t.to(backend) for t in (x, y, w, z))
    x.requires_grad_()
    y.requires_grad_()
    for estimator in ESTIMATORS:
        assert torch.autograd.gradcheck(
            lambda a, b: mmd(a, b, kernel, [1.5, 3.0], estimator, y_weights=w, backend=backend), (x, y))
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, q: kme(a, q, kernel, [2.0], backend=backend), (x, z))


def _op_args(device="cpu"):
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 6, 10, generator=gen), torch.randn(2, 5, 10, generator=gen)
    xw, yw = torch.rand(2, 6, generator=gen) + 0.1, torch.rand(2, 5, generator=gen) + 0.1
    coef, center = api._coefficients(xw, yw, "unbiased"), api._pooled_mean(x, xw, y, yw)
    return tuple(t.to(device) for t in (x, y, xw, yw, coef, center))


@each_backend
@pytest.mark.parametrize("kernel, save", [("rbf", False), ("energy", True)])
def test_opcheck_pairwise_ops(backend, kernel, save):
    x, y, xw, yw, coef, center = _op_args(backend)
    ops = torch.ops.perturbdiff
    torch.library.opcheck(ops.pairwise_mmd.default,
                          (x.requires_grad_(), y, xw, yw, coef, center, kernel, [1.0, 2.0], True, save))
    _, saved = ops.pairwise_mmd(x.detach(), y, xw, yw, coef, center, kernel, [1.0, 2.0], True, save)
    torch.library.opcheck(ops.pairwise_mmd_backward.default,
                          (torch.randn(2, device=backend), x.detach(), y, xw, yw, coef, center, kernel,
                           [1.0, 2.0], True, saved, True, True))


@each_backend
def test_opcheck_kme_ops(backend):
    x, _, xw, _, _, center = _op_args(backend)
    z = torch.randn(2, 7, 10, device=backend)
    ops = torch.ops.perturbdiff
    torch.library.opcheck(ops.kme.default, (x.requires_grad_(), xw, z.requires_grad_(), center, "imq", [1.0]))
    torch.library.opcheck(ops.kme_backward.default,
                          (torch.randn(2, 7, device=backend), x.detach(), xw, z.detach(), center, "imq", [1.0],
                           True, False))


@each_backend
def test_compile_fullgraph_energy_distance(backend):
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: energy_distance(a, b, backend=backend), fullgraph=True, backend="aot_eager")
    x, y = torch.randn(2, 20, 30, device=backend, requires_grad=True), torch.randn(2, 25, 30, device=backend)
    out = fn(x, y)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = energy_distance(x2, y, backend=backend)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@each_backend
def test_bitwise_deterministic(backend):
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.rand(3, n, 300, generator=gen).to(backend) for n in (400, 350))

    def run():
        xr = x.clone().requires_grad_()
        v = mmd(xr, y, "rbf", [5.0, 10.0], backend=backend)
        v.sum().backward()
        return v, xr.grad

    (v1, g1), (v2, g2) = run(), run()
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


@each_backend
def test_non_contiguous_inputs_match_contiguous(backend):
    base = torch.randn(4, 30, 70, dtype=torch.float64, device=backend)
    x = base[::2, :, ::2]  # strided in sets and genes
    y = torch.randn(35, 2, 35, dtype=torch.float64, device=backend).transpose(0, 1)
    w = torch.rand(30, 2, dtype=torch.float64, device=backend).t()
    got = mmd(x, y, "laplacian", 4.0, "unbiased", x_weights=w, backend=backend)
    want = mmd(x.contiguous(), y.contiguous(), "laplacian", 4.0, "unbiased", x_weights=w.contiguous(),
               backend=backend)
    # equal up to the API's weight sums, whose rounding depends on the memory layout
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, mmd(x, y, "laplacian", 4.0, "unbiased", x_weights=w, backend="torch"))


@pytest.mark.parametrize("call, match", [
    (lambda: mmd(torch.randn(4, 3), torch.randn(5, 2), backend="cpu"), "gene counts differ"),
    (lambda: mmd(torch.randn(0, 3), torch.randn(5, 3), backend="cpu"), "empty set"),
    (lambda: mmd(torch.full((4, 3), float("nan")), torch.randn(5, 3), backend="cpu"), "NaN"),
    (lambda: mmd(torch.ones(4, 3, dtype=torch.int64), torch.ones(5, 3, dtype=torch.int64), backend="cpu"),
     "floating-point"),
    (lambda: mmd(torch.randn(4, 3), torch.randn(5, 3), bandwidth=0.0, backend="cpu"), "positive"),
    (lambda: mmd(torch.randn(4, 3), torch.randn(5, 3), x_weights=torch.zeros(4), backend="cpu"), "all zero"),
    (lambda: mmd(torch.randn(4, 3).half(), torch.randn(5, 3).half(), backend="cpu"), "float16"),
    (lambda: mmd(torch.randn(4, 3), torch.randn(5, 3), x_weights=torch.ones(4, requires_grad=True),
                 backend="cpu"), "x_weights"),
])
def test_bad_input_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_direct_op_argument_checks():
    x, y, xw, yw, coef, center = _op_args()
    op = torch.ops.perturbdiff.pairwise_mmd
    with pytest.raises(ValueError, match="unknown kernel 'gauss'"):
        op(x, y, xw, yw, coef, center, "gauss", [1.0], False, False)
    with pytest.raises(ValueError, match="between 1 and 16 bandwidths"):
        op(x, y, xw, yw, coef, center, "rbf", [1.0] * 17, False, False)
    with pytest.raises(ValueError, match="coef must have shape"):
        op(x, y, xw, yw, coef[:1], center, "rbf", [1.0], False, False)
    with pytest.raises(TypeError, match="must be Float"):
        op(x, y, xw.double(), yw, coef, center, "rbf", [1.0], False, False)


@each_backend
@pytest.mark.parametrize("loss, kernel, blur", [("energy", "energy", 0.05), ("gaussian", "rbf", 3.0)])
def test_parity_with_geomloss(backend, loss, kernel, blur):
    """Same definition as geomloss (1/2 factor, V-statistic, sqrt clamp): compared in fp64, where
    neither implementation's rounding hides a difference."""
    geomloss = pytest.importorskip("geomloss")
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(64, 50, generator=gen, dtype=torch.float64) * 3
    y = torch.rand(80, 50, generator=gen, dtype=torch.float64) * 3 + 0.1
    x[1] = x[0]  # a duplicate: the clamp's value enters the self terms
    x, y = x.to(backend), y.to(backend)
    want = geomloss.SamplesLoss(loss, blur=blur, backend="tensorized")(x, y)
    if kernel == "energy":
        got = energy_distance(x, y, "half", backend=backend)
    else:  # geomloss returns half the biased MMD^2
        got = 0.5 * mmd(x, y, "rbf", blur, "biased", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_portable_epilogue_matches_simd_epilogue():
    """ATEN_CPU_CAPABILITY=default selects the non-AVX2 build of the epilogue: same numbers."""
    code = (
        f"KERNELS = {KERNELS!r};"
        "import json, torch; from perturbdiff.ops import mmd;"
        "g = torch.Generator().manual_seed(7);"
        "x, y = torch.rand(2, 90, 33, generator=g), torch.rand(2, 70, 33, generator=g);"
        "print(json.dumps([mmd(x, y, k, [1.0, 2.0], backend='cpu').tolist() for k in KERNELS]))"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(2, 90, 33, generator=g), torch.rand(2, 70, 33, generator=g)
    here = torch.tensor([mmd(x, y, k, [1.0, 2.0], backend="cpu").tolist() for k in KERNELS])
    torch.testing.assert_close(torch.tensor(json.loads(out)), here, rtol=1e-5, atol=1e-7)
