"""Random Fourier features: backends vs the reference, gradients, estimator statistics, set distances."""

import math
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perturbdiff import ops
from perturbdiff.ops import rff

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [b for b in rff.available_rff_backends() if b != "triton-interpreter"]
CPU_BACKENDS = [b for b in rff.available_rff_backends("cpu") if b != "triton-interpreter"]
GPU_BACKENDS = rff.available_rff_backends("cuda") if torch.cuda.is_available() else []
HAS_COMPILED = "cpu" in BACKENDS


@contextmanager
def one_thread():
    """The statistical tests run hundreds of tiny ops: a thread pool only adds wake-up latency."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_inputs(gen, b, s, g, f, dtype=torch.float32, offset=0.0):
    x = torch.randn(b, s, g, generator=gen, dtype=torch.float64) + offset
    w = torch.rand(b, s, generator=gen, dtype=torch.float64)
    w[:, : s // 3] = 0.0  # padding
    w[:, -1] = 1.0  # every set keeps a cell
    freq = torch.randn(g, f, generator=gen, dtype=torch.float64) / math.sqrt(g)
    center = x.mean(1)
    return [t.to(dtype) for t in (x, w, center, freq)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# The embedding op: every backend equals the reference on the same frequencies
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 300), g=st.integers(1, 70), f=st.integers(1, 90),
       offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**16))
def test_backend_matches_reference(backend, b, s, g, f, offset, seed):
    x, w, c, freq = random_inputs(torch.Generator().manual_seed(seed), b, s, g, f, offset=offset)
    expected = rff.reference_embed_sums(*(t.double() for t in (x, w, c, freq)))
    got = rff.embed_sums(x, w, c, freq, backend)
    assert rff.last_rff_backend() == backend
    assert got.shape == (b, 2 * f) and got.dtype == torch.float32
    assert rel_err(got, expected) <= 1e-5
    got64 = rff.embed_sums(*(t.double() for t in (x, w, c, freq)), backend=backend)
    assert rel_err(got64, expected) <= 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 45, 37, 70), (1, 700, 20, 33)])
def test_backend_gradient_matches_reference(backend, shape):
    x, w, c, freq = random_inputs(torch.Generator().manual_seed(3), *shape)
    up = torch.randn(shape[0], 2 * shape[3], generator=torch.Generator().manual_seed(4))
    xr = x.clone().requires_grad_()
    (rff.embed_sums(xr, w, c, freq, backend) * up).sum().backward()
    xd = x.double().requires_grad_()
    (rff.reference_embed_sums(xd, w.double(), c.double(), freq.double()) * up.double()).sum().backward()
    assert rel_err(xr.grad, xd.grad) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_gradcheck_public_api(backend, estimator):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    xw = torch.tensor([[1.0, 0.5, 0.0, 2.0], [1.0] * 4], dtype=torch.float64)
    fmap = rff.RFFMap(3, 8, [0.7, 2.0], kind="iid", seed=1, dtype=torch.float64)

    def loss(a, b):
        return rff.rff_mmd(a, b, fmap, estimator=estimator, x_weights=xw, backend=backend)

    with one_thread():
        assert torch.autograd.gradcheck(loss, (x, y))
        assert torch.autograd.gradcheck(lambda a: rff.set_embedding(a, fmap, xw, backend=backend), (x,))
        assert torch.autograd.gradgradcheck(lambda a: loss(a, y.detach()), (x,))


@pytest.mark.skipif(not HAS_COMPILED, reason="perturbdiff._C with rff_embed is not built")
def test_opcheck_compiled_op():
    x, w, c, freq = random_inputs(torch.Generator().manual_seed(6), 2, 40, 9, 12, torch.float64)
    torch.library.opcheck(torch.ops.perturbdiff.rff_embed, (x.requires_grad_(), w, c, freq))
    up = torch.randn(2, 24, dtype=torch.float64)
    torch.library.opcheck(torch.ops.perturbdiff.rff_embed_backward, (up, x.detach(), w, c, freq))


def test_training_loss_compiles_with_fullgraph():
    fmap = rff.RFFMap(8, 32, 2.0, seed=1)
    x = torch.randn(3, 20, 8, requires_grad=True)
    y, w = torch.randn(3, 20, 8), torch.ones(3, 20)
    w[1, 12:] = 0.0

    def loss(a, b):
        return rff.rff_mmd(a, b, fmap, x_weights=w, estimator="unbiased").sum()

    compiled = torch.compile(loss, fullgraph=True)(x, y)
    (grad_compiled,) = torch.autograd.grad(compiled, x)
    eager = loss(x, y)
    (grad_eager,) = torch.autograd.grad(eager, x)
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert torch.allclose(grad_compiled, grad_eager, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_COMPILED, reason="perturbdiff._C with rff_embed is not built")
def test_compiled_op_is_deterministic_and_checks_shapes():
    x, w, c, freq = random_inputs(torch.Generator().manual_seed(7), 3, 500, 30, 40)
    a = torch.ops.perturbdiff.rff_embed(x, w, c, freq)
    assert torch.equal(a, torch.ops.perturbdiff.rff_embed(x, w, c, freq))
    with pytest.raises(RuntimeError, match="frequencies must be"):
        torch.ops.perturbdiff.rff_embed(x, w, c, freq[:-1])
    with pytest.raises(RuntimeError, match="weights must be"):
        torch.ops.perturbdiff.rff_embed(x, w[:, :-1], c, freq)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from perturbdiff.ops import rff
    from perturbdiff.ops.rff import reference_embed_sums as ref

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    gen = torch.Generator().manual_seed(0)
    # G < BLOCK_G, cell/frequency/gene tails, zero weights
    for b, s, g, f in [(1, 3, 5, 7), (2, 45, 37, 70), (1, 33, 64, 65)]:
        x = torch.randn(b, s, g, generator=gen) + 5.0
        w = torch.rand(b, s, generator=gen)
        w[:, 0] = 0.0
        c = x.mean(1)
        freq = torch.randn(g, f, generator=gen) / g ** 0.5
        d = [t.double() for t in (x, w, c, freq)]
        out = rff.embed_sums(x, w, c, freq, "triton")
        assert rff.last_rff_backend() == "triton-interpreter"
        assert err(out, ref(*d)) <= 1e-5, (b, s, g, f, err(out, ref(*d)))
        up = torch.randn(b, 2 * f, generator=gen)
        xr = x.clone().requires_grad_()
        (rff.embed_sums(xr, w, c, freq, "triton") * up).sum().backward()
        xd = d[0].requires_grad_()
        (ref(xd, *d[1:]) * up.double()).sum().backward()
        assert err(xr.grad, xd.grad) <= 1e-5, (b, s, g, f, err(xr.grad, xd.grad))
    # the public loss through the interpreter equals the reference backend
    x, y = torch.randn(2, 20, 12, generator=gen), torch.randn(2, 17, 12, generator=gen) + 0.3
    fmap = rff.RFFMap(12, 40, 2.0, seed=3)
    a = rff.rff_mmd(x, y, fmap, estimator="unbiased", backend="triton")
    b = rff.rff_mmd(x.double(), y.double(), fmap.double(), estimator="unbiased", backend="torch")
    assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6), (a, b)
    assert rff.rff_mmd(x, y, fmap) is not None and rff.last_rff_backend() != "triton-interpreter"
    print("triton-ok")
""")


def test_triton_kernels_under_interpreter(triton_interpreter):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "triton-ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
def test_gpu_backend_matches_reference(backend):
    x, w, c, freq = random_inputs(torch.Generator().manual_seed(8), 4, 1000, 300, 257)
    up = torch.randn(4, 2 * 257, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    xd = x.double().requires_grad_()
    expected = rff.reference_embed_sums(xd, *(t.double() for t in (w, c, freq)))
    (expected * up).sum().backward()
    xg = x.cuda().requires_grad_()
    got = rff.embed_sums(xg, *(t.cuda() for t in (w, c, freq)), backend=backend)
    assert rff.last_rff_backend() == backend
    (got * up.float().cuda()).sum().backward()
    assert rel_err(got.detach().cpu(), expected.detach()) <= 1e-4
    assert rel_err(xg.grad.cpu(), xd.grad) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Feature map, embeddings and the MMD estimate: exact identities
# ------------------------------------------------------------------------------------------------

def test_feature_map_is_reproducible_and_saves_with_a_model(tmp_path):
    a = rff.RFFMap(30, 50, [1.0, 3.0], seed=11)
    assert a.frequencies.shape == (30, 100) and a.num_outputs == 200
    assert torch.equal(a.frequencies, rff.RFFMap(30, 50, [1.0, 3.0], seed=11).frequencies)
    assert not torch.equal(a.frequencies, rff.RFFMap(30, 50, [1.0, 3.0], seed=12).frequencies)
    # bandwidth-major columns: one base draw scaled by 1/sigma
    assert torch.allclose(a.frequencies[:, :50], 3.0 * a.frequencies[:, 50:])
    torch.save(a.state_dict(), tmp_path / "map.pt")
    b = rff.RFFMap(30, 50, [1.0, 3.0], seed=0)
    b.load_state_dict(torch.load(tmp_path / "map.pt", weights_only=True))
    x = torch.randn(4, 30)
    assert torch.equal(a(x), b(x))


def test_orthogonal_blocks_are_orthogonal():
    f = rff.draw_frequencies(8, 20, 2.0, kind="orthogonal", seed=1)
    for start in (0, 8):  # two full blocks of 8 directions, then a block of 4
        block = f[:, start:start + 8]
        gram = block.T @ block
        assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros(8, 8, dtype=f.dtype), atol=1e-12)


def test_set_embedding_is_the_weighted_mean_of_features():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 25, 6, generator=gen, dtype=torch.float64)
    w = torch.rand(3, 25, generator=gen, dtype=torch.float64)
    fmap = rff.RFFMap(6, 16, 1.5, seed=2, dtype=torch.float64)
    emb = rff.set_embedding(x, fmap, w)
    expected = (w[..., None] * fmap(x)).sum(1) / w.sum(1, keepdim=True)
    assert torch.allclose(emb, expected, atol=1e-12)
    assert torch.allclose(rff.set_embedding(x[1], fmap, w[1]), expected[1], atol=1e-12)
    # features have unit norm, so z(x).z(y) is an average of cosines
    assert torch.allclose(fmap(x).norm(dim=-1), torch.ones(3, 25, dtype=torch.float64))
    # a common center rotates every (cos, sin) pair: distances between sets are unchanged
    shifted = rff.set_embedding(x, fmap, w, center=x.mean((0, 1)))
    assert torch.allclose(torch.cdist(shifted, shifted), torch.cdist(emb, emb), atol=1e-10)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_rff_mmd_equals_mmd_under_the_feature_kernel(estimator):
    """rff_mmd is the weighted V/U statistic of the kernel z(x).z(y): check against explicit features."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(14, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(11, 5, generator=gen, dtype=torch.float64) + 0.4
    xw = torch.rand(14, generator=gen, dtype=torch.float64) + 0.1
    yw = torch.rand(11, generator=gen, dtype=torch.float64) + 0.1
    fmap = rff.RFFMap(5, 32, 1.2, seed=4, dtype=torch.float64)
    zx, zy = fmap(x), fmap(y)

    def block(za, wa, zb, wb, same):
        k = wa[:, None] * (za @ zb.T) * wb[None, :]
        norm = wa.sum() * wb.sum()
        if same and estimator == "unbiased":
            k, norm = k - torch.diag(k.diagonal()), norm - (wa * wb).sum()
        return k.sum() / norm

    expected = block(zx, xw, zx, xw, True) + block(zy, yw, zy, yw, True) - 2 * block(zx, xw, zy, yw, False)
    got = rff.rff_mmd(x, y, fmap, estimator=estimator, x_weights=xw, y_weights=yw)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(rff.rff_mmd(x, y, fmap, estimator=estimator, x_weights=xw, y_weights=yw, center=False),
                          expected, atol=1e-12)


def test_batched_padded_loss_equals_each_set_alone():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(3, 20, 7, generator=gen)
    y = torch.randn(3, 20, 7, generator=gen) + 0.5
    keep = [20, 13, 4]
    xw = torch.zeros(3, 20)
    for b, k in enumerate(keep):
        xw[b, :k] = 1.0
    fmap = rff.RFFMap(7, 64, 2.0, seed=5)
    batch = rff.rff_mmd(x, y, fmap, estimator="unbiased", x_weights=xw)
    assert batch.shape == (3,)
    for b, k in enumerate(keep):
        alone = rff.rff_mmd(x[b, :k], y[b], fmap, estimator="unbiased")
        assert torch.allclose(batch[b], alone, rtol=1e-4, atol=1e-6)


def test_half_precision_inputs_are_computed_in_fp32():
    x, y = torch.randn(10, 4).half(), torch.randn(12, 4).half()
    fmap = rff.RFFMap(4, 16, 1.0, seed=0)
    out = rff.rff_mmd(x, y, fmap)
    assert out.dtype == torch.float32
    assert torch.allclose(out, rff.rff_mmd(x.float(), y.float(), fmap))


# ------------------------------------------------------------------------------------------------
# Statistics: convergence to the exact MMD, orthogonal vs iid
# ------------------------------------------------------------------------------------------------

def _two_sets(seed=1, g=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, g, generator=gen, dtype=torch.float64)
    y = torch.randn(40, g, generator=gen, dtype=torch.float64) * 1.2 + 0.3
    return x, y


def _estimates(x, y, d, seeds, **kw):
    return torch.stack([rff.rff_mmd(x, y, num_features=d, seed=s, **kw) for s in seeds])


def test_rff_estimate_converges_to_exact_mmd_at_rate_one_over_sqrt_d():
    x, y = _two_sets()
    bw = [2.0, 4.0]
    exact = ops.mmd(x, y, "rbf", bw).item()
    seeds = range(24)
    ds = [16, 64, 256, 1024]
    with one_thread():
        est = {d: _estimates(x, y, d, seeds, bandwidth=bw, kind="iid") for d in ds}
    rms = torch.tensor([((est[d] - exact) ** 2).mean().sqrt().item() for d in ds])
    logd, logr = torch.log(torch.tensor(ds, dtype=torch.float64)), torch.log(rms.double())
    slope = (((logd - logd.mean()) * (logr - logr.mean())).sum() / ((logd - logd.mean()) ** 2).sum()).item()
    assert -0.75 < slope < -0.3, (slope, rms)
    # unbiased over frequency draws: the mean sits on the exact value within 4 standard errors ...
    top = est[ds[-1]]
    assert abs(top.mean().item() - exact) < 4 * top.std().item() / math.sqrt(len(seeds))
    # ... and the error obeys the variance bound Var <= 4 MMD^2 / D of kernels.md section 4.2
    assert rms[-1] < 2 * math.sqrt(exact / ds[-1])
    assert rms[-1] / exact < 0.05


@pytest.mark.parametrize("kernel", ["laplacian", "imq"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_other_kernels_and_unbiased_estimator_are_unbiased(kernel, estimator):
    x, y = _two_sets(seed=2, g=6)
    x, y = x[:25], y[:25]
    exact = ops.mmd(x, y, kernel, 3.0, estimator=estimator).item()
    with one_thread():
        est = _estimates(x, y, 512, range(24), bandwidth=3.0, kernel=kernel, kind="iid", estimator=estimator)
    se = est.std().item() / math.sqrt(len(est))
    assert se < 0.05 * abs(exact)  # precise enough that the next check means something
    # laplacian: ops.mmd evaluates k(x, x) as exp(-1e-4 / sigma) (sqrt clamp), the features as 1
    assert abs(est.mean().item() - exact) < 4 * se + 1e-4, (est.mean().item(), exact, se)


def test_orthogonal_features_have_lower_variance_than_iid():
    x, y = _two_sets(seed=3)
    seeds = range(64)
    with one_thread():
        for d in (16, 64):
            v_orth = _estimates(x, y, d, seeds, bandwidth="median", kind="orthogonal").var().item()
            v_iid = _estimates(x, y, d, seeds, bandwidth="median", kind="iid").var().item()
            # one-sided F-test at 1 % with (63, 63) degrees of freedom: scipy.stats.f.ppf(0.01, 63, 63)
            assert v_orth / v_iid < 0.5528, (d, v_orth, v_iid)


# ------------------------------------------------------------------------------------------------
# All-pairs distances
# ------------------------------------------------------------------------------------------------

def _ragged_sets(seed=15, g=6):
    gen = torch.Generator().manual_seed(seed)
    sizes = [7, 12, 5, 9]
    xs = [torch.randn(n, g, generator=gen, dtype=torch.float64) + 0.3 * i for i, n in enumerate(sizes)]
    ws = [torch.rand(n, generator=gen, dtype=torch.float64) + 0.2 for n in sizes]
    return xs, ws


@pytest.mark.parametrize("kernel,bandwidth", [("rbf", [1.0, 3.0]), ("energy", 1.0), ("imq", 2.0)])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_exact_set_distances_equal_pairwise_mmd(kernel, bandwidth, estimator):
    xs, ws = _ragged_sets()
    d = rff.set_distances(xs, "exact", kernel, bandwidth, estimator, weights=ws)
    assert d.shape == (4, 4) and torch.equal(d, d.T) and (d.diagonal() == 0).all()
    for i in range(4):
        for j in range(4):
            if i != j:
                ref = ops.mmd(xs[i], xs[j], kernel, bandwidth, estimator, ws[i], ws[j])
                assert torch.allclose(d[i, j], ref, rtol=1e-9, atol=1e-12), (i, j)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_rff_set_distances_equal_pairwise_rff_mmd(estimator):
    xs, ws = _ragged_sets()
    fmap = rff.RFFMap(6, 64, 2.0, seed=6, dtype=torch.float64)
    d = rff.set_distances(xs, "rff", estimator=estimator, weights=ws, feature_map=fmap)
    for i in range(4):
        for j in range(i + 1, 4):
            ref = rff.rff_mmd(xs[i], xs[j], fmap, estimator=estimator, x_weights=ws[i], y_weights=ws[j])
            assert torch.allclose(d[i, j], ref, atol=1e-12)


def test_batched_sets_and_rff_accuracy():
    gen = torch.Generator().manual_seed(16)
    sets = torch.randn(5, 30, 8, generator=gen) + torch.linspace(0, 1.5, 5)[:, None, None]
    exact = rff.set_distances(sets, "exact", bandwidth=3.0)
    exact_list = rff.set_distances(list(sets), "exact", bandwidth=3.0)
    assert torch.allclose(exact, exact_list, rtol=1e-5, atol=1e-7)
    approx = rff.set_distances(sets, "rff", bandwidth=3.0, num_features=4096, seed=1)
    assert rel_err(approx, exact) < 0.05


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_features=0), "num_features must be a positive integer"),
    (dict(num_features=-3), "num_features must be a positive integer"),
    (dict(n_genes=0), "n_genes must be a positive integer"),
    (dict(bandwidth=0.0), "bandwidths must be positive"),
    (dict(bandwidth=[1.0, -2.0]), "bandwidths must be positive"),
    (dict(bandwidth=float("nan")), "bandwidths must be positive"),
    (dict(bandwidth="median"), "numeric bandwidths"),
    (dict(kind="sobol"), "kind must be one of"),
    (dict(kernel="energy"), "no random-feature map"),
])
def test_feature_map_rejects_bad_arguments(kwargs, match):
    args = dict(n_genes=5, num_features=8, bandwidth=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rff.RFFMap(**args)


def test_bad_inputs_get_clear_errors():
    x, y = torch.randn(6, 5), torch.randn(7, 5)
    fmap = rff.RFFMap(4, 8)
    with pytest.raises(ValueError, match="x has 5 genes but the feature map was drawn for 4 genes"):
        rff.rff_mmd(x, y, fmap)
    with pytest.raises(ValueError, match="x has 5 genes"):
        rff.set_embedding(x, fmap)
    with pytest.raises(ValueError, match="gene counts differ"):
        rff.rff_mmd(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="x_weights must be finite and non-negative"):
        rff.rff_mmd(x, y, x_weights=-torch.ones(6))
    with pytest.raises(ValueError, match="x_weights must have shape"):
        rff.rff_mmd(x, y, x_weights=torch.ones(5))
    with pytest.raises(ValueError, match="all zero"):
        rff.rff_mmd(x, y, y_weights=torch.zeros(7))
    with pytest.raises(ValueError, match="at least two cells"):
        rff.rff_mmd(x, y, estimator="unbiased", x_weights=torch.tensor([1.0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="estimator must be one of"):
        rff.rff_mmd(x, y, estimator="plugin")
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        rff.rff_mmd(x, y, num_features=0)
    with pytest.raises(ValueError, match="center must have shape"):
        rff.set_embedding(x, rff.RFFMap(5, 8), center=torch.zeros(3))
    with pytest.raises(TypeError, match="feature_map must be an RFFMap"):
        rff.set_embedding(x, torch.randn(5, 8))
    with pytest.raises(ValueError, match="not available"):
        rff.set_embedding(x, rff.RFFMap(5, 8), backend="opencl")
    with pytest.raises(ValueError, match="at least two sets"):
        rff.set_distances([x])
    with pytest.raises(ValueError, match="method must be"):
        rff.set_distances([x, y], method="nystrom")
    with pytest.raises(ValueError, match=r"sets\[1\] has shape"):
        rff.set_distances([x, torch.randn(7, 4)])
    with pytest.raises(ValueError, match="one \\[S_k\\] tensor per set"):
        rff.set_distances([x, y], weights=[torch.ones(6)])
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape"):
        rff.set_distances([x, y], weights=[torch.ones(6), torch.ones(6)])
