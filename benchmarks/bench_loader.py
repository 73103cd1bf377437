"""Loader throughput: cells/s into dense [B, S, G] batches, perturbdiff store vs anndata backed reads.

For each gene count G: write a synthetic screen (raw counts) as h5ad, prepare a store from it, then
time (a) ``make_loader`` batches (targets + matched controls, dense float32 [B, S, G]) and
(b) the same sets read from the h5ad with anndata in backed mode (``read_h5ad(backed="r")``, one
sorted row read per set for targets and one for controls, then densified). Throughput counts
target cells (each batch also loads as many control cells).

    PYTHONPATH=. python benchmarks/bench_loader.py            # G = 2000 and 18080
    PYTHONPATH=. python benchmarks/bench_loader.py --quick    # tiny smoke version
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

from perturbdiff.data.loader import make_loader
from perturbdiff.data.store import PerturbStore, prepare_store
from perturbdiff.data.synthetic import write_screen


def time_store(store: PerturbStore, set_size: int, sets_per_batch: int, n_batches: int,
               num_workers: int) -> tuple[float, list[np.ndarray]]:
    """Target cells/s of ``make_loader``; also returns the group ids of each timed batch."""
    loader = make_loader(store, "all", set_size=set_size, sets_per_batch=sets_per_batch, seed=0,
                         num_workers=num_workers)
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first page-cache touch are not throughput
    start = time.perf_counter()
    # Keep only the group ids: at G = 18080 one batch is ~300 MB of tensors.
    groups = [next(it)["group"].numpy() for _ in range(n_batches)]
    elapsed = time.perf_counter() - start
    del it
    return n_batches * set_size * sets_per_batch / elapsed, groups


def time_anndata(path: Path, store: PerturbStore, batches: list[np.ndarray], set_size: int) -> float:
    """Read the same target sets and control sets through anndata's backed mode."""
    adata = ad.read_h5ad(path, backed="r")
    rng = np.random.default_rng(0)
    ctrl_by_ctx = {}
    for c in range(len(store.vocab["context"])):
        rows = np.flatnonzero(store.is_control & (store.codes["context"] == c))
        ctrl_by_ctx[c] = store.orig_index(rows)
    n_cells = 0
    start = time.perf_counter()
    for groups in batches:
        for group in groups:
            g = store.groups.iloc[int(group)]
            orig = store.orig_index(np.arange(g["start"], g["stop"]))
            set_rows = rng.choice(orig, size=set_size)
            ctrl_rows = rng.choice(ctrl_by_ctx[int(g["context"])], size=set_rows.size)
            for rows in (set_rows, ctrl_rows):
                uniq, inv = np.unique(rows, return_inverse=True)  # h5py needs increasing indices
                _ = adata.X[uniq].toarray().astype(np.float32)[inv] / 10.0
            n_cells += set_rows.size
    elapsed = time.perf_counter() - start
    adata.file.close()
    return n_cells / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--genes", type=int, nargs="+", default=[2000, 18080])
    parser.add_argument("--cells", type=int, default=40_000)
    parser.add_argument("--set-size", type=int, default=256)
    parser.add_argument("--sets-per-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the 2nd column")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--workdir", default=None, help="where to write data (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.genes, args.cells, args.batches, args.set_size, args.sets_per_batch = [500, 2000], 4000, 3, 64, 4
    if args.workdir:
        run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="pd-bench-loader-") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, workdir: Path) -> None:
    print(f"cells={args.cells} S={args.set_size} B={args.sets_per_batch} batches={args.batches} "
          f"best of {args.repeats}; workdir={workdir}")
    print(f"{'G':>6} {'prepare s':>10} {'store, 0 workers':>17} {f'store, {args.workers} workers':>17} "
          f"{'anndata backed':>15} {'speed-up (0 w.)':>16}   [target cells/s]")
    for genes in args.genes:
        h5ad = workdir / f"synth_{genes}.h5ad"
        if not h5ad.exists():
            write_screen(h5ad, n_cells=args.cells, n_genes=genes, n_perturbations=50, n_contexts=4,
                         n_batches=2, seed=0, progress=False, workers=2)
        t0 = time.perf_counter()
        path = prepare_store(h5ad, workdir / f"store_{genes}", pert_key="perturbation",
                             context_key="cell_type", batch_key="batch", control_label="control",
                             progress=False, overwrite=True)
        prep = time.perf_counter() - t0
        store = PerturbStore.open(path)
        runs = [time_store(store, args.set_size, args.sets_per_batch, args.batches, 0)
                for _ in range(args.repeats)]
        fast, batches = max(r[0] for r in runs), runs[0][1]
        del runs
        parallel = max(time_store(store, args.set_size, args.sets_per_batch, args.batches,
                                  args.workers)[0] for _ in range(args.repeats))
        slow = max(time_anndata(h5ad, store, batches, args.set_size) for _ in range(args.repeats))
        print(f"{genes:>6} {prep:>10.1f} {fast:>17,.0f} {parallel:>17,.0f} {slow:>15,.0f} "
              f"{fast / slow:>15.1f}x", flush=True)


if __name__ == "__main__":
    main()
