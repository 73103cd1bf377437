"""`perturbdiff evaluate`: score a prediction (and optional baselines) against real cells."""

from __future__ import annotations

import argparse

from ..heap import keep_freed_memory
from .catalog import PROFILES
from .evaluator import evaluate
from .inputs import InputError

HELP = "score predicted cells against real cells (cell-eval metrics, R^2, MMD) and write a report"


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PRED.h5ad, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="predicted cells (.h5ad, with real controls)")
    parser.add_argument("--real", required=True, help="real test cells (.h5ad)")
    parser.add_argument("--pert-key", required=True, help="obs column with perturbation labels")
    parser.add_argument("--control-label", required=True, help="label of control cells")
    parser.add_argument("--context-key", default=None,
                        help="obs column (cell type / line): evaluate each context separately")
    parser.add_argument("--baseline", action="append", default=[], type=_named_path,
                        metavar="NAME=PRED.h5ad", help="baseline prediction to compare and "
                        "score against (repeatable)")
    parser.add_argument("--name", default="model", help="name of the prediction in the report")
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument("--target-exclusion", default="components",
                        choices=["components", "exact"], help="gene columns hidden from the "
                        "discrimination score: 'exact' = the column named like the label "
                        "(cell-eval), 'components' = also each part of 'A+B'")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="give memory freed between blocks back to the system (glibc's default); "
                        "by default the command keeps it, which saves the page faults of every block "
                        "(~10%% of the CPU time) and holds the RSS at its peak")


def run(args: argparse.Namespace) -> int:
    if not args.release_freed_memory:
        keep_freed_memory()
    preds = {args.name: args.pred}
    for name, path in args.baseline:
        if name in preds:
            raise SystemExit(f"error: duplicate prediction name {name!r}")
        preds[name] = path
    try:
        results = {
            name: evaluate(path, args.real, args.pert_key, args.control_label,
                           context_key=args.context_key, profile=args.profile,
                           device=args.device, progress=not args.no_progress,
                           target_exclusion=args.target_exclusion)
            for name, path in preds.items()}
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    from .report import write_report  # matplotlib: not needed for --help or bad arguments

    out = write_report(results, args.out, args.real, preds,
                       baselines=[n for n, _ in args.baseline])
    agg = results[args.name].agg.set_index("statistic").loc["mean"]
    print(f"wrote {out}/report.md")
    for metric in ("r2", "pearson_delta", "mae", "discrimination_score_l1", "overlap_at_N"):
        if metric in agg:
            print(f"  {metric:26s} {agg[metric]:.4f}")
    return 0
