"""``perturbdiff demo``: the whole workflow with no external data (or on your h5ad)."""

from pathlib import Path

HELP = ("Generate a synthetic perturbation screen, prepare it, train a small PerturbDiff, predict "
        "the held-out (context x perturbation) groups and evaluate them against baselines. With "
        "--h5ad, run the same pipeline on a real dataset instead.")

# Sized to finish in a few minutes on a 2-core CPU; GPUs get a larger run.
SYNTH_CPU = dict(n_cells=5000, n_genes=500, n_perturbations=12, n_contexts=4, n_batches=2)
SYNTH_GPU = dict(n_cells=60000, n_genes=2000, n_perturbations=40, n_contexts=6, n_batches=3)
STEPS_CPU, STEPS_GPU = 8000, 20000


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--h5ad", help="run on this dataset instead of a synthetic screen")
    parser.add_argument("--pert-key", help="obs key of the perturbation (with --h5ad)")
    parser.add_argument("--context-key", help="obs key of the context: cell type/line (with --h5ad)")
    parser.add_argument("--batch-key", help="obs key of the batch (optional)")
    parser.add_argument("--control-label", help="label of control cells (with --h5ad)")
    parser.add_argument("--split", help="split TOML (default: a proposed held-out split)")
    parser.add_argument("--config", default=None,
                        help="training preset or TOML (default: cpu-small)")
    parser.add_argument("--steps", type=int,
                        help=f"training steps (default: {STEPS_CPU} on a CPU, {STEPS_GPU} on a GPU)")
    parser.add_argument("--cells", type=int, help="synthetic screen: number of cells")
    parser.add_argument("--genes", type=int, help="synthetic screen: number of genes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="training config overrides, e.g. model.width=256")


def run(args) -> int:
    import torch

    from .pipeline import run_pipeline

    out = Path(args.out)
    steps = args.steps or (STEPS_GPU if torch.cuda.is_available() else STEPS_CPU)
    overrides = [f"train.max_steps={steps}", *args.overrides]
    if args.h5ad:
        missing = [f"--{k.replace('_', '-')}" for k in ("pert_key", "context_key", "control_label")
                   if not getattr(args, k)]
        if missing:
            raise ValueError(f"--h5ad needs {', '.join(missing)}")
        h5ad, keys = Path(args.h5ad), dict(pert_key=args.pert_key, context_key=args.context_key,
                                           batch_key=args.batch_key, control_label=args.control_label)
    else:
        from .data import write_screen

        params = dict(SYNTH_GPU if torch.cuda.is_available() else SYNTH_CPU)
        params.update({k: v for k, v in (("n_cells", args.cells), ("n_genes", args.genes)) if v})
        print(f"== synth: a synthetic screen of {params['n_cells']} cells x {params['n_genes']} genes "
              f"({params['n_perturbations']} perturbations, {params['n_contexts']} contexts)")
        out.mkdir(parents=True, exist_ok=True)
        h5ad = write_screen(out / "screen.h5ad", seed=args.seed, progress=not args.no_progress, **params)
        keys = dict(pert_key="perturbation", context_key="cell_type", batch_key="batch",
                    control_label="control")
    result = run_pipeline(h5ad, out, split=args.split, config=args.config or "cpu-small",
                          overrides=tuple(overrides), seed=args.seed, progress=not args.no_progress,
                          **keys)
    total = sum(result.timings.values())
    print(f"done in {total / 60:.1f} min; everything is in {result.out}")
    return 0
