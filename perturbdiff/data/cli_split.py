"""`perturbdiff split`: report a split of a store, or propose and save one."""
from __future__ import annotations

import argparse

HELP = "report the train/val/test split of a store (from a TOML config) or propose one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="prepared store folder")
    parser.add_argument("--config", default=None, help="split TOML to check and report")
    parser.add_argument("--propose", action="store_true", help="propose a split for this store")
    parser.add_argument("--out", default=None, help="with --propose: write the proposal here (TOML)")
    parser.add_argument("--holdout-contexts", type=int, default=1, help="with --propose")
    parser.add_argument("--frac-test", type=float, default=0.6, help="with --propose")
    parser.add_argument("--frac-val", type=float, default=0.1, help="with --propose")
    parser.add_argument("--seed", type=int, default=0, help="with --propose")


def run(args: argparse.Namespace) -> int:
    from .split import load_split, propose_split, split_report
    from .store import PerturbStore

    if bool(args.config) == bool(args.propose):
        raise SystemExit("give exactly one of --config FILE or --propose")
    if args.out and not args.propose:
        raise SystemExit("--out is only used with --propose")
    store = PerturbStore.open(args.store)
    if args.propose:
        split = propose_split(store, n_holdout_contexts=args.holdout_contexts,
                              frac_test=args.frac_test, frac_val=args.frac_val, seed=args.seed)
        print(split.to_toml())
        if args.out:
            print(f"saved to {split.save(args.out)}")
    else:
        split = load_split(args.config, store)
    print(split_report(split, store))
    return 0
