"""The compiled extension and the package layout: what `pip install` must have produced."""

import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perturbdiff
from perturbdiff.ops import _backends, _cpp, api

ROOT = Path(__file__).resolve().parents[1]

# The op contract between csrc/ops.cpp and perturbdiff/ops/_cpp.py.
SCHEMAS = {
    "pairwise_mmd": "perturbdiff::pairwise_mmd(Tensor x, Tensor y, Tensor xw, Tensor yw, Tensor coef, "
                    "Tensor center, str kernel, float[] bandwidths, bool exclude_diag, "
                    "bool save_weights=False) -> (Tensor, Tensor)",
    "pairwise_mmd_backward": "perturbdiff::pairwise_mmd_backward(Tensor grad, Tensor x, Tensor y, Tensor xw, "
                             "Tensor yw, Tensor coef, Tensor center, str kernel, float[] bandwidths, "
                             "bool exclude_diag, Tensor saved, bool need_x, bool need_y) -> (Tensor, Tensor)",
    "kme": "perturbdiff::kme(Tensor x, Tensor xw, Tensor z, Tensor center, str kernel, float[] bandwidths) "
           "-> Tensor",
    "kme_backward": "perturbdiff::kme_backward(Tensor grad, Tensor x, Tensor xw, Tensor z, Tensor center, "
                    "str kernel, float[] bandwidths, bool need_x, bool need_z) -> (Tensor, Tensor)",
    # the evaluator's CPU kernels
    "rank_sum": "perturbdiff::rank_sum(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor seg_start, "
                "Tensor ctrl_sorted) -> (Tensor, Tensor)",
    "within_distance": "perturbdiff::within_distance(Tensor ptr, Tensor idx, Tensor val, Tensor dense, "
                       "Tensor offsets, Tensor split, int cols, str[] kernels, float[] bandwidths) "
                       "-> (Tensor, Tensor, Tensor)",
    "distance_to": "perturbdiff::distance_to(Tensor ptr, Tensor idx, Tensor val, Tensor dense, Tensor sq, "
                   "Tensor ref_ptr, Tensor ref_idx, Tensor ref_val, Tensor ref_dense, Tensor ref_sq) -> Tensor",
    "split_columns": "perturbdiff::split_columns(Tensor ptr, Tensor idx, Tensor val, Tensor position, "
                     "int dense_cols) -> (Tensor, Tensor, Tensor, Tensor)",
    "de_metrics": "perturbdiff::de_metrics(Tensor fdr_real, Tensor lfc_real, Tensor fdr_pred, Tensor lfc_pred, "
                  "float fdr_threshold, int[] top_k) -> Tensor",
    "group_sums": "perturbdiff::group_sums(Tensor ptr, Tensor idx, Tensor val, Tensor rows, Tensor offsets, "
                  "int cols) -> Tensor",
}


def test_extension_loads():
    assert perturbdiff.has_extension(), (
        f"perturbdiff._C did not load ({perturbdiff.extension_error()}); "
        "build it with `pip install --no-build-isolation -e .`")


needs_extension = pytest.mark.skipif(not perturbdiff.has_extension(), reason="perturbdiff._C is not built")


@needs_extension
@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_ops_have_cpu_kernels_and_expected_schemas(op):
    assert str(getattr(torch.ops.perturbdiff, op).default._schema) == SCHEMAS[op]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"perturbdiff::{op}", "CPU")


@needs_extension
def test_backend_functions_follow_the_api_calling_convention():
    # api.py calls fn(x, y, xw, yw, coef, center, kernel, bandwidths, exclude_diag) and
    # fn(x, xw, z, center, kernel, bandwidths); the op schemas take the same leading arguments.
    pairwise = list(inspect.signature(_cpp.pairwise_mmd).parameters)
    assert pairwise == ["x", "y", "xw", "yw", "coef", "center", "kernel", "bandwidths", "exclude_diag"]
    assert pairwise == [a.name for a in torch.ops.perturbdiff.pairwise_mmd.default._schema.arguments][:9]
    kme = list(inspect.signature(_cpp.kme).parameters)
    assert kme == [a.name for a in torch.ops.perturbdiff.kme.default._schema.arguments]
    assert "cpu" in _backends.available_backends()
    api.mmd(torch.randn(5, 3), torch.randn(4, 3), backend="auto")
    assert api.last_backend() == "cpu"


@needs_extension
def test_build_info_reports_what_was_compiled():
    info = json.loads(torch.ops.perturbdiff.build_info())
    assert info["cpu"] is True
    assert info["torch"] == torch.__version__
    cuda_registered = torch._C._dispatch_has_kernel_for_dispatch_key("perturbdiff::pairwise_mmd", "CUDA")
    assert info["cuda"] is cuda_registered
    assert bool(info["cuda_archs"]) is cuda_registered


# Run in a fresh interpreter: an import hook makes perturbdiff._C unimportable, as on a machine
# where the build failed or was skipped.
_HIDDEN_EXTENSION = """
import importlib.abc, sys, warnings

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "perturbdiff._C":
            raise ImportError("hidden by the test")
        return None

sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import perturbdiff
import torch
from perturbdiff.ops import available_backends, last_backend, mmd
assert not perturbdiff.has_extension()
assert any("hidden by the test" in str(w.message) for w in caught), [str(w.message) for w in caught]
# the compiled backends are gone; Triton (no extension needed) stays where a GPU has it
assert available_backends("cpu") == ["torch"], available_backends()
assert not {"cpu", "cuda"} & set(available_backends()), available_backends()
x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
value = mmd(x, torch.randn(5, 4, dtype=torch.float64), kernel="energy")
value.backward()
assert last_backend() == "torch" and x.grad is not None
print("fallback ok")
"""


def test_pure_torch_fallback_when_extension_is_hidden():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _HIDDEN_EXTENSION], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def _installed() -> bool:
    try:
        importlib.metadata.distribution("perturbdiff")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="perturbdiff is not pip-installed (PYTHONPATH checkout)")
def test_triton_kernels_ship_as_perturbdiff_kernels():
    kernels = importlib.import_module("perturbdiff.kernels")
    assert Path(kernels.__file__).resolve().parent.name == "kernels"
    assert importlib.metadata.distribution("perturbdiff").version == perturbdiff.__version__


@needs_extension
def test_fakes_are_skipped_for_ops_a_build_lacks():
    """A build older than the sources (no rebuild after a pull) still imports: the newest ops'
    fakes are not registered, and their callers (the evaluator) check has_kernel first."""
    from perturbdiff.ops._cpp import _fake

    def fn(x):
        return x

    assert _fake("no_such_op")(fn) is fn
    with pytest.raises(RuntimeError, match="does not exist"):
        torch.library.register_fake("perturbdiff::no_such_op")(fn)


@needs_extension
def test_has_kernel_checks_the_arguments_a_caller_needs():
    """A build whose op predates the sources' arguments reads as lacking the kernel, so callers
    fall back instead of passing arguments it would misread."""
    from perturbdiff._extension import has_kernel

    assert has_kernel("within_distance", args=("split", "kernels"))
    assert has_kernel("rank_sum", args=("row_ptr",))
    assert not has_kernel("rank_sum", args=("col_ptr",))  # the CSC kernel of earlier builds
    assert not has_kernel("no_such_op")
