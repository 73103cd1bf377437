"""The ``perturbdiff`` command. Each subcommand lives in its own module (HELP, add_arguments, run),
imported only when that subcommand runs so ``perturbdiff info`` stays fast."""

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "perturbdiff.cli_demo",
    "prepare": "perturbdiff.data.cli_prepare",
    "split": "perturbdiff.data.cli_split",
    "synth": "perturbdiff.data.cli_synth",
    "train": "perturbdiff.cli_train",
    "predict": "perturbdiff.cli_predict",
    "evaluate": "perturbdiff.evaluate.cli_evaluate",
    "baseline": "perturbdiff.evaluate.cli_baseline",
    "bench": "perturbdiff.cli_bench",
    "info": "perturbdiff.cli_info",
}
_SUMMARIES = {
    "demo": "synthetic screen -> prepare -> train -> predict -> evaluate, no external data",
    "prepare": "validate an h5ad and write a fast training store",
    "split": "report, check or propose a held-out split for a store",
    "synth": "write a synthetic perturbation screen (h5ad, raw counts)",
    "train": "train PerturbDiff from a TOML config",
    "predict": "sample held-out groups from a checkpoint into an h5ad",
    "evaluate": "cell-eval compatible metrics, baselines and a report",
    "baseline": "write a baseline prediction h5ad",
    "bench": "side-by-side kernel benchmark against the GEMM roof and peers",
    "info": "versions, built backends, Triton, threads",
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="perturbdiff", description=__doc__.split(".")[0] + ".")
    parser.add_argument("--version", action="version", version=f"perturbdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if name != argv_command:  # only the chosen subcommand's module is imported
            sub.add_parser(name, help=_SUMMARIES[name])
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=_SUMMARIES[name], description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        # user errors: one clear line, no traceback (set PERTURBDIFF_DEBUG=1 for the traceback)
        import os

        if os.environ.get("PERTURBDIFF_DEBUG"):
            raise
        print(f"perturbdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
