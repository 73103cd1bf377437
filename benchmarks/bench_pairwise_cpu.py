"""Fused energy loss on the C++ CPU backend vs the GEMM roof and geomloss (not a test).

    python benchmarks/bench_pairwise_cpu.py [--reps 5] [--skip-pair]

Batched training shape: the energy loss forward + backward (gradient w.r.t. the predicted set x)
for [B, S, G] sets, against
  * the GEMM roof: torch.bmm computing the same matrix products with no epilogue
    (X X^T, X Y^T, Y Y^T forward; the two S x S by S x G products of the backward), and
  * geomloss SamplesLoss("energy", backend="tensorized") (same value: half the energy distance).
Single pair: n = m = 8192 cells, G = 2000 genes, forward only, time and peak extra memory (VmHWM of
a fresh subprocess minus its resident size after allocating the inputs), for the fused op alone and
through the public energy_distance (whose input validation allocates temporaries of its own).
Prints a markdown table; times are the median of --reps runs after one warm-up.
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch

BATCHED = [(8, 256, 2000), (8, 256, 18080)]
PAIR = (8192, 2000)


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: allocations, thread pools, first-call dispatch
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batched_row(B, S, G, reps):
    from perturbdiff.ops import energy_distance

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, S, G, generator=gen) * 3
    y = torch.rand(B, S, G, generator=gen) * 3 + 0.05

    def ours():
        xr = x.clone().requires_grad_()
        energy_distance(xr, y, backend="cpu").sum().backward()

    # The fused op alone, as api.py calls it, without the API's input validation and set-up.
    from perturbdiff.ops import _cpp, api

    xw, yw = torch.ones(B, S), torch.ones(B, S)
    coef = 0.5 * api._coefficients(xw, yw, "biased")
    center = api._pooled_mean(x, xw, y, yw)

    def op_only():
        xr = x.clone().requires_grad_()
        _cpp.pairwise_mmd(xr, y, xw, yw, coef, center, "energy", [1.0], False).sum().backward()

    def roof():
        xt, yt = x.transpose(1, 2), y.transpose(1, 2)
        xx, xy = torch.bmm(x, xt), torch.bmm(x, yt)
        torch.bmm(y, yt)
        torch.bmm(xx, x)
        torch.bmm(xy, y)

    row = {"shape": f"B={B}, S={S}, G={G}", "ours": median_seconds(ours, reps),
           "op": median_seconds(op_only, reps), "roof": median_seconds(roof, reps)}
    try:
        from geomloss import SamplesLoss

        loss = SamplesLoss("energy", backend="tensorized")

        def geom():
            xr = x.clone().requires_grad_()
            loss(xr, y).sum().backward()

        row["geomloss"] = median_seconds(geom, reps)
    except ImportError:
        row["geomloss"] = float("nan")
    return row


# Runs in a fresh interpreter so VmHWM only sees this measurement.
_PAIR_SCRIPT = """
import sys, time, torch
from perturbdiff.ops import _cpp, api, energy_distance

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
n, G, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
gen = torch.Generator().manual_seed(0)
x, y = torch.rand(n, G, generator=gen) * 3, torch.rand(n, G, generator=gen) * 3 + 0.05
with torch.no_grad():
    energy_distance(x[:300], y[:300], backend="cpu")  # load kernels, BLAS and thread pools first
    w = torch.ones(1, n)
    coef, center = 0.5 * api._coefficients(w, w, "biased"), api._pooled_mean(x[None], w, y[None], w)
    base = vm("VmRSS")
    t0 = time.perf_counter()
    if how == "api":
        energy_distance(x, y, backend="cpu")
    else:
        _cpp.pairwise_mmd(x[None], y[None], w, w, coef, center, "energy", [1.0], False)
    elapsed = time.perf_counter() - t0
print(elapsed, vm("VmHWM") - base, x.nbytes + y.nbytes)
"""


def pair_row(how: str):
    n, G = PAIR
    out = subprocess.run([sys.executable, "-c", _PAIR_SCRIPT, str(n), str(G), how], capture_output=True,
                         text=True, check=True)
    elapsed, extra, inputs = out.stdout.split()
    return float(elapsed), int(extra), int(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-pair", action="store_true", help="skip the n = m = 8192 forward")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import perturbdiff

    if not perturbdiff.has_extension():
        sys.exit(f"perturbdiff._C is not built: {perturbdiff.extension_error()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("Energy loss forward + backward (grad w.r.t. x), median seconds\n")
    print("| shape | energy_distance (cpu) | fused op only | GEMM roof (bmm) | geomloss tensorized "
          "| API / roof | op / roof | geomloss / API |")
    print("|---|---|---|---|---|---|---|---|")
    for B, S, G in BATCHED:
        r = batched_row(B, S, G, args.reps)
        print(f"| {r['shape']} | {r['ours']:.4f} | {r['op']:.4f} | {r['roof']:.4f} | {r['geomloss']:.4f} | "
              f"{r['ours'] / r['roof']:.2f}x | {r['op'] / r['roof']:.2f}x | {r['geomloss'] / r['ours']:.2f}x |")
    if not args.skip_pair:
        n, G = PAIR
        gflop = G * (2 * n) ** 2 / 1e9  # symmetric forward: d N^2
        print("\nSingle pair forward, fresh process per row\n")
        print("| shape | called as | seconds | GFLOP/s (d N^2) | peak extra memory | inputs | extra / inputs |")
        print("|---|---|---|---|---|---|---|")
        for how, label in (("op", "fused op"), ("api", "energy_distance")):
            elapsed, extra, inputs = pair_row(how)
            print(f"| n = m = {n}, G = {G} | {label} | {elapsed:.3f} | {gflop / elapsed:.1f} | "
                  f"{extra / 2**20:.1f} MiB | {inputs / 2**20:.1f} MiB | {extra / inputs:.2f} |")


if __name__ == "__main__":
    main()
