"""`perturbdiff synth`: stream a synthetic perturbation screen (raw counts) to an h5ad."""
from __future__ import annotations

import argparse

HELP = "write a synthetic perturbation screen with known effects (raw NB counts) as .h5ad"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output .h5ad")
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=50)
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=None, help="cells per written chunk")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes generating chunks (output is identical for any count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .synthetic import OBS_KEYS, CONTROL, write_screen

    path = write_screen(args.out, n_cells=args.cells, n_genes=args.genes,
                        n_perturbations=args.perturbations, n_contexts=args.contexts,
                        n_batches=args.batches, seed=args.seed, chunk_size=args.chunk_size,
                        workers=args.workers,
                        progress=not args.quiet)
    print(f"wrote {path}: {args.cells} cells x {args.genes} genes; obs keys "
          f"{OBS_KEYS['perturbation']!r} / {OBS_KEYS['context']!r} / {OBS_KEYS['batch']!r}, "
          f"control label {CONTROL!r}; ground truth in .uns['synthetic']")
    return 0
