"""Loads the compiled extension ``perturbdiff._C`` once; the package works without it."""

import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch  # noqa: F401  (the extension links against libtorch: import it first)

_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the perturbdiff:: dispatcher ops)
except ImportError as exc:  # not built, or built against another torch
    # Python words a missing file as "partially initialized module ... circular import": say so plainly.
    built = any((Path(__file__).parent / f"_C{suffix}").exists() for suffix in EXTENSION_SUFFIXES)
    _ERROR = exc if built else ImportError("the extension is not built (no perturbdiff/_C*.so in the package)")
    warnings.warn(
        f"perturbdiff._C is not available ({_ERROR}); the compiled CPU/CUDA kernels are disabled and "
        "the pure-torch backend is used. Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    return _ERROR is None


def has_kernel(op: str, dispatch_key: str = "CPU", args: tuple[str, ...] = ()) -> bool:
    """Whether the extension registered a ``dispatch_key`` kernel for ``perturbdiff::<op>`` whose
    schema names every argument in ``args`` (a build older than the sources may lack the op
    altogether, or define it with earlier arguments)."""
    if not (_ERROR is None and hasattr(torch.ops.perturbdiff, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"perturbdiff::{op}", dispatch_key)):
        return False
    names = {a.name for a in getattr(torch.ops.perturbdiff, op).default._schema.arguments}
    return set(args) <= names


def extension_error():
    """The ImportError that stopped ``perturbdiff._C`` from loading, or None."""
    return _ERROR
