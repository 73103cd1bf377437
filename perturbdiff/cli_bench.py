"""``perturbdiff bench``: the side-by-side kernel benchmark (and ``--gpu-validate``)."""

import argparse
import shlex
import sys
import time
from pathlib import Path

HELP = (
    "Measure every perturbdiff backend side by side with the GEMM roof (the same matrix products, no "
    "epilogue), naive torch (cdist), norm-expansion torch, torch.compile, geomloss and pykeops when "
    "installed: median time, GFLOP/s, ratio to the roof, peak extra memory and error against fp64. "
    "Writes bench.json, bench.md and log-log plots to --out. --quick runs tiny shapes in seconds "
    "(without torch.compile, whose compilation alone takes ~20 s per shape). --gpu-validate builds the "
    "CUDA extension, runs the test suite (CUDA and Triton tests included) and the GPU benchmark on an "
    "NVIDIA machine."
)
_MARKER_FILES = ("bench.json", "gpu_validation.json")  # what makes a folder ours to replace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds), e.g. to check the suite runs")
    parser.add_argument("--op", default="all", choices=["energy", "mmd", "kme", "rff", "all"],
                        help="which op's cases to run (default: all; with --gpu-validate, in its benchmark step)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every measurement (default: torch's current count; 1 with --quick)")
    parser.add_argument("--out", default="perturbdiff-bench", type=Path,
                        help="output folder, replaced atomically (default: ./perturbdiff-bench)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 5; quick 3)")
    parser.add_argument("--only", default=None,
                        help="comma-separated implementations to run besides the roofs, e.g. "
                             "'geomloss,perturbdiff[cpu]' (default: all that exist here)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="wall-clock budget in seconds: no case starts after it and a case still running is "
                             "stopped (both reported as not run)")
    parser.add_argument("--gpu-validate", action="store_true",
                        help="on an NVIDIA GPU machine: build the CUDA extension, run the test suite and the GPU "
                             "benchmark (tf32 and bf16 roofs) into --out within --time-limit (default 570 s); "
                             "exits non-zero without a GPU")


def run(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import gpu
    from .benchmark.anchors import known_names
    from .benchmark.cases import full_cases, quick_cases, select
    from .benchmark.report import environment, markdown, write_all
    from .benchmark.runner import run_cases
    from .atomic import atomic_dir

    out = _checked_out_dir(args.out)
    if args.gpu_validate:
        return gpu.validate(out, quick=args.quick, time_limit=args.time_limit, op=args.op)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    # quick mode defaults to one thread: on a shared machine, tiny ops under an OpenMP team wait
    # tens of ms for a descheduled thread; the full run uses torch's thread count unless told
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    names = _names(args.only, known_names(), args.quick)
    cases = select(quick_cases() if args.quick else full_cases(), args.op)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")

    env = environment(args.device, threads, f"perturbdiff bench {_describe(args)}")
    if args.quick and args.only is None:
        env["left_out"] = "torch-compile (--quick; its compilation takes ~20 s per shape)"
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    results = run_cases(cases, device=args.device, threads=threads, repeats=repeats,
                        budget_s=2.0 if args.quick else 30.0, names=names, deadline=deadline,
                        one_worker=args.quick)
    with atomic_dir(out, overwrite=True) as tmp:
        write_all(tmp, env, results)
    print(markdown(env, results))
    print(f"wrote {out}/bench.json, {out}/bench.md and plots in {out}/plots", file=sys.stderr)
    failed = [r["label"] for r in results if r.get("error")]
    if failed:
        print(f"perturbdiff bench: {len(failed)} case(s) failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _checked_out_dir(out: Path) -> Path:
    """Refuse to replace a non-empty folder that is not an earlier benchmark output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and
                                                not any((out / m).exists() for m in _MARKER_FILES))):
        raise FileExistsError(f"--out {out} exists and is not a perturbdiff bench output folder; "
                              "choose a new or empty folder")
    return out


def _names(only: str | None, known: list[str], quick: bool) -> list[str] | None:
    if only is None:
        # quick mode leaves torch.compile out: its compilation (~20 s per shape) would dwarf the rest
        return [n for n in known if n != "torch-compile"] if quick else None
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only: unknown implementation(s) {unknown}; known here: {known}")
    return names


def _describe(args: argparse.Namespace) -> str:
    """The options as given, for the report (the command that printed the numbers)."""
    parts = ["--quick"] if args.quick else []
    parts += [f"--op {args.op}", f"--device {args.device}", f"--out {shlex.quote(str(args.out))}"]
    parts += [f"--{k} {shlex.quote(str(v))}" for k, v in (("threads", args.threads), ("repeats", args.repeats),
                                                        ("only", args.only), ("time-limit", args.time_limit)) if v is not None]
    return " ".join(parts)
