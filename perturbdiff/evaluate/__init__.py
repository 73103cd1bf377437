"""Evaluation of predicted cell populations: cell-eval-compatible metrics computed with
vectorised torch code, baselines, VCC-style scoring and a report with plots."""

from .aggregate import describe, score_tables
from .catalog import ALL_METRICS, BEST_VALUE, PROFILES
from .evaluator import EvalResult, evaluate
from .inputs import InputError

__all__ = ["ALL_METRICS", "BEST_VALUE", "PROFILES", "EvalResult", "InputError", "describe",
           "evaluate", "score_tables"]
