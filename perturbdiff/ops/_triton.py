"""Triton backend: registered when triton imports and a GPU is present.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) it is registered for CPU tensors
instead, below every other backend, so ``backend="auto"`` never picks the (slow) interpreter: it is
there for tests, reached only through ``backend="triton"``.

Dispatcher ops (``torch.ops.perturbdiff.*``), each with a fake implementation:

* ``triton_pairwise_block_sums(x, y, xw, yw, center, kernel, bandwidths, exclude_diag, precision)``
  -> ``[B, 3]`` fp64 (S_xx, S_xy, S_yy), the weighted kernel sums of the three blocks; the MMD is
  ``c_xx S_xx + 2 c_xy S_xy + c_yy S_yy`` (combined in torch, so gradients reach the
  coefficients too). Differentiable in x, y, xw, yw.
* ``triton_kme(x, xw, z, center, kernel, bandwidths, precision)`` -> ``[B, Q]`` fp32.
  Differentiable in x, xw, z.
* ``triton_radial_backward(...)``: the backward of both (see ``kernels/pairwise.py``).
"""

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import _backends


def _device_type() -> str | None:
    """Where the kernels can run in this process, or None."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def _load_kernels():
    try:
        return importlib.import_module("perturbdiff.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "perturbdiff.kernels":
            raise
    # Uninstalled checkout: setup.py maps the repository's kernels/ folder to perturbdiff.kernels.
    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "perturbdiff.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_sets(**sets: Tensor) -> None:
    """Contiguous [B, S, G] tensors that agree with the first one on B, G and dtype."""
    first, ref = next(iter(sets.items()))
    for name, t in sets.items():
        torch._check(t.dim() == 3 and t.shape[0] == ref.shape[0] and t.shape[2] == ref.shape[2],
                     lambda: f"{name} must be [B, S, G] with B, G of {first} {tuple(ref.shape)}, "
                             f"got {tuple(t.shape)}")
        torch._check(t.dtype == ref.dtype, lambda: f"{name} is {t.dtype}, {first} is {ref.dtype}")
        torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def _check_fp32(name: str, t: Tensor, shape) -> None:
    torch._check(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}")
    torch._check(tuple(t.shape) == tuple(shape),
                 lambda: f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def _define_ops(K):
    """Define the dispatcher ops on the kernels package ``K``; returns the backend functions."""

    def define(name, fn):
        if K.INTERPRETED:
            # Interpreted kernels cannot be recorded into a graph (they launch as plain Python), so
            # the op stays opaque to torch.compile; the body serves as the fake: it only launches
            # kernels on real tensors.
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())

    def block_sums(x: Tensor, y: Tensor, xw: Tensor, yw: Tensor, center: Tensor, kernel: str,
                   bandwidths: list[float], exclude_diag: bool, precision: str) -> Tensor:
        _check_sets(x=x, y=y)
        _check_fp32("xw", xw, x.shape[:2])
        _check_fp32("yw", yw, y.shape[:2])
        _check_fp32("center", center, (x.shape[0], x.shape[2]))
        s = K.get_settings()
        return K.mmd_block_sums(x, y, xw, yw, center, kernel, bandwidths, exclude_diag,
                                precision=precision, block=s.block, block_k=s.block_k)

    def radial_backward(r1: Tensor, r2: Tensor, c1: Tensor, c2: Tensor, a1: Tensor, a2: Tensor,
                        s1: Tensor, s2: Tensor, coef: Tensor, center: Tensor, kernel: str,
                        bandwidths: list[float], same: bool, exclude_self: bool, factor_z: float,
                        factor_w: float, need_r1: bool, need_r2: bool, need_z: bool, need_w: bool,
                        precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_sets(r1=r1, r2=r2, c1=c1, c2=c2)
        for name, t, rows in (("a1", a1, r1), ("a2", a2, r2), ("s1", s1, c1), ("s2", s2, c2)):
            _check_fp32(name, t, rows.shape[:2])
        _check_fp32("coef", coef, (r1.shape[0], 4))
        _check_fp32("center", center, (r1.shape[0], r1.shape[2]))
        s = K.get_settings()
        return K.radial_backward(
            r1, r2, c1, c2, a1, a2, s1, s2, coef, center, kernel, bandwidths, same=same,
            exclude_self=exclude_self, factor_z=factor_z, factor_w=factor_w, need_r1=need_r1,
            need_r2=need_r2, need_z=need_z, need_w=need_w, precision=precision, block=s.block,
            block_k=s.block_k, block_d=s.block_d)

    def kme(x: Tensor, xw: Tensor, z: Tensor, center: Tensor, kernel: str,
            bandwidths: list[float], precision: str) -> Tensor:
        _check_sets(x=x, z=z)
        _check_fp32("xw", xw, x.shape[:2])
        _check_fp32("center", center, (x.shape[0], x.shape[2]))
        s = K.get_settings()
        return K.kme_forward(x, xw, z, center, kernel, bandwidths, precision=precision,
                             block=s.block, block_k=s.block_k)

    block_sums_op = define("perturbdiff::triton_pairwise_block_sums", block_sums)
    backward_op = define("perturbdiff::triton_radial_backward", radial_backward)
    kme_op = define("perturbdiff::triton_kme", kme)

    def keep_inputs(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))
        ctx.options = [a for a in inputs if not isinstance(a, Tensor)]

    def block_sums_backward(ctx, gs):
        x, y, xw, yw, center = ctx.saved_tensors
        kernel, bandwidths, exclude_diag, precision = ctx.options
        need_x, need_y, need_xw, need_yw = ctx.needs_input_grad[:4]
        g = gs.to(torch.float32)
        # per-pair coefficients: an X-Y pair appears in both orientations of the symmetric sum
        coef = torch.stack([g[:, 0], 0.5 * g[:, 1], 0.5 * g[:, 1], g[:, 2]], 1)
        gx, gy, gxw, gyw = backward_op(
            x, y, x, y, xw, yw, xw, yw, coef, center, kernel, bandwidths, same=True,
            exclude_self=exclude_diag, factor_z=4.0, factor_w=2.0, need_r1=need_x or need_xw,
            need_r2=need_y or need_yw, need_z=need_x or need_y, need_w=need_xw or need_yw,
            precision=precision)
        return (gx.to(x.dtype) if need_x else None, gy.to(y.dtype) if need_y else None,
                gxw if need_xw else None, gyw if need_yw else None, None, None, None, None, None)

    def kme_backward(ctx, g):
        x, xw, z, center = ctx.saved_tensors
        kernel, bandwidths, precision = ctx.options
        need_x, need_xw, need_z = ctx.needs_input_grad[:3]
        g = g.to(torch.float32).contiguous()
        B, G = x.shape[0], x.shape[2]
        none_rows, none_scale = x.new_empty((B, 0, G)), g.new_empty((B, 0))  # empty 2nd segments
        ones = g.new_ones((B, 4))
        options = dict(same=False, exclude_self=False, factor_z=2.0, factor_w=1.0, need_r1=True,
                       need_r2=False, precision=precision)
        gx = gxw = gz = None
        if need_x or need_xw:  # rows x against columns z, weighted by the upstream gradient
            gx, _, gxw, _ = backward_op(
                x, none_rows, z, none_rows, xw, none_scale, g, none_scale, ones, center, kernel,
                bandwidths, need_z=need_x, need_w=need_xw, **options)
        if need_z:  # rows z against columns x
            gz, _, _, _ = backward_op(
                z, none_rows, x, none_rows, g, none_scale, xw, none_scale, ones, center, kernel,
                bandwidths, need_z=True, need_w=False, **options)
        return (gx.to(x.dtype) if need_x else None, gxw if need_xw else None,
                gz.to(z.dtype) if need_z else None, None, None, None, None)

    block_sums_op.register_autograd(block_sums_backward, setup_context=keep_inputs)
    kme_op.register_autograd(kme_backward, setup_context=keep_inputs)

    def pairwise_mmd(x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag):
        sums = block_sums_op(x.contiguous(), y.contiguous(), xw.float().contiguous(),
                             yw.float().contiguous(), center.float().contiguous(), kernel,
                             [float(b) for b in bandwidths], bool(exclude_diag),
                             K.get_settings().precision)
        weights = coef.to(torch.float64) * coef.new_tensor([1.0, 2.0, 1.0], dtype=torch.float64)
        return (sums * weights).sum(1).to(x.dtype)

    def kme_fn(x, xw, z, center, kernel, bandwidths):
        out = kme_op(x.contiguous(), xw.float().contiguous(), z.contiguous(),
                     center.float().contiguous(), kernel, [float(b) for b in bandwidths],
                     K.get_settings().precision)
        return out.to(x.dtype)

    return {"pairwise_mmd": pairwise_mmd, "kme": kme_fn}


def _register():
    """Register the backend; returns (device type, kernels package), or (None, None)."""
    device_type = _device_type()
    if device_type is None:
        return None, None
    try:
        module = _load_kernels()
    except ImportError as exc:  # e.g. a triton build that does not fit this torch
        warnings.warn(f"the triton backend is disabled: {exc}", RuntimeWarning, stacklevel=2)
        return None, None
    functions = _define_ops(module)
    if device_type == "cpu":  # the interpreter: explicit requests only, fp32 (no bf16 dot there)
        backend = _backends.Backend("triton", "cpu", functions, dtypes=(torch.float32,),
                                    priority=-10)
    else:
        backend = _backends.Backend("triton", "cuda", functions, priority=20,
                                    dtypes=(torch.float32, torch.float16, torch.bfloat16))
    _backends.register(backend)
    return device_type, module


DEVICE_TYPE, kernels = _register()
