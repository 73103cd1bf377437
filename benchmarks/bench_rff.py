"""Random Fourier features vs exact MMD on this CPU (issue 4).

1. One pair of sets, 8192 + 8192 cells, G = 2000: ``rff_mmd`` with D = 1024 frequencies vs the exact
   fused ``ops.mmd`` forward (best available backend). Target: >= 4x faster.
2. All pairs among 200 sets of 256 cells, G = 2000: ``set_distances(method="rff")`` with D = 2048 vs
   ``set_distances(method="exact")`` (each self term computed once). Target: >= 10x faster.

Data: log1p(Poisson) counts with a perturbation shift on a tenth of the genes (expression-like, values
far from zero); RBF kernel with the median-heuristic bandwidth, fp32. The feature map is drawn once
outside the timed region (it is a model buffer, drawn at construction). Prints a markdown table.

    python benchmarks/bench_rff.py [--quick]
"""

import argparse
import platform
import statistics
import time

import torch

from perturbdiff import has_extension, ops
from perturbdiff.ops import rff


def expression_sets(k, cells, genes, seed):
    """k sets of log1p(Poisson) cells; set i shifts the rates of a tenth of the genes by i / k."""
    gen = torch.Generator().manual_seed(seed)
    rates = torch.distributions.Gamma(0.6, 0.3).sample((genes,))
    shift = torch.zeros(genes)
    shift[: genes // 10] = 1.0
    out = torch.empty(k, cells, genes)
    for i in range(k):
        lam = (rates * (1.0 + shift * i / max(k - 1, 1))).expand(cells, genes)
        out[i] = torch.log1p(torch.poisson(lam, generator=gen))
    return out


def best_of_interleaved(fns, repeats):
    """Best time and last value of each function, run in turns so that load from other processes on
    this shared machine hits all of them alike."""
    best, values = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            values[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, values


def median_bandwidth(x, y):
    return ops.api._bandwidths("rbf", "median", x[None], y[None])[0]


def bench_pair(cells, genes, d, repeats):
    x, y = expression_sets(2, cells, genes, seed=0)
    bw = median_bandwidth(x, y)
    fmap = rff.RFFMap(genes, d, bw, kind="orthogonal", seed=0)
    with torch.no_grad():
        (t_exact, t_rff), (exact, approx) = best_of_interleaved(
            [lambda: ops.mmd(x, y, "rbf", bw), lambda: rff.rff_mmd(x, y, fmap)], repeats)
        exact_backend, rff_backend = ops.last_backend(), rff.last_rff_backend()
        seeds = [rff.rff_mmd(x, y, rff.RFFMap(genes, d, bw, seed=s)).item() for s in range(1, 4)]
    rel = abs(approx.item() - exact.item()) / exact.item()
    spread = statistics.pstdev(seeds + [approx.item()]) / exact.item()
    return [
        f"| pair {cells}+{cells} cells, G={genes} | exact `ops.mmd` ({exact_backend}) | {t_exact:.3f} s | 1.0x "
        f"| MMD^2 = {exact.item():.5g} |",
        f"| pair {cells}+{cells} cells, G={genes} | `rff_mmd` D={d} ({rff_backend}) | {t_rff:.3f} s "
        f"| **{t_exact / t_rff:.1f}x** | MMD^2 = {approx.item():.5g}, rel. error {rel:.2%} "
        f"(spread over 4 seeds {spread:.2%}) |",
    ]


def bench_all_pairs(k, cells, genes, d, repeats):
    sets = expression_sets(k, cells, genes, seed=1)
    pooled = sets.reshape(-1, genes)
    bw = median_bandwidth(pooled[:: max(1, len(pooled) // 1024)], pooled[:0])
    fmap = rff.RFFMap(genes, d, bw, kind="orthogonal", seed=0)
    with torch.no_grad():
        def exact_matrix():
            return rff.set_distances(sets, "exact", "rbf", bw), rff.last_rff_backend()

        (t_exact, t_rff), ((exact, exact_backend), approx) = best_of_interleaved(
            [exact_matrix, lambda: rff.set_distances(sets, "rff", feature_map=fmap)], repeats)
    off = ~torch.eye(k, dtype=torch.bool)
    fro = ((approx - exact)[off].norm() / exact[off].norm()).item()
    entry = ((approx - exact)[off].abs() / exact[off]).median().item()
    return [
        f"| all pairs, {k} sets x {cells} cells, G={genes} | exact `set_distances` ({exact_backend}, "
        f"self terms cached) | {t_exact:.2f} s | 1.0x | |",
        f"| all pairs, {k} sets x {cells} cells, G={genes} | `set_distances(method=\"rff\")` D={d} "
        f"({rff.last_rff_backend()}) | {t_rff:.2f} s | **{t_exact / t_rff:.1f}x** | rel. Frobenius error "
        f"{fro:.2%}, median entry error {entry:.2%} |",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run, not the benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        pair, allp = (1024, 500, 256, 2), (20, 64, 500, 512, 1)
    else:
        pair, allp = (8192, 2000, 1024, 3), (200, 256, 2000, 2048, 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, extension: {'built' if has_extension() else 'not built'}")
    print("| case | method | best time | speed-up | result |")
    print("|---|---|---|---|---|")
    for line in bench_pair(*pair):
        print(line, flush=True)
    for line in bench_all_pairs(*allp):
        print(line, flush=True)


if __name__ == "__main__":
    main()
