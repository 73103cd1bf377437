"""Fine-tuning transfer: copy a checkpoint's weights into a model built for another store.

Genes and labels are matched by name. Gene-indexed tensors (input projection columns, output rows,
the covariate projection when its width is the gene count) copy the rows/columns of shared genes;
embedding tables copy the rows of shared labels; every other tensor is copied when its shape
matches. What does not match keeps its fresh initialisation, and the report says so.
"""
from __future__ import annotations

import torch

from .covariates import ROLES


def _gene_axes(cov_is_genes: bool) -> dict[str, int]:
    """Parameter name -> axis indexed by gene, for the gene-sized tensors of `model`."""
    axes = {"backbone.ctrl_embedder.weight": 1, "backbone.final_layer.linear.weight": 0,
            "backbone.final_layer.linear.bias": 0}
    if cov_is_genes:
        axes |= {"covariates.transform.weight": 0, "covariates.transform.bias": 0,
                 "backbone.y_embedder.1.weight": 1}
    return axes


def _label_rows(role: str, encoding: str) -> tuple[str, int] | None:
    """(parameter name, row offset) of the embedding table of a role, if it is label-indexed."""
    if encoding == "onehot":
        return f"covariates.encoders.{role}.weight", 1 if role == "perturbation" else 0
    if encoding == "table":
        return f"covariates.encoders.{role}.table", 0
    return None


@torch.no_grad()
def transfer_weights(model, state: dict[str, torch.Tensor], old_genes: list[str], new_genes: list[str],
                     old_vocab: dict[str, list[str]], new_vocab: dict[str, list[str]],
                     reinit: tuple[str, ...] = ()) -> list[str]:
    """Copy `state` into `model` by name; returns human-readable report lines.

    reinit: parameter-name prefixes to leave freshly initialised (e.g. the output layer).
    """
    report = []
    old_idx = {g: i for i, g in enumerate(old_genes)}
    shared = [(i, old_idx[g]) for i, g in enumerate(new_genes) if g in old_idx]
    new_pos = torch.tensor([n for n, _ in shared], dtype=torch.long)
    old_pos = torch.tensor([o for _, o in shared], dtype=torch.long)
    report.append(f"genes: {len(shared)} of {len(new_genes)} new genes found in the checkpoint "
                  f"({len(old_genes)} genes); the rest start fresh")
    own = model.state_dict()
    cov_is_genes = own["covariates.transform.weight"].shape[0] == len(new_genes)
    gene_axes = _gene_axes(cov_is_genes)
    label_tables = {}
    for role in ROLES:
        loc = _label_rows(role, model.covariates.encodings[role])
        if loc:
            label_tables[loc[0]] = (role, loc[1])
    copied, fresh = 0, []
    for name, target in own.items():
        if any(name.startswith(p) for p in reinit):
            fresh.append(name)
            continue
        src = state.get(name)
        if src is None:
            fresh.append(name)
        elif name == "backbone.x_embedder.weight":  # columns = [genes of x_t | genes of self-cond]
            g_old, g_new = len(old_genes), len(new_genes)
            target[:, new_pos] = src[:, old_pos].to(target.dtype)
            target[:, g_new + new_pos] = src[:, g_old + old_pos].to(target.dtype)
            copied += 1
        elif name in gene_axes and src.shape[gene_axes[name]] == len(old_genes):
            axis = gene_axes[name]
            target.index_copy_(axis, new_pos, src.index_select(axis, old_pos).to(target.dtype))
            copied += 1
        elif name in label_tables and src.dim() == target.dim() and src.shape[1:] == target.shape[1:]:
            role, offset = label_tables[name]
            old_lab = {lab: i for i, lab in enumerate(old_vocab[role])}
            pairs = [(i, old_lab[lab]) for i, lab in enumerate(new_vocab[role]) if lab in old_lab]
            for i, o in pairs:
                target[i + offset] = src[o + offset]
            if offset:
                target[0] = src[0]
            report.append(f"{role}: {len(pairs)} of {len(new_vocab[role])} labels mapped by name; "
                          f"{len(new_vocab[role]) - len(pairs)} new label(s) start fresh")
            copied += 1
        elif src.shape == target.shape:
            target.copy_(src)
            copied += 1
        else:
            fresh.append(name)
    model.load_state_dict(own)
    report.append(f"tensors: {copied} copied, {len(fresh)} re-initialised"
                  + (f" ({', '.join(fresh[:8])}{' ...' if len(fresh) > 8 else ''})" if fresh else ""))
    return report
