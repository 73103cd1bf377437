"""Backend registry: which implementations of the kernel ops exist in this process.

Each backend module registers itself at import time with the functions it provides; ``resolve``
picks one for a tensor (``backend="auto"``) or validates an explicit choice.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference


@dataclass
class Backend:
    name: str
    device_type: str | None  # None: any device
    ops: dict[str, Callable] = field(default_factory=dict)
    dtypes: tuple = (torch.float32, torch.float64)
    priority: int = 0  # higher wins under "auto"

    def supports(self, t: torch.Tensor) -> bool:
        return (self.device_type is None or t.device.type == self.device_type) and t.dtype in self.dtypes


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available_backends(device=None) -> list[str]:
    """Names of the backends usable in this process (built and importable), in ``auto``'s order;
    with ``device``, only those that run tensors on it."""
    _load_optional()
    names = sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)
    if device is None:
        return names
    kind = torch.device(device).type
    return [n for n in names if _REGISTRY[n].device_type in (None, kind)]


def resolve(backend: str, op: str, t: torch.Tensor) -> tuple[str, Callable]:
    _load_optional()
    if backend == "auto":
        for name in available_backends():
            b = _REGISTRY[name]
            if op in b.ops and b.supports(t):
                return name, b.ops[op]
        raise RuntimeError(f"no backend implements {op} for {t.dtype} tensors on {t.device}")
    if backend not in _REGISTRY:
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    b = _REGISTRY[backend]
    if op not in b.ops:
        raise ValueError(f"backend {backend!r} does not implement {op}")
    if not b.supports(t):
        raise ValueError(
            f"backend {backend!r} does not run {t.dtype} tensors on {t.device.type} "
            f"(it takes {[str(d).removeprefix('torch.') for d in b.dtypes]} on {b.device_type or 'any device'})"
        )
    return backend, b.ops[op]


_LOADED = False


def _load_optional() -> None:
    """Import the compiled and Triton backends once; each registers itself if it can run here."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import _cpp, _triton  # noqa: F401


ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the torch reference takes
register(Backend("torch", None, {"pairwise_mmd": reference.pairwise_mmd, "kme": reference.kme},
                 dtypes=ALL_FLOATS, priority=0))
