"""perturbdiff: PerturbDiff (functional diffusion over cell populations) on fused kernels."""

from ._extension import extension_error, has_extension

__version__ = "0.1.0"

__all__ = ["__version__", "has_extension", "extension_error"]
