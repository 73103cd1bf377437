"""Data pipeline: AnnData contract, prepared store, splits, set sampling, synthetic screens."""
from .contract import (ContractError, EmptyGroupError, GeneListError, InvalidValueError,
                       MissingKeyError, MissingLabelError)
from .loader import iter_eval_groups, make_loader
from .prepare import prepare_store
from .split import Split, load_split, propose_split, split_report
from .store import PerturbStore, StoreFormatError
from .synthetic import make_screen, write_screen

__all__ = ["ContractError", "EmptyGroupError", "GeneListError", "InvalidValueError",
           "MissingKeyError", "MissingLabelError", "PerturbStore", "Split", "StoreFormatError",
           "iter_eval_groups", "load_split", "make_loader", "make_screen", "prepare_store",
           "propose_split", "split_report", "write_screen"]
