"""`perturbdiff prepare`: validate an h5ad and write a prepared store."""
from __future__ import annotations

import argparse

HELP = "validate an AnnData (.h5ad), normalise it and write a prepared store for training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input .h5ad (read lazily; may be larger than memory)")
    parser.add_argument("--out", required=True, help="store folder to create")
    parser.add_argument("--pert-key", required=True, help="obs key of the perturbation label")
    parser.add_argument("--context-key", required=True, help="obs key of the context (cell type/line)")
    parser.add_argument("--batch-key", default=None, help="obs key of the batch (donor/plate/gem group)")
    parser.add_argument("--control-label", required=True, help="perturbation label of control cells")
    panel = parser.add_mutually_exclusive_group()
    panel.add_argument("--genes", default=None, help="file with one gene per line: the panel, in order")
    panel.add_argument("--n-top-genes", type=int, default=None, help="select this many HVGs")
    parser.add_argument("--layer", default=None, help="read this layer instead of X (e.g. counts)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="rows per streamed chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .prepare import prepare_store, read_gene_file
    from .store import PerturbStore

    genes = read_gene_file(args.genes) if args.genes else None
    path = prepare_store(args.input, args.out, pert_key=args.pert_key, context_key=args.context_key,
                         batch_key=args.batch_key, control_label=args.control_label, genes=genes,
                         n_top_genes=args.n_top_genes, layer=args.layer, chunk_size=args.chunk_size,
                         progress=not args.quiet, overwrite=args.overwrite)
    store = PerturbStore.open(path)
    pre = store.meta["preprocessing"]
    print(f"wrote {store}")
    print(f"detected input scale: {pre['detected_scale']}; applied: {pre['applied']}; "
          f"genes: {pre['gene_selection']} ({store.n_genes})")
    print(f"{store.meta['n_control_cells']} control cells in {len(store.control_groups)} "
          f"(context, batch) groups; {len(store.groups)} perturbed groups")
    return 0
