"""`perturbdiff predict --checkpoint CKPT --split test --out pred.h5ad`: generate test cells."""
from __future__ import annotations

import argparse

HELP = "generate predicted cells for a split and write an h5ad for evaluation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pt written by perturbdiff train")
    parser.add_argument("--split", default="test", help="train | val | test | all (default test)")
    parser.add_argument("--out", required=True, help="prediction h5ad to write")
    parser.add_argument("--real-out", default=None, help="also write the matching real h5ad here")
    parser.add_argument("--store", default=None, help="store to predict on (default: the training store)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance weight w (0 = conditional only)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default from the checkpoint)")
    parser.add_argument("--schedule", choices=("truncated", "strided"), default=None,
                        help="truncated: t = steps-1..0 (authors); strided: steps over the whole schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-cells", type=int, default=None, help="cells per network call")
    parser.add_argument("--raw-weights", action="store_true", help="sample with the raw (non-EMA) weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from .model.checkpoint import CheckpointError
    from .predict import predict

    try:
        out = predict(args.checkpoint, split=args.split, out=args.out, store=args.store,
                      guidance=args.guidance, steps=args.steps, write_real=args.real_out, seed=args.seed,
                      batch_cells=args.batch_cells, schedule=args.schedule, use_ema=not args.raw_weights,
                      device=args.device, progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"perturbdiff predict: {err}")
        return 2
    print(f"wrote {out}" + (f" and {args.real_out}" if args.real_out else ""))
    return 0
