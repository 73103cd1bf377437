"""Loads the compiled extension ``perturbdiff._C`` once; the package works without it."""

import warnings

import torch  # noqa: F401  (the extension links against libtorch: import it first)

_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the perturbdiff:: dispatcher ops)
except ImportError as exc:  # not built, or built against another torch
    _ERROR = exc
    warnings.warn(
        f"perturbdiff._C is not available ({exc}); the compiled CPU/CUDA kernels are disabled and "
        "the pure-torch backend is used. Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    return _ERROR is None


def has_kernel(op: str, dispatch_key: str = "CPU") -> bool:
    """Whether the extension registered a ``dispatch_key`` kernel for ``perturbdiff::<op>`` (an
    older build may lack the op altogether)."""
    return (_ERROR is None and hasattr(torch.ops.perturbdiff, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"perturbdiff::{op}", dispatch_key))


def extension_error():
    """The ImportError that stopped ``perturbdiff._C`` from loading, or None."""
    return _ERROR
