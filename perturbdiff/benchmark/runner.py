"""Timing: each case runs in a fresh worker process (``python -m perturbdiff.benchmark.worker``), so
torch.compile caches, allocator state and a crash or out-of-memory in one case stay in that case.

Per implementation, in the same process as every other implementation of the case: warm-up runs
(the first gives the error against the fp64 reference; its time is reported as ``first_call_s``,
which includes torch.compile's compilation), one run under the peak-memory probe, then timed runs
(``torch.cuda.synchronize`` around each on GPU) until ``repeats`` or the time budget is reached;
the median is reported, with GFLOP/s from the case's algorithmic FLOPs and the ratio to the GEMM roof.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import flops
from .cases import Case, make_inputs

ERROR_FLOOR = 1e-30


def run_cases(cases: list[Case], device: str = "cpu", threads: int | None = None, repeats: int = 5,
              warmup: int = 1, budget_s: float = 20.0, names=None, timeout_s: float = 1800.0,
              deadline: float | None = None, one_worker: bool = False, progress: bool = True) -> list[dict]:
    """Measure the cases in worker processes (one per case, or one for all with ``one_worker``:
    quick runs, where process start-up would dominate); returns one result dict per case.

    budget_s: time after which an implementation stops repeating (it still gets 3 timed runs).
    deadline: a time.monotonic() value; cases that would start after it are reported as not run.
    """
    threads = threads or torch.get_num_threads()
    specs = [{"case": c.to_dict(), "device": device, "threads": threads, "repeats": repeats, "warmup": warmup,
              "budget_s": budget_s, "names": list(names or [])} for c in cases]
    batches = [specs] if one_worker else [[s] for s in specs]
    results = []
    for batch in tqdm(batches, desc="bench", unit="worker" if one_worker else "case", disable=not progress):
        left = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
        if left <= 0:
            results += [_failed(s, "not run: the time budget was spent on earlier cases") for s in batch]
            continue
        results += _spawn(batch, threads, left)
    return results


def _failed(spec: dict, error: str) -> dict:
    return {"case": spec["case"], "label": Case.from_dict(spec["case"]).label, "rows": [], "error": error}


def _spawn(specs: list[dict], threads: int, timeout_s: float) -> list[dict]:
    package_root = str(Path(__file__).resolve().parents[2])  # importable even from an uninstalled checkout
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "perturbdiff.benchmark.worker"], input=json.dumps(specs),
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [_failed(s, f"worker timed out after {timeout_s:.0f} s") for s in specs]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return [_failed(s, f"worker exited with status {proc.returncode}: {tail}") for s in specs]
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------

def measure_case(spec: dict) -> dict:
    from . import memory
    from .anchors import implementations
    from .oracle import reference_result

    memory.configure_process()
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    case, device = Case.from_dict(spec["case"]), torch.device(spec["device"])
    inputs = make_inputs(case)
    fmap = _feature_map(case, inputs["bandwidths"])
    ref = reference_result(case, inputs, fmap, device)  # fp64 on the GPU too: it is fast there
    x, y = inputs["x"].to(device), inputs["y"].to(device)
    rows = []
    for impl in implementations(case, x, y, inputs["bandwidths"], fmap, spec["names"] or None):
        row = {"name": impl.name, "kind": impl.kind}
        if impl.run is None:
            row.update(status="skipped", reason=impl.skip)
        else:
            row.update(_measure(impl.run, ref, device, spec))
        rows.append(row)
        impl.run = None  # drop the closure's tensors before the next implementation
    _derive(case, rows)
    return {"case": case.to_dict(), "label": case.label, "threads": torch.get_num_threads(),
            "device": str(device), "flops": flops.total_flops(case),
            "epilogue_evaluations": flops.epilogue_evaluations(case),
            "input_bytes": (x.numel() + y.numel()) * x.element_size(),
            "reference": ref["method"],
            "rows": rows}


def _feature_map(case: Case, bws):
    if case.op != "rff":
        return None
    from ..ops.rff import RFFMap

    return RFFMap(case.G, case.features, bws, seed=0)


def _measure(run, ref: dict, device: torch.device, spec: dict) -> dict:
    from .memory import peak_extra_bytes

    def timed():
        _sync(device)
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        return time.perf_counter() - t0, out

    try:
        first_s, out = timed()
    except Exception as exc:  # noqa: BLE001  (recorded, the other implementations still run)
        # a perturbdiff backend refusing this device or dtype is a skip; anything else is an error
        refused = isinstance(exc, ValueError) and str(exc).startswith("backend ")
        return {"status": "skipped" if refused else "error", "reason": f"{type(exc).__name__}: {exc}"}
    errors = _errors(out, ref)
    del out
    for _ in range(spec["warmup"] - 1):
        run()
    peak = peak_extra_bytes(run, device)
    times, start = [], time.perf_counter()
    while len(times) < spec["repeats"] and (len(times) < 3 or time.perf_counter() - start < spec["budget_s"]):
        times.append(timed()[0])
    return {"status": "ok", "first_call_s": first_s, "times_s": times, "median_s": statistics.median(times),
            "min_s": min(times), "peak_extra_bytes": peak, **errors}


def _errors(out, ref: dict) -> dict:
    value, grad = out
    if value is None:  # a roof: no result to check
        return {"err_value": None, "err_grad": None, "max_rel_err": None}
    r = ref["value"].to(torch.float64)
    v = value.detach().to("cpu", torch.float64).reshape(r.shape)
    err_value = ((v - r).abs() / r.abs().clamp_min(ERROR_FLOOR)).max().item()
    err_grad = None
    if grad is not None and ref["grad"] is not None:
        g = grad.detach().to("cpu", torch.float64)
        err_grad = ((g - ref["grad"]).norm() / ref["grad"].norm().clamp_min(ERROR_FLOOR)).item()
    return {"err_value": err_value, "err_grad": err_grad,
            "max_rel_err": max(e for e in (err_value, err_grad) if e is not None)}


def _derive(case: Case, rows: list[dict]) -> None:
    """GFLOP/s and the ratio to the (full-precision) GEMM roof of the same case."""
    total = flops.total_flops(case)
    roof = next((r for r in rows if r["name"] == "gemm-roof" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gflops"] = total / r["median_s"] / 1e9
        r["x_roof"] = r["median_s"] / roof["median_s"] if roof else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
