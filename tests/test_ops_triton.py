"""Triton backend of the pairwise engine against the fp64 pure-torch reference.

Triton reads TRITON_INTERPRET when it is imported, so the CPU (interpreter) tests cannot share a
process with tests that import triton normally. ``test_interpreter_suite`` therefore re-runs this
file in a subprocess with TRITON_INTERPRET=1, where the ``interp`` tests run (tiny shapes: the
interpreter executes every program in numpy). The ``gpu`` tests run in-process on a CUDA machine.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from perturbdiff.ops import api, available_backends, kme, last_backend, mmd, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and not INTERPRET and torch.cuda.is_available()

interp = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")
gpu = pytest.mark.skipif(not ON_GPU, reason="needs triton and a CUDA GPU")
KERNELS = ("rbf", "laplacian", "imq", "energy")
BANDWIDTHS = [2.0, 5.0]


@pytest.fixture(scope="module")
def K():
    """The kernels package, as the ops layer loaded it."""
    available_backends()  # imports the optional backends
    from perturbdiff.ops import _triton

    if _triton.DEVICE_TYPE is None:
        pytest.skip("the triton backend is not usable in this process")
    return _triton.kernels


def cells(B, S, G, seed, offset=4.0, device="cpu"):
    """Log-expression-like values: far from zero, so centring matters."""
    gen = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(B, S, G, generator=gen)).to(device)


def kernel_scale(kernel, x, y, bandwidths):
    """Largest |k(D)| over the pooled pairs: bounds every term of the MMD (weights sum to 1)."""
    z = torch.cat([x, y], 1).double()
    z = z - z.mean(1, keepdim=True)
    k = reference.radial(kernel, reference.sqdist(z, z, same=True), bandwidths)
    return k.abs().amax((1, 2))


def compare_mmd(kernel, estimator, x, y, xw=None, yw=None, need=("x", "y"), value_tol=1e-5,
                grad_tol=1e-4, oracle_inputs=None, bandwidths=BANDWIDTHS):
    """Triton value and gradients vs the fp64 reference on the same inputs (or ``oracle_inputs``,
    e.g. the low-precision inputs upcast)."""
    def run(backend, inputs, dtype):
        t = {k: None if v is None else v.detach().to(dtype).requires_grad_(k in need)
             for k, v in inputs.items()}
        value = mmd(t["x"], t["y"], kernel, bandwidths, estimator, t["xw"], t["yw"],
                    backend=backend)
        grads = torch.autograd.grad(value.sum(), [t[k] for k in need]) if need else ()
        return value, grads

    inputs = {"x": x, "y": y, "xw": xw, "yw": yw}
    value, grads = run("triton", inputs, x.dtype)
    assert last_backend() == "triton"
    ref, ref_grads = run("torch", oracle_inputs or inputs, torch.float64)
    scale = kernel_scale(kernel, x if x.dim() == 3 else x[None], y if y.dim() == 3 else y[None],
                         bandwidths)
    err = (value.double() - ref).abs()
    assert (err <= value_tol * scale.reshape(err.shape)).all(), (kernel, estimator, err, scale)
    for name, g, r in zip(need, grads, ref_grads):
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert g.dtype == x.dtype and g.shape == r.shape
        assert rel <= grad_tol, (kernel, estimator, name, rel)
    return value


# --------------------------------------------------------------------------- process plumbing


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="launches the interpreter run itself")
def test_interpreter_suite(triton_interpreter):
    root = Path(__file__).resolve().parents[1]
    path = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20, tail  # the interpreter tests ran, not skipped


@interp
def test_registered_for_cpu_below_the_other_backends(K):
    from perturbdiff.ops import _backends

    assert K.INTERPRETED
    b = _backends._REGISTRY["triton"]
    assert b.device_type == "cpu" and b.dtypes == (torch.float32,)
    assert all(b.priority < o.priority for n, o in _backends._REGISTRY.items() if n != "triton")
    x = cells(1, 4, 3, 0)[0]
    mmd(x, x + 1)
    assert last_backend() != "triton"  # auto never picks the interpreter
    with pytest.raises(ValueError, match="does not run torch.float64"):
        mmd(x.double(), x.double(), backend="triton")


@interp
def test_settings_validate(K):
    with pytest.raises(ValueError, match="precision"):
        K.configure(precision="fp8")
    with pytest.raises(ValueError, match="block_k"):
        with K.settings(block_k=24):
            pass
    with K.settings(block=16) as s:
        assert K.get_settings() is s and s.block == 16
    assert K.get_settings().block == 64


# --------------------------------------------------------------------------- interpreter checks


@interp
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_matches_reference(K, kernel, estimator):
    """Two row tiles (tile pairs on and off the diagonal, the X/Y boundary inside a tile), gene
    tails in both the K loop and the backward's chunks, zero weights, duplicate cells."""
    x, y = cells(1, 13, 21, 1), cells(1, 10, 21, 2, offset=4.3)
    x[0, 4] = x[0, 3]  # duplicate within X
    y[0, 2] = x[0, 0]  # duplicate across the sets
    xw = torch.rand(1, 13, generator=torch.Generator().manual_seed(3))
    xw[0, [1, 7]] = 0.0
    with K.settings(block=16, block_k=16, block_d=16):
        compare_mmd(kernel, estimator, x, y, xw=xw)


@interp
def test_single_tile_and_genes_below_block_k(K):
    """G < BLOCK_K (one partial K step: FlashSinkhorn's GPU miscompile case), a set of one."""
    x, y = cells(1, 1, 5, 4), cells(1, 9, 5, 5)
    with K.settings(block=16, block_k=32, block_d=16):
        compare_mmd("energy", "biased", x, y)


@interp
def test_many_tiles_and_one_sided_gradients(K):
    """Three row tiles; only x (the predicted set, as in training) or only y needs a gradient."""
    x, y = cells(1, 17, 18, 6), cells(1, 19, 18, 7, offset=3.5)
    with K.settings(block=16, block_k=16, block_d=16):
        compare_mmd("rbf", "biased", x, y, need=("x",))
        compare_mmd("energy", "unbiased", x, y, need=("y",))


@interp
def test_weight_gradients(K):
    x, y = cells(1, 9, 7, 8), cells(1, 6, 7, 9)
    xw = torch.rand(1, 9, generator=torch.Generator().manual_seed(10)) + 0.1
    yw = torch.rand(1, 6, generator=torch.Generator().manual_seed(11)) + 0.1
    with K.settings(block=16, block_k=16, block_d=16):
        for estimator in ("biased", "unbiased"):
            compare_mmd("laplacian", estimator, x, y, xw=xw, yw=yw, need=("x", "xw", "yw"))


@interp
def test_batch_with_padding_equals_separate_sets(K):
    """One launch for the batch; zero-weight padding rows change nothing."""
    x, y = cells(3, 8, 6, 12), cells(3, 7, 6, 13)
    xw = torch.ones(3, 8)
    xw[1, 5:] = 0.0
    with K.settings(block=16, block_k=16, block_d=16):
        batched = compare_mmd("rbf", "unbiased", x, y, xw=xw)
        alone = mmd(x[1, :5], y[1], "rbf", BANDWIDTHS, "unbiased", backend="triton")
    assert torch.allclose(batched[1], alone, rtol=1e-5, atol=1e-7)


@interp
def test_non_contiguous_inputs(K):
    x = cells(1, 6, 9, 14)[0].t().contiguous().t()  # [6, 9] with transposed strides
    y = cells(1, 9, 10, 15)[0, :, ::2].t()           # [5, 9] strided view
    assert not x.is_contiguous() and not y.is_contiguous()
    with K.settings(block=16, block_k=16, block_d=16):
        compare_mmd("imq", "biased", x, y)


@interp
def test_deterministic(K):
    x, y = cells(2, 12, 11, 16), cells(2, 9, 11, 17)
    with K.settings(block=16, block_k=16):
        a = mmd(x, y, "energy", backend="triton")
        b = mmd(x, y, "energy", backend="triton")
    assert torch.equal(a, b)


@interp
@settings(max_examples=5, deadline=None)
@given(n=st.integers(2, 20), m=st.integers(2, 20), G=st.integers(1, 40), B=st.integers(1, 2),
       kernel=st.sampled_from(KERNELS), estimator=st.sampled_from(["biased", "unbiased"]),
       seed=st.integers(0, 2**16))
def test_mmd_random_shapes(K, n, m, G, B, kernel, estimator, seed):
    x, y = cells(B, n, G, seed), cells(B, m, G, seed + 1, offset=4.2)
    with K.settings(block=32, block_k=16, block_d=16):
        compare_mmd(kernel, estimator, x, y)


@interp
def test_fp16_inputs_use_the_low_precision_dot(K):
    """fp16 takes the tensor-core branch (the interpreter cannot do bf16); the oracle sees the same
    rounded inputs, so only the fp16 products of centred values add error."""
    x, y = cells(1, 10, 12, 18), cells(1, 8, 12, 19)
    xw, yw = torch.full((1, 10), 0.1), torch.full((1, 8), 0.125)
    center = torch.cat([x, y], 1).mean(1)
    with K.settings(block=16, block_k=16):
        got = torch.ops.perturbdiff.triton_pairwise_block_sums(
            x.half(), y.half(), xw, yw, center, "rbf", BANDWIDTHS, False, "ieee")
    z = torch.cat([x.half(), y.half()], 1).double() - center.double()[:, None]
    w = torch.cat([xw, yw], 1).double()
    k = reference.radial("rbf", reference.sqdist(z, z, True), BANDWIDTHS)
    wk = w[:, :, None] * k * w[:, None]
    want = torch.stack([wk[:, :10, :10].sum((1, 2)), wk[:, :10, 10:].sum((1, 2)),
                        wk[:, 10:, 10:].sum((1, 2))], 1)
    assert torch.allclose(got, want, rtol=2e-3, atol=0)


@interp
@pytest.mark.parametrize("kernel", ["rbf", "energy"])
def test_kme_matches_reference(K, kernel):
    x, z = cells(2, 13, 19, 20), cells(2, 11, 19, 21, offset=4.4)
    xw = torch.rand(2, 13, generator=torch.Generator().manual_seed(22))
    xw[1, :4] = 0.0
    probe = torch.randn(2, 11, generator=torch.Generator().manual_seed(23))  # upstream gradient

    def run(backend, dtype):
        t = [v.detach().to(dtype).requires_grad_() for v in (x, z, xw)]
        out = kme(t[0], t[1], kernel, BANDWIDTHS, x_weights=t[2], backend=backend)
        return out, torch.autograd.grad((out * probe.to(dtype)).sum(), t)

    with K.settings(block=16, block_k=16, block_d=16):
        out, grads = run("triton", torch.float32)
    ref, ref_grads = run("torch", torch.float64)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, g, r in zip(("x", "z", "x_weights"), grads, ref_grads):
        assert ((g.double() - r).norm() / r.norm()).item() <= 1e-4, name


@interp
def test_opcheck_every_op(K):
    x, y = cells(1, 5, 6, 24), cells(1, 4, 6, 25)
    xw, yw = torch.rand(1, 5) + 0.1, torch.rand(1, 4) + 0.1
    center = torch.cat([x, y], 1).mean(1)
    ops = torch.ops.perturbdiff
    with K.settings(block=16, block_k=16, block_d=16):
        torch.library.opcheck(ops.triton_pairwise_block_sums, (
            x.requires_grad_(), y, xw.requires_grad_(), yw, center, "laplacian", BANDWIDTHS, True,
            "ieee"))
        torch.library.opcheck(ops.triton_kme, (x, xw, y.requires_grad_(), center, "imq", BANDWIDTHS,
                                               "ieee"))
        coef = torch.rand(1, 4)
        torch.library.opcheck(ops.triton_radial_backward, (
            x.detach(), y.detach(), x.detach(), y.detach(), xw.detach(), yw, xw.detach(), yw, coef,
            center, "rbf", BANDWIDTHS, True, False, 4.0, 2.0, True, False, True, True, "ieee"))


@interp
def test_torch_compile_fullgraph(K):
    x, y = cells(1, 7, 5, 26)[0].requires_grad_(), cells(1, 6, 5, 27)[0]
    loss = torch.compile(lambda a, b: api.energy_distance(a, b, backend="triton"),
                         backend="aot_eager", fullgraph=True)
    with K.settings(block=16, block_k=16, block_d=16):
        got = loss(x, y)
        (gx,) = torch.autograd.grad(got, [x])
        want = api.energy_distance(x, y, backend="triton")
        (wx,) = torch.autograd.grad(want, [x])
    assert torch.allclose(got, want) and torch.allclose(gx, wx)


@interp
def test_op_rejects_bad_arguments(K):
    x = cells(1, 5, 6, 28)
    w, c = torch.ones(1, 5), torch.zeros(1, 6)
    op = torch.ops.perturbdiff.triton_pairwise_block_sums
    with pytest.raises(RuntimeError, match="xw must be float32"):
        op(x, x, w.double(), w, c, "rbf", [1.0], False, "ieee")
    with pytest.raises(RuntimeError, match="y must be"):
        op(x, x[:, :, :3], w, w, c, "rbf", [1.0], False, "ieee")


# --------------------------------------------------------------------------- GPU checks


def gene_scaled(factors, G):
    """Bandwidths on the scale of the typical distance (sqrt(2 G) for unit-variance genes), so
    the RBF kernel is not ~0 off the diagonal at hundreds of genes."""
    return [f * (2 * G) ** 0.5 for f in factors]


@gpu
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_gpu_fp32_matches_reference(K, kernel, estimator, precision):
    x, y = cells(4, 150, 300, 30, device="cuda"), cells(4, 130, 300, 31, offset=4.2, device="cuda")
    xw = torch.rand(4, 150, device="cuda")
    xw[2, 100:] = 0.0
    with K.settings(precision=precision):
        compare_mmd(kernel, estimator, x, y, xw=xw, bandwidths=gene_scaled([0.7, 1.5], 300))


@gpu
@pytest.mark.parametrize("kernel", ["rbf", "energy"])
def test_gpu_tf32_and_bf16_within_loss_tolerances(K, kernel):
    x = cells(4, 128, 2000, 32, device="cuda")
    y = cells(4, 128, 2000, 33, offset=4.1, device="cuda")
    bandwidths = gene_scaled([0.7, 1.5], 2000)
    with K.settings(precision="tf32"):
        compare_mmd(kernel, "biased", x, y, value_tol=1e-3, grad_tol=2e-2, bandwidths=bandwidths)
    xb, yb = x.bfloat16(), y.bfloat16()
    compare_mmd(kernel, "biased", xb, yb, value_tol=1e-2, grad_tol=5e-2, bandwidths=bandwidths,
                oracle_inputs={"x": xb.double(), "y": yb.double(), "xw": None, "yw": None})


@gpu
def test_gpu_tile_tails_and_small_gene_counts(K):
    for n, m, G in ((1, 70, 5), (65, 63, 33), (129, 3, 17)):
        compare_mmd("energy", "biased", cells(2, n, G, n, device="cuda"),
                    cells(2, m, G, m + 1, device="cuda"))


@gpu
def test_gpu_kme_and_opcheck(K):
    x, z = cells(2, 200, 500, 34, device="cuda"), cells(2, 70, 500, 35, device="cuda")
    xw = torch.rand(2, 200, device="cuda")
    bandwidths = gene_scaled([0.5, 1.0], 500)
    xs, zs = x.double().requires_grad_(), z.double().requires_grad_()
    ref = kme(xs, zs, "rbf", bandwidths, x_weights=xw.double(), backend="torch")
    xt, zt = x.clone().requires_grad_(), z.clone().requires_grad_()
    out = kme(xt, zt, "rbf", bandwidths, x_weights=xw, backend="triton")
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    grads = torch.autograd.grad(out.sum(), [xt, zt])
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), [xs, zs])):
        assert ((g.double() - r).norm() / r.norm()).item() <= 1e-4
    center = torch.cat([x, z], 1).mean(1)
    w = torch.ones(2, 70, device="cuda")
    torch.library.opcheck(torch.ops.perturbdiff.triton_pairwise_block_sums, (
        x.requires_grad_(), z, xw, w, center, "energy", [1.0], False, "ieee"))
    torch.library.opcheck(torch.ops.perturbdiff.triton_kme,
                          (x, xw, z, center, "rbf", bandwidths, "ieee"))


@gpu
def test_gpu_torch_compile_inductor(K):
    x = cells(8, 64, 512, 36, device="cuda").requires_grad_()
    y = cells(8, 64, 512, 37, device="cuda")
    loss = torch.compile(lambda a, b: api.energy_distance(a, b, backend="triton").mean(),
                         fullgraph=True)
    got = loss(x, y)
    (gx,) = torch.autograd.grad(got, [x])
    want = api.energy_distance(x, y, backend="triton").mean()
    (wx,) = torch.autograd.grad(want, [x])
    assert torch.allclose(got, want, rtol=1e-5) and torch.allclose(gx, wx, rtol=1e-4, atol=1e-9)


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="compiles the kernels with triton's own compiler")
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_compile_with_the_scalar_types_torch_compile_passes(kernel):
    """Inductor hands a user kernel's Python floats over as fp64 scalars (a launch from Python gives
    fp32); that once turned W into an fp64 tile that tl.dot refused next to the fp32 one. Triton
    compiles for sm_90 without a GPU (its wheel brings ptxas), so this runs everywhere."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from perturbdiff.kernels import kme as kme_kernels, pairwise

    ints = {"n", "m", "Q", "G", "n1", "n2", "m1", "m2", "row0", "row1"}
    floats = {"factor_z", "factor_w", "CLAMP"}  # the Python floats of the launches
    common = dict(KERNEL=pairwise.KERNEL_IDS[kernel], NB=2, CLAMP=reference.SQRT_CLAMP, PRECISION="ieee",
                  LOWP=False, BLOCK_K=32)
    cases = [(pairwise._radial_bwd_kernel, dict(SAME=True, EXCLUDE_SELF=False, NEED_Z=True, NEED_W=True,
                                                BLOCK_R=64, BLOCK_C=64, BLOCK_D=64)),
             (pairwise._mmd_fwd_kernel, dict(EXCLUDE_DIAG=True, BLOCK=64)),
             (kme_kernels._kme_fwd_kernel, dict(BLOCK_N=64, BLOCK_Q=64))]
    for fn, constants in cases:
        constants = {**common, **constants}
        signature, constexprs = {}, {}
        for i, param in enumerate(fn.params):
            if param.is_constexpr:
                signature[param.name], constexprs[(i,)] = "constexpr", constants[param.name]
            else:
                signature[param.name] = ("i32" if param.name in ints else "fp64" if param.name in floats
                                         else "*fp32")
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
        assert "xf64>" not in ttir, fn.__name__  # no tile computed in fp64
