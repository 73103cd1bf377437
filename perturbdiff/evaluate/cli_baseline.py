"""`perturbdiff baseline`: write a baseline prediction in the evaluator's h5ad format."""

from __future__ import annotations

import argparse

from ..atomic import write_atomic
from .baselines import KINDS, make_baseline
from .inputs import InputError, load_anndata

HELP = "write a baseline prediction (control/perturbation/context mean, linear) as h5ad"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="training cells (.h5ad) to fit on")
    parser.add_argument("--real", required=True,
                        help="real test cells (.h5ad): groups, cell counts and controls")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--pert-key", required=True)
    parser.add_argument("--control-label", required=True)
    parser.add_argument("--context-key", default=None)
    parser.add_argument("--ridge-lambda", type=float, default=1.0,
                        help="ridge penalty of the linear baseline")
    parser.add_argument("--out", required=True, help="output .h5ad")


def run(args: argparse.Namespace) -> int:
    try:
        pred = make_baseline(args.kind, load_anndata(args.train, "train"),
                             load_anndata(args.real, "real"), args.pert_key,
                             args.control_label, args.context_key, args.ridge_lambda)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    write_atomic(args.out, lambda p: pred.write_h5ad(p))
    print(f"wrote {args.out}: {pred.n_obs} cells x {pred.n_vars} genes ({args.kind})")
    return 0
