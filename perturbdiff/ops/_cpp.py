"""C++ backends (perturbdiff._C): registered when the extension is built.

The kernels are dispatcher ops (``torch.ops.perturbdiff.*``, schemas in csrc/ops.cpp). This module
gives them fake (meta) implementations and autograd formulas, so ``torch.compile(fullgraph=True)``
and ``torch.library.opcheck`` see through them, and registers the backends "cpu" and "cuda" with
the functions ``api.py`` calls.
"""

import torch

from .. import _extension
from . import _backends

# The forward keeps the [B, N, N] Laplacian of c w w f'(D) for the backward (saving the Gram recompute,
# a third of the work) when it is no larger than the inputs (N <= genes) and below this many elements.
SAVE_MAX_ELEMENTS = 1 << 27

_FLOAT_TYPES = (torch.float32, torch.float64)


def _check_differentiable_inputs(op: str, **tensors) -> None:
    if torch.is_grad_enabled():
        needing = [name for name, t in tensors.items() if t.requires_grad]
        if needing:
            raise ValueError(f"the compiled {op} differentiates the cells only, but {needing} require "
                             "gradients; use backend='torch' to differentiate the weights")


def pairwise_mmd(x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag):
    """Backend function for ``api.py``: the fused block reduction, [B]."""
    _check_differentiable_inputs("pairwise_mmd", x_weights=xw, y_weights=yw, coef=coef, center=center)
    B, N = x.shape[0], x.shape[1] + y.shape[1]
    save = (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
            and N <= x.shape[2] and B * N * N <= SAVE_MAX_ELEMENTS)
    value, _ = torch.ops.perturbdiff.pairwise_mmd(x, y, xw, yw, coef, center, kernel, list(bandwidths),
                                                  exclude_diag, save)
    return value


def kme(x, xw, z, center, kernel, bandwidths):
    """Backend function for ``api.py``: weighted kernel mean embedding at the query points, [B, Q]."""
    _check_differentiable_inputs("kme", x_weights=xw, center=center)
    return torch.ops.perturbdiff.kme(x, xw, z, center, kernel, list(bandwidths))


def _fake(op: str):
    """``register_fake`` for ``perturbdiff::<op>`` when this build defines it: a build older than
    the sources may lack the newest evaluator ops, and their callers check ``has_kernel`` first."""
    if hasattr(torch.ops.perturbdiff, op):
        return torch.library.register_fake(f"perturbdiff::{op}")
    return lambda fn: fn


def _register_op_meta() -> None:
    @_fake("pairwise_mmd")
    def _(x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag, save_weights=False):
        B, N = x.shape[0], x.shape[1] + y.shape[1]
        return x.new_empty(B), x.new_empty((B if save_weights else 0, N, N))

    @_fake("pairwise_mmd_backward")
    def _(grad, x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag, saved, need_x, need_y):
        return (torch.empty_like(x) if need_x else x.new_empty(0),
                torch.empty_like(y) if need_y else y.new_empty(0))

    @_fake("rank_sum")
    def _(row_ptr, col_idx, values, seg_start, ctrl_sorted):
        shape = (seg_start.shape[0] - 1, ctrl_sorted.shape[0])
        return ctrl_sorted.new_empty(shape), ctrl_sorted.new_empty(shape)

    @_fake("de_metrics")
    def _(fdr_real, lfc_real, fdr_pred, lfc_pred, fdr_threshold, top_k):
        return fdr_real.new_empty(2 * (len(top_k) + 1) + 7, fdr_real.shape[0])

    @_fake("split_columns")
    def _(ptr, idx, val, position, dense_cols):
        kept = torch.library.get_ctx().new_dynamic_size()
        return (torch.empty_like(ptr), idx.new_empty(kept), val.new_empty(kept),
                val.new_empty(ptr.shape[0] - 1, dense_cols))

    @_fake("group_sums")
    def _(ptr, idx, val, rows, offsets, cols):
        return val.new_empty(offsets.shape[0] - 1, cols, dtype=torch.float64)

    @_fake("distance_to")
    def _(ptr, idx, val, dense, sq, ref_ptr, ref_idx, ref_val, ref_dense, ref_sq):
        return val.new_empty(ptr.shape[0] - 1)

    @_fake("within_distance")
    def _(ptr, idx, val, dense, offsets, split, cols, kernels, bandwidths):
        segments = offsets.shape[0] - 1
        return (val.new_empty(2, segments), val.new_empty(ptr.shape[0] - 1),
                val.new_empty(len(kernels), 3, segments))

    @_fake("kme")
    def _(x, xw, z, center, kernel, bandwidths):
        return x.new_empty(x.shape[0], z.shape[1])

    @_fake("kme_backward")
    def _(grad, x, xw, z, center, kernel, bandwidths, need_x, need_z):
        return (torch.empty_like(x) if need_x else x.new_empty(0),
                torch.empty_like(z) if need_z else z.new_empty(0))

    def pairwise_setup(ctx, inputs, output):
        x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag, _save = inputs
        ctx.save_for_backward(x, y, xw, yw, coef, center, output[1])
        ctx.args = (kernel, bandwidths, exclude_diag)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled [B, N, N] gradient for the saved matrix

    def pairwise_backward(ctx, grad_value, _grad_saved):
        if grad_value is None:  # grads are not materialised: nothing flows into the value
            return (None,) * 10
        x, y, xw, yw, coef, center, saved = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        gx, gy = torch.ops.perturbdiff.pairwise_mmd_backward(
            grad_value, x, y, xw, yw, coef, center, *ctx.args, saved, need_x, need_y)
        return (gx if need_x else None, gy if need_y else None) + (None,) * 8

    torch.library.register_autograd("perturbdiff::pairwise_mmd", pairwise_backward,
                                    setup_context=pairwise_setup)

    def kme_setup(ctx, inputs, output):
        x, xw, z, center, kernel, bandwidths = inputs
        ctx.save_for_backward(x, xw, z, center)
        ctx.args = (kernel, bandwidths)

    def kme_backward(ctx, grad):
        x, xw, z, center = ctx.saved_tensors
        need_x, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx, gz = torch.ops.perturbdiff.kme_backward(grad, x, xw, z, center, *ctx.args, need_x, need_z)
        return gx if need_x else None, None, gz if need_z else None, None, None, None

    torch.library.register_autograd("perturbdiff::kme", kme_backward, setup_context=kme_setup)


def _register_backends() -> None:
    ops = {"pairwise_mmd": pairwise_mmd, "kme": kme}
    if _extension.has_kernel("pairwise_mmd", "CPU") and _extension.has_kernel("kme", "CPU"):
        _backends.register(_backends.Backend("cpu", "cpu", ops, dtypes=_FLOAT_TYPES, priority=10))
    if _extension.has_kernel("pairwise_mmd", "CUDA") and _extension.has_kernel("kme", "CUDA"):
        # Above triton (20) for fp32/fp64: on an H200 (BENCHMARKS.md, GPU) cuBLAS Grams + this epilogue
        # ran the energy loss 2.2-9.3x faster than the Triton kernels; triton keeps fp16/bf16.
        _backends.register(_backends.Backend("cuda", "cuda", ops, dtypes=_FLOAT_TYPES, priority=30))


if _extension.has_extension():
    _register_op_meta()
    _register_backends()
