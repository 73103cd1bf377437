"""Benchmark output: ``bench.json`` (everything measured), ``bench.md`` (one table per case) and
log-log plots of time against G and against S per implementation (``plots/*.png``)."""

import datetime
import importlib.metadata
import json
import os
import platform
import re
from collections import defaultdict
from pathlib import Path

import torch

from .cases import Case

JSON_NAME, MARKDOWN_NAME, PLOTS_DIR = "bench.json", "bench.md", "plots"


def environment(device: str, threads: int, command: str) -> dict:
    """Machine, software and settings that the numbers depend on (kernels.md 2.6)."""
    from .. import __version__, extension_error
    from ..ops import available_backends

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    blas = [f"MKL {mkl.group(1)}"] if mkl else re.findall(r"BLAS_INFO=(\w+)", config)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas[0] if blas else "unknown",
        "perturbdiff": __version__,
        "extension": "built" if extension_error() is None else f"missing ({extension_error()})",
        "backends": available_backends(),
        "peers": {name: _version(name) for name in ("geomloss", "pykeops", "triton")},
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_all(out: Path, env: dict, results: list[dict]) -> list[Path]:
    """Write JSON, markdown and plots into the folder ``out`` (it must exist)."""
    (out / JSON_NAME).write_text(json.dumps({"environment": env, "results": results}, indent=1))
    plots = write_plots(out / PLOTS_DIR, results)
    (out / MARKDOWN_NAME).write_text(markdown(env, results, [p.relative_to(out) for p in plots]))
    return [out / JSON_NAME, out / MARKDOWN_NAME, *plots]


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def markdown(env: dict, results: list[dict], plots=()) -> str:
    lines = [
        f"Measured {env['date_utc']} on {env['cpu']} ({env['cpu_cores']} cores"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"), {env['threads']} threads, "
        f"torch {env['torch']} ({env['blas']}, {env['cpu_capability']}), perturbdiff {env['perturbdiff']} "
        f"(extension {env['extension']}; backends {', '.join(env['backends'])}).",
        "",
        f"Command: `{env['command']}`",
        "",
        *([f"Left out: {env['left_out']}.", ""] if env.get("left_out") else []),
        "Columns: median wall time over the timed runs; GFLOP/s from the case's algorithmic FLOPs "
        "(kernels.md 2.6, the same count for every implementation); x roof = time / time of the GEMM "
        "roof (the same matrix products, no epilogue); peak extra = memory allocated at peak beyond "
        "the inputs; max rel err = worst of the value's relative error and the gradient's relative "
        "norm error against fp64; first call includes compilation.",
        "",
    ]
    for res in results:
        lines += _case_table(res)
    if plots:
        lines += ["### Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


def _case_table(res: dict) -> list[str]:
    head = f"### {res['label']}"
    if res.get("error"):
        return [head, "", f"Failed: {res['error']}", ""]
    lines = [head, "",
             f"{res['flops'] / 1e9:.3g} GFLOP, {res['epilogue_evaluations'] / 1e6:.3g} M kernel evaluations, "
             f"inputs {res['input_bytes'] / 2**20:.1f} MiB, reference {res['reference']}.", "",
             "| implementation | median ms | GFLOP/s | x roof | peak extra MiB | max rel err | first call s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for r in res["rows"]:
        if r["status"] != "ok":
            skipped.append(f"{r['name']} ({r['status']}: {r['reason']})")
            continue
        lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.4g} | {r['gflops']:.4g} | {_fmt(r['x_roof'], '.3f')} "
                     f"| {_fmt(r['peak_extra_bytes'] and r['peak_extra_bytes'] / 2**20, '.1f')} "
                     f"| {_fmt(r['max_rel_err'], '.1e')} | {r['first_call_s']:.3g} |")
    lines.append("")
    summary = speedup_summary(res)
    if summary:
        lines += [summary, ""]
    if skipped:
        lines += ["Not run: " + "; ".join(skipped) + ".", ""]
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def speedup_summary(res: dict) -> str:
    """'fastest perturbdiff backend: X x roof; Y x faster than geomloss, ...' for one case."""
    ok = {r["name"]: r for r in res["rows"] if r["status"] == "ok"}
    ours = [r for r in ok.values() if r["kind"] == "perturbdiff"]
    if not ours:
        return ""
    best = min(ours, key=lambda r: r["median_s"])
    parts = [f"Fastest perturbdiff backend: {best['name']}, {_fmt(best['x_roof'], '.2f')}x the roof"]
    for peer in ("geomloss", "torch-expand", "torch-compile", "torch-naive"):
        if peer in ok:
            parts.append(f"speed-up over {peer} {ok[peer]['median_s'] / best['median_s']:.2f}x")
    return "; ".join(parts) + "."


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def write_plots(folder: Path, results: list[dict]) -> list[Path]:
    """One log-log figure per (op family, swept axis) with at least two points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families = defaultdict(list)  # (family, axis) -> [(case, result)]
    for res in results:
        case = Case.from_dict(res["case"])
        for axis in case.sweeps:
            families[(_family(case), axis)].append((case, res))
    written = []
    for (family, axis), members in sorted(families.items()):
        series = defaultdict(list)
        for case, res in members:
            for r in res["rows"]:
                if r["status"] == "ok":
                    series[r["name"]].append((case.G if axis == "G" else case.n, r["median_s"]))
        if len({pt[0] for pts in series.values() for pt in pts}) < 2:
            continue
        fixed = members[0][0]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.startswith("gemm-roof") else "-"
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = sorted({pt[0] for pts in series.values() for pt in pts})
        ax.set_xticks(xs, [str(v) for v in xs], minor=False)  # label the measured sizes, not powers of 10
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("genes G" if axis == "G" else "cells per set S")
        ax.set_ylabel("median time (ms)")
        held = f"S={fixed.n}" if axis == "G" else f"G={fixed.G}"
        ax.set_title(f"{family}, B={fixed.B}, {held}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{re.sub(r'[^A-Za-z0-9]+', '-', family).strip('-')}_vs_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _family(case: Case) -> str:
    kern = "" if case.kernel == "energy" else f" {case.kernel}x{case.n_bandwidths}"
    return f"{case.op}{kern} {'fwd+bwd' if case.backward else 'fwd'}"
