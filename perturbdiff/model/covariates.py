"""Covariate encoder (method.md 2.5): perturbation, context and batch labels -> one code per set.

Each role is encoded to 128 dims by one of
* ``onehot``: a learned ``nn.Embedding`` (PyTorch default init N(0, 1), as the authors). The
  perturbation table has one extra row 0 reserved for "no perturbation" and is indexed with code+1;
* ``none``: one constant learned vector (the authors' ``pert_encoding=non`` for pretraining);
* ``table``: a frozen user-supplied embedding table (e.g. GenePT gene vectors, LLM cell-type
  summaries, drug embeddings) keyed by label, followed by a trainable Linear(E -> 128).
The three codes are concatenated (384) and projected by Linear(384 -> hidden). The authors' hidden
width equals the gene count G (method.md 8.7); the backbone then maps SiLU(code) to its width.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .crossdit import FewRowsLinear

ROLES = ("perturbation", "context", "batch")
ENCODINGS = ("onehot", "none", "table")


def load_embedding_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a label -> vector table.

    ``.csv``/``.tsv``: first column = label, remaining columns = vector (a header row is allowed).
    ``.npy``: a 2-D float array whose row labels are in ``<same name>.labels.txt`` (one per line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding table {path} does not exist")
    if path.suffix == ".npy":
        labels_path = path.with_suffix(".labels.txt")
        if not labels_path.is_file():
            raise FileNotFoundError(f"embedding table {path} needs its row labels in {labels_path}")
        vectors = np.load(path, allow_pickle=False)
        labels = labels_path.read_text().splitlines()
    elif path.suffix in (".csv", ".tsv"):
        import pandas as pd

        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", header=None, dtype=str)
        try:
            float(frame.iat[0, 1])
        except ValueError:  # a header row
            frame = frame.iloc[1:]
        labels = frame.iloc[:, 0].tolist()
        try:
            vectors = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
        except ValueError as err:
            raise ValueError(f"embedding table {path}: non-numeric vector entries ({err})") from None
    else:
        raise ValueError(f"embedding table {path}: expected a .csv, .tsv or .npy file")
    if vectors.ndim != 2 or len(labels) != vectors.shape[0]:
        raise ValueError(f"embedding table {path}: {len(labels)} labels for an array of shape {vectors.shape}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"embedding table {path}: duplicate labels")
    if not np.isfinite(vectors).all():
        raise ValueError(f"embedding table {path} contains NaN or Inf values")
    return labels, vectors.astype(np.float32)


def table_for_vocab(labels: list[str], vectors: np.ndarray, vocab: list[str], role: str,
                    control_label: str | None = None) -> torch.Tensor:
    """Rows of `vectors` in vocabulary order. Labels missing from the table get zeros (as the
    authors' GenePT table), except the control perturbation, which gets the table mean."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(vocab), vectors.shape[1]), dtype=np.float32)
    missing = []
    for row, label in enumerate(vocab):
        if label in index:
            out[row] = vectors[index[label]]
        elif role == "perturbation" and label == control_label:
            out[row] = vectors.mean(0)
        else:
            missing.append(label)
    if len(missing) == len(vocab):
        raise ValueError(f"{role} embedding table shares no label with the vocabulary "
                         f"(e.g. {vocab[:3]} vs {labels[:3]})")
    if missing:
        warnings.warn(f"{role} embedding table lacks {len(missing)} label(s), encoded as zeros: "
                      f"{missing[:10]}{' ...' if len(missing) > 10 else ''}", stacklevel=2)
    return torch.from_numpy(out)


class TableEncoder(nn.Module):
    """Frozen label -> vector table (a buffer, saved with the model) + trainable Linear(E -> dim)."""

    def __init__(self, table: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("table", table.float())
        self.linear = nn.Linear(table.shape[1], dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.linear(self.table[codes])


class CovariateEncoder(nn.Module):
    """(pert, context, batch) codes [B] -> covariate code [B, hidden].

    vocab: labels per role (codes index these lists); encodings: role -> one of ENCODINGS;
    tables: role -> [len(vocab[role]), E] tensor for the ``table`` encoding.
    """

    def __init__(self, vocab: dict[str, list[str]], hidden: int, dim: int = 128,
                 encodings: dict[str, str] | None = None, tables: dict[str, torch.Tensor] | None = None):
        super().__init__()
        encodings = {role: "onehot" for role in ROLES} | dict(encodings or {})
        tables = tables or {}
        self.vocab_sizes = {role: len(vocab[role]) for role in ROLES}
        self.encodings = encodings
        self.encoders = nn.ModuleDict()
        for role in ROLES:
            enc = encodings[role]
            if enc == "onehot":
                extra = 1 if role == "perturbation" else 0  # row 0 = "no perturbation"
                self.encoders[role] = nn.Embedding(len(vocab[role]) + extra, dim)
            elif enc == "none":
                self.encoders[role] = nn.Embedding(1, dim)
            elif enc == "table":
                if role not in tables:
                    raise ValueError(f"{role} encoding is 'table' but no embedding table was given")
                if tables[role].shape[0] != len(vocab[role]):
                    raise ValueError(f"{role} table has {tables[role].shape[0]} rows for "
                                     f"{len(vocab[role])} vocabulary labels")
                self.encoders[role] = TableEncoder(tables[role], dim)
            else:
                raise ValueError(f"unknown {role} encoding {enc!r}; expected one of {ENCODINGS}")
        self.transform = FewRowsLinear(len(ROLES) * dim, hidden)  # nn.Linear, streaming for few rows

    def forward(self, pert: torch.Tensor, context: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        codes = {"perturbation": pert, "context": context, "batch": batch}
        parts = []
        for role in ROLES:
            c = codes[role].long()
            if self.encodings[role] == "none":
                c = torch.zeros_like(c)
            else:
                if not torch.compiler.is_compiling() and c.numel() and (
                        int(c.min()) < 0 or int(c.max()) >= self.vocab_sizes[role]):
                    raise ValueError(f"{role} code out of range [0, {self.vocab_sizes[role]}): "
                                     f"got {int(c.min())}..{int(c.max())}")
                if self.encodings[role] == "onehot" and role == "perturbation":
                    c = c + 1
            parts.append(self.encoders[role](c))
        return self.transform(torch.cat(parts, dim=-1))
