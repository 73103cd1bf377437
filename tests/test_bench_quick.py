"""The benchmark product: the quick pytest-benchmark suite and ``perturbdiff bench --quick`` run end
to end with sane numbers, plus the pieces whose mistakes would silently skew every number (FLOP
counts, the memory probe, the blockwise fp64 oracle, the anchors' conventions)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perturbdiff import cli, ops
from perturbdiff.benchmark import flops, memory, oracle
from perturbdiff.benchmark.anchors import implementations
from perturbdiff.benchmark.cases import Case, make_inputs, quick_cases
from perturbdiff.benchmark.runner import measure_case, run_cases

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

def test_pytest_benchmark_suite_runs_in_quick_mode():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "benchmarks"), "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"],
                          env={**_env(), "PERTURBDIFF_BENCH_QUICK": "1"}, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = subprocess.run([sys.executable, "-m", "perturbdiff", "bench", "--quick", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_quick_writes_json_markdown_and_plots(quick_run):
    out, printed = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["threads"] == 1 and data["environment"]["command"].startswith("perturbdiff bench --quick")
    assert [r["label"] for r in data["results"]] == [c.label for c in quick_cases()]
    markdown = (out / "bench.md").read_text()
    for res in data["results"]:
        assert f"### {res['label']}" in markdown
    # the numbers recorded are the ones printed
    assert markdown.split("### Plots")[0].strip() == printed.strip()
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["energy-fwd-bwd_vs_G.png", "energy-fwd-bwd_vs_S.png"]
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{name})" in markdown


def test_cli_quick_numbers_are_sane(quick_run):
    results = json.loads((quick_run[0] / "bench.json").read_text())["results"]
    for res in results:
        assert not res.get("error"), res
        rows = {r["name"]: r for r in res["rows"]}
        assert rows["gemm-roof"]["status"] == "ok" and rows["gemm-roof"]["x_roof"] == 1.0
        assert rows["perturbdiff[torch]"]["status"] == "ok"
        assert "torch-compile" not in rows  # left out by --quick
        for r in res["rows"]:
            if r["status"] != "ok":
                assert r["status"] == "skipped" and r["reason"], r
                continue
            assert all(math.isfinite(t) and t > 0 for t in r["times_s"]) and len(r["times_s"]) >= 3
            assert r["median_s"] == sorted(r["times_s"])[len(r["times_s"]) // 2]
            assert math.isclose(r["gflops"], res["flops"] / r["median_s"] / 1e9)
            assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
            if r["kind"] == "roof":
                continue
            # fp32 against fp64: perturbdiff within its issue-3 accuracy, peers within fp32 cancellation
            bound = 1e-4 if r["kind"] == "perturbdiff" else 2e-3
            assert r["max_rel_err"] < bound, (res["label"], r["name"], r["max_rel_err"])
            if Case.from_dict(res["case"]).backward:
                assert r["err_grad"] is not None


def test_torch_compile_anchor_matches_reference():
    case = quick_cases()[-1]  # the rff case compiles fastest
    res = measure_case({"case": case.to_dict(), "device": "cpu", "threads": 1, "repeats": 1, "warmup": 1,
                        "budget_s": 1.0, "names": ["torch-compile"]})
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"gemm-roof", "torch-compile"}
    assert rows["torch-compile"]["status"] == "ok" and rows["torch-compile"]["max_rel_err"] < 1e-4


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------

def test_flop_counts_follow_kernels_md():
    c = Case("energy", 8, 256, 256, 2000, backward=True)
    assert flops.forward_flops(c) == 8 * 2 * 2000 * (3 * 256 * 256)  # X.X^T, X.Y^T, Y.Y^T
    assert flops.backward_flops(c) == 8 * 2 * 2000 * 256 * 512  # W_xx.X + W_xy.Y, grad of x only
    assert flops.backward_flops(Case("energy", 8, 256, 256, 2000)) == 0
    r = Case("rff", 0, 8192, 4096, 2000, kernel="rbf", features=1024)
    assert flops.total_flops(r) == 2 * (8192 + 4096) * 2000 * 1024
    assert flops.epilogue_evaluations(Case("mmd", 2, 10, 20, 5, kernel="rbf", n_bandwidths=6)) == 2 * 700 * 6


def test_case_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="kernel 'rbf'"):
        Case("energy", 1, 4, 4, 4, kernel="rbf")
    with pytest.raises(ValueError, match="features"):
        Case("rff", 1, 4, 4, 4, kernel="rbf")
    with pytest.raises(ValueError, match="unknown op"):
        Case("sinkhorn", 1, 4, 4, 4)


@pytest.mark.skipif(bool(memory.cpu_supported()), reason="no RSS peak reset on this system")
def test_memory_probe_sees_freed_temporaries():
    mib = 2**20

    def temporary():  # 64 MiB touched then freed: the peak must still show it
        t = torch.ones(16 * mib)
        return float(t[-1])

    extra = memory.peak_extra_bytes(temporary, torch.device("cpu"))
    assert 60 * mib <= extra <= 80 * mib
    assert memory.peak_extra_bytes(lambda: torch.ones(16).sum(), torch.device("cpu")) < 8 * mib


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 30), G=st.integers(1, 12), block=st.integers(1, 9),
       kernel=st.sampled_from(["energy", "rbf"]), seed=st.integers(0, 100))
def test_blockwise_oracle_equals_materialised_reference(n, m, G, block, kernel, seed):
    case = Case("energy" if kernel == "energy" else "mmd", 0, n, m, G, kernel=kernel,
                n_bandwidths=1 if kernel == "energy" else 6)
    inputs = make_inputs(case, seed)
    expected = oracle.evaluate(case, inputs["x"].double(), inputs["y"].double(), inputs["bandwidths"], "torch")
    old = oracle._BLOCK
    oracle._BLOCK = block
    try:
        got = oracle._blockwise_mmd(case, inputs["x"].double(), inputs["y"].double(), inputs["bandwidths"])
    finally:
        oracle._BLOCK = old
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_peers_use_perturbdiff_conventions():
    """Every peer computes the same quantity as the op (half energy, biased MMD, mean-kernel kme)."""
    for case in quick_cases():
        inputs = make_inputs(case)
        fmap = None
        if case.op == "rff":
            from perturbdiff.ops.rff import RFFMap

            fmap = RFFMap(case.G, case.features, inputs["bandwidths"])
        ref = oracle.reference_result(case, inputs, fmap)["value"]
        impls = implementations(case, inputs["x"], inputs["y"], inputs["bandwidths"], fmap,
                                names=["torch-naive", "torch-expand", "geomloss"])
        assert len(impls) >= 2
        for impl in impls:
            if impl.kind == "roof" or impl.run is None:
                continue
            value = impl.run()[0].double()
            assert torch.allclose(value, ref, rtol=2e-3, atol=1e-7), (case.label, impl.name)


def test_precision_roofs_run_every_op():
    """The GPU-only tf32 / bf16 roofs take the same code path on CPU tensors (tf32 is a no-op)."""
    from perturbdiff.benchmark.anchors import _roof

    for case in quick_cases():
        inputs = make_inputs(case)
        freq = torch.randn(case.G, case.features) if case.op == "rff" else None
        for kw in ({"tf32": True}, {"cast": torch.bfloat16}):
            assert _roof(case, inputs["x"], inputs["y"], freq, **kw)() == (None, None)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the tf32 roof


def test_bandwidths_are_positive_ladder():
    inputs = make_inputs(Case("mmd", 2, 16, 16, 24, kernel="rbf", n_bandwidths=6))
    bws = inputs["bandwidths"]
    assert len(bws) == 6 and all(b > 0 for b in bws)
    assert all(math.isclose(b2 / b1, 2.0) for b1, b2 in zip(bws, bws[1:]))
    assert ops.mmd(inputs["x"], inputs["y"], "rbf", bws).gt(0).all()  # not underflowed to a constant


def test_deadline_reports_unrun_cases_without_running_them():
    results = run_cases(quick_cases()[:2], deadline=0.0, progress=False)
    assert [r["error"] for r in results] == ["not run: the time budget was spent on earlier cases"] * 2


# ----------------------------------------------------------------------------------------------
# Command-line errors
# ----------------------------------------------------------------------------------------------

def test_refuses_to_replace_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a perturbdiff bench output folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_implementation_is_named(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--only", "keops2", "--out", str(tmp_path / "o")]) == 2
    assert "keops2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_paths_fail_clearly_without_a_gpu(tmp_path, capsys):
    assert cli.main(["bench", "--gpu-validate", "--out", str(tmp_path / "g")]) == 1
    assert "no NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
    assert "--device cuda" in capsys.readouterr().err
