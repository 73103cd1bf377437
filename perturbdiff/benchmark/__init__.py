"""Side-by-side kernel benchmark: every perturbdiff backend against what a user would otherwise
run (naive torch, norm-expansion torch, torch.compile, geomloss, pykeops) and against the GEMM roof
(the same matrix products with no epilogue). ``perturbdiff bench`` drives it.

Modules: ``cases`` (what is measured, inputs), ``flops`` (algorithmic FLOP counts),
``oracle`` (fp64 reference values), ``anchors`` (the implementations), ``memory`` (peak extra
memory), ``runner`` (timing in one worker process per case), ``report`` (JSON, markdown, plots),
``gpu`` (GPU validation).
"""

from .cases import Case, full_cases, quick_cases
from .runner import run_cases

__all__ = ["Case", "full_cases", "quick_cases", "run_cases"]
