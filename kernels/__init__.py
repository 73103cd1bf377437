"""Triton kernels of perturbdiff (installed as ``perturbdiff.kernels``).

Importing this package needs triton. The kernels run on NVIDIA GPUs, or on the CPU under
``TRITON_INTERPRET=1`` (fp32 only, slow: for tests). ``perturbdiff.ops`` registers them as the
"triton" backend; :func:`settings` tunes them.
"""

import contextlib
import dataclasses

from .kme import kme_forward
from .pairwise import INTERPRETED, KERNEL_IDS, mmd_block_sums, radial_backward

PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclasses.dataclass(frozen=True)
class Settings:
    # tl.dot input precision for fp32 operands: "ieee" (exact fp32 products; statistics), "tf32x3"
    # (about fp32 accuracy at tensor-core speed) or "tf32" (fast, ~1e-3 relative: losses only).
    # fp16/bf16 inputs always use their native tensor-core dot.
    precision: str = "ieee"
    block: int = 64  # cells per Gram tile side
    # genes per K step; FlashSinkhorn saw miscompiles when one K step covers all genes with
    # BLOCK_K > 32, so stay at or below 32
    block_k: int = 32
    block_d: int = 64  # genes per chunk of the backward's read-modify-write of its output rows

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("block", "block_k", "block_d"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):  # tl.dot needs power-of-two tiles of at least 16
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")


_current = Settings()


def get_settings() -> Settings:
    return _current


def configure(**overrides) -> Settings:
    """Change the kernel settings for the rest of the process; returns the new settings."""
    global _current
    _current = dataclasses.replace(_current, **overrides)
    return _current


@contextlib.contextmanager
def settings(**overrides):
    """Temporarily change the kernel settings, e.g. ``with settings(precision="tf32x3"): ...``.

    Read when an op runs (or, under torch.compile, when it is traced).
    """
    global _current
    previous = _current
    try:
        yield configure(**overrides)
    finally:
        _current = previous


__all__ = ["Settings", "get_settings", "configure", "settings", "mmd_block_sums", "radial_backward",
           "kme_forward", "INTERPRETED", "KERNEL_IDS", "PRECISIONS"]
