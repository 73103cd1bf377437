"""PerturbDiff network: Cross-DiT backbone (`crossdit`), covariate encoder (`covariates`),
the combined denoiser (`denoiser`) and checkpoint I/O (`checkpoint`)."""

from .covariates import CovariateEncoder, load_embedding_table
from .crossdit import CrossDiT
from .denoiser import PerturbDiffModel, build_from_state, build_model

__all__ = ["CrossDiT", "CovariateEncoder", "PerturbDiffModel", "build_model", "build_from_state",
           "load_embedding_table"]
