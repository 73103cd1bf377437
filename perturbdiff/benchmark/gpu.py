"""``perturbdiff bench --gpu-validate --out DIR``: everything a GPU machine has to show, in one
command that stays under 10 minutes (or ``--time-limit``): (1) build the CUDA extension for the
visible GPU when the installed one has no CUDA kernels, (2) run the whole test suite, the tests
that use the GPU (CUDA and Triton kernels, GPU training and evaluation) first, (3) run the
side-by-side benchmark on the GPU (with the tf32 and bf16 GEMM roofs) in the time left. Each step
runs in a subprocess, so steps 2 and 3 load the freshly built extension; logs, the test reports
and the benchmark land in DIR together with ``gpu_validation.json`` / ``.md`` (step, status,
seconds, log)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

TOTAL_BUDGET_S = 570.0  # the whole command must finish in < 10 min
BUILD_TIMEOUT_S = 300.0
TEST_TIMEOUT_S = 300.0  # per group of tests
PER_TEST_TIMEOUT_S = 120  # with pytest-timeout installed: one stuck test does not take the budget
TEST_WORKERS = 8  # with pytest-xdist installed (each worker sizes itself to 2 threads, tests/conftest.py)
# The GPU tests first: if the budget runs out, it runs out on tests that a CPU CI also runs.
TEST_GROUPS = (("tests-gpu", "cuda or triton or gpu"), ("tests-rest", "not (cuda or triton or gpu)"))
BENCH_RESERVE_S = 60.0  # kept for the benchmark when the build and tests run long
SUMMARY_JSON, SUMMARY_MD = "gpu_validation.json", "gpu_validation.md"


def validate(out: Path, quick: bool = False, time_limit: float | None = None, op: str = "all") -> int:
    if not torch.cuda.is_available():
        print("perturbdiff bench --gpu-validate: no NVIDIA GPU is visible here (torch.cuda.is_available() "
              f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Run it on a "
              "machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 1
    from ..atomic import atomic_dir

    start = time.monotonic()
    budget = TOTAL_BUDGET_S if time_limit is None else time_limit
    repo = source_checkout()
    steps = []
    with atomic_dir(out, overwrite=True) as tmp:
        steps.append(_build_step(tmp, repo))
        for name, selection in TEST_GROUPS:
            left = budget - (time.monotonic() - start)
            steps.append(_test_step(tmp, repo, name, selection, min(TEST_TIMEOUT_S, left - BENCH_RESERVE_S)))
        left = budget - (time.monotonic() - start)
        bench = [sys.executable, "-m", "perturbdiff", "bench", "--device", "cuda", "--op", op,
                 "--out", str(tmp / "bench"), "--time-limit", str(int(left - 30))] + (["--quick"] if quick else [])
        steps.append(_run("benchmark", bench, tmp / "bench.log", left - 10))
        summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "seconds": round(time.monotonic() - start, 1), "steps": steps}
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
        (tmp / SUMMARY_MD).write_text(_markdown(summary, tmp))
    print((out / SUMMARY_MD).read_text())
    return 0 if all(s["status"] == "ok" for s in steps) else 1


def source_checkout() -> Path | None:
    """The repository this package was imported from (editable install or PYTHONPATH), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").exists() and (root / "csrc").is_dir() else None


def has_cuda_kernels() -> bool:
    from .._extension import has_kernel

    return has_kernel("pairwise_mmd", "CUDA")


def _build_step(tmp: Path, repo: Path | None) -> dict:
    if has_cuda_kernels():
        return {"step": "build", "status": "ok", "seconds": 0.0, "note": "CUDA kernels already built"}
    if repo is None:
        return {"step": "build", "status": "failed", "seconds": 0.0,
                "note": "no CUDA kernels and no source checkout to build them from: install from source "
                        "with PERTURBDIFF_FORCE_CUDA=1 pip install --no-build-isolation -e ."}
    # --no-deps: the dependencies came with the installed package, and GPU nodes often have no index
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(repo)]
    major, minor = torch.cuda.get_device_capability()
    env = {"TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", **os.environ,  # this GPU's code unless told
           "PERTURBDIFF_FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 1)}
    return _run("build", cmd, tmp / "build.log", BUILD_TIMEOUT_S, env=env)


def _test_step(tmp: Path, repo: Path | None, name: str, selection: str, timeout_s: float) -> dict:
    if repo is None or not (repo / "tests").is_dir():
        return {"step": name, "status": "failed", "seconds": 0.0, "note": "no tests folder (source checkout) found"}
    # -v names each test as it starts, so a log cut off by the timeout shows where it stopped
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "--tb=short", "--durations=15", "-k", selection,
           str(repo / "tests"), f"--junitxml={tmp / (name + '.xml')}", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", str(PER_TEST_TIMEOUT_S)]
    if importlib.util.find_spec("xdist"):  # GPU hosts have the cores: Triton compiles in parallel
        cmd += ["-n", str(min(TEST_WORKERS, os.cpu_count() or 1))]
    return _run(name, cmd, tmp / f"{name}.log", timeout_s)


def _run(step: str, cmd: list[str], log: Path, timeout_s: float, env=None) -> dict:
    t0 = time.monotonic()
    if timeout_s <= 0:
        return {"step": step, "status": "failed", "seconds": 0.0, "note": "no time left in the 10-minute budget"}
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
            note = f"exit status {rc}"
        except subprocess.TimeoutExpired:
            rc, note = -1, f"timed out after {timeout_s:.0f} s"
    return {"step": step, "status": "ok" if rc == 0 else "failed", "seconds": round(time.monotonic() - t0, 1),
            "note": note, "log": log.name}


def _markdown(summary: dict, folder: Path) -> str:
    lines = [f"GPU validation on {summary['gpu']} (torch {summary['torch']}, CUDA {summary['cuda']}), "
             f"{summary['date_utc']}, {summary['seconds']} s.", "",
             "| step | status | seconds | note | log |", "|---|---|---:|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note', '')} | {s.get('log', '-')} |"
              for s in summary["steps"]]
    bench_md = folder / "bench" / "bench.md"
    if bench_md.exists():
        lines += ["", bench_md.read_text()]
    return "\n".join(lines) + "\n"
