"""`perturbdiff train CONFIG [section.key=value ...]`: train a model (see perturbdiff.train)."""
from __future__ import annotations

import argparse

HELP = "train a PerturbDiff model from a TOML config or preset, with key=value overrides"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="config TOML file or preset name (authors, cpu-small)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. data.store=STORE train.max_steps=500")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help")


def run(args: argparse.Namespace) -> int:
    from .config import SCHEMA, ConfigError, preset_names

    if args.list_keys:
        for sec, keys in SCHEMA.items():
            for key, (default, doc) in keys.items():
                print(f"{sec}.{key} = {default!r}\n    {doc}")
        return 0
    if not args.config:
        print(f"perturbdiff train: give a config file or preset ({', '.join(preset_names())})")
        return 2
    from .train import train

    try:
        run_dir = train(args.config, args.overrides)
    except ConfigError as err:
        print(f"perturbdiff train: {err}")
        return 2
    print(f"run folder: {run_dir}")
    return 0
