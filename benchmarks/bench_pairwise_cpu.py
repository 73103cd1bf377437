"""Fused energy loss on the C++ CPU backend vs the GEMM roof and geomloss (not a test).

    python benchmarks/bench_pairwise_cpu.py [--reps 5] [--skip-pair]

Batched training shape: the energy loss forward + backward (gradient w.r.t. the predicted set x)
for [B, S, G] sets, against
  * the GEMM roof: torch.bmm computing the same matrix products with no epilogue
    (X X^T, X Y^T, Y Y^T forward; the two S x S by S x G products of the backward), and
  * geomloss SamplesLoss("energy", backend="tensorized") (same value: half the energy distance).
Single pair: n = m = 8192 cells, G = 2000 genes, forward only, time and peak extra memory (VmHWM of
a fresh subprocess minus its resident size after allocating the inputs).
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

    def roof():
        xt, yt = x.transpose(1, 2), y.transpose(1, 2)
        xx, xy = torch.bmm(x, xt), torch.bmm(x, yt)
        torch.bmm(y, yt)
        torch.bmm(xx, x)
        torch.bmm(xy, y)

    row = {"shape": f"B={B}, S={S}, G={G}", "ours": median_seconds(ours, reps), "roof": median_seconds(roof, reps)}
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
from perturbdiff.ops import energy_distance

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
n, G = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
x, y = torch.rand(n, G, generator=gen) * 3, torch.rand(n, G, generator=gen) * 3 + 0.05
with torch.no_grad():
    energy_distance(x[:300], y[:300], backend="cpu")  # load kernels, BLAS and thread pools first
    base = vm("VmRSS")
    t0 = time.perf_counter()
    energy_distance(x, y, backend="cpu")
    elapsed = time.perf_counter() - t0
print(elapsed, vm("VmHWM") - base, x.nbytes + y.nbytes)
"""


def pair_row():
    n, G = PAIR
    out = subprocess.run([sys.executable, "-c", _PAIR_SCRIPT, str(n), str(G)], capture_output=True, text=True,
                         check=True)
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
    print("| shape | cpu backend | GEMM roof (bmm) | geomloss tensorized | ours / roof | geomloss / ours |")
    print("|---|---|---|---|---|---|")
    for B, S, G in BATCHED:
        r = batched_row(B, S, G, args.reps)
        print(f"| {r['shape']} | {r['ours']:.4f} | {r['roof']:.4f} | {r['geomloss']:.4f} | "
              f"{r['ours'] / r['roof']:.2f}x | {r['geomloss'] / r['ours']:.2f}x |")
    if not args.skip_pair:
        elapsed, extra, inputs = pair_row()
        n, G = PAIR
        gflop = G * (2 * n) ** 2 / 1e9  # symmetric forward: d N^2
        print("\nSingle pair forward, fresh process\n")
        print("| shape | seconds | GFLOP/s (d N^2) | peak extra memory | inputs | extra / inputs |")
        print("|---|---|---|---|---|---|")
        print(f"| n = m = {n}, G = {G} | {elapsed:.3f} | {gflop / elapsed:.1f} | {extra / 2**20:.1f} MiB | "
              f"{inputs / 2**20:.1f} MiB | {extra / inputs:.2f} |")


if __name__ == "__main__":
    main()
