"""The full denoiser: covariate encoder + Cross-DiT, built from the ``[model]`` config section."""
from __future__ import annotations

import torch
from torch import nn

from .covariates import ROLES, CovariateEncoder, load_embedding_table, table_for_vocab
from .crossdit import CrossDiT


class PerturbDiffModel(nn.Module):
    """x0 = model(x_t, t, ctrl, pert, context, batch, self_cond, drop_cond).

    x_t, ctrl, self_cond: [B, S, G] (values / 10); t, pert, context, batch: [B] integer codes.
    drop_cond=True replaces the covariates by the learned null embedding (classifier-free guidance);
    the control set is kept, as the authors do.
    """

    def __init__(self, n_genes: int, vocab: dict[str, list[str]], width: int = 512, depth: int = 8,
                 heads: int = 8, mlp_ratio: float = 4.0, cov_dim: int = 128, cov_hidden: int = 0,
                 encodings: dict[str, str] | None = None, tables: dict[str, torch.Tensor] | None = None):
        super().__init__()
        hidden = cov_hidden or n_genes  # the authors' covariate hidden width is G (method.md 8.7)
        self.covariates = CovariateEncoder(vocab, hidden, cov_dim, encodings, tables)
        self.backbone = CrossDiT(n_genes, hidden, width, depth, heads, mlp_ratio)

    @property
    def n_genes(self) -> int:
        return self.backbone.n_genes

    def forward(self, x_t, t, ctrl, pert, context, batch, self_cond=None, drop_cond: bool = False):
        cov = None if drop_cond else self.covariates(pert, context, batch)
        return self.backbone(x_t, t, ctrl, cov, self_cond)


def build_model(model_cfg: dict, genes: list[str], vocab: dict[str, list[str]],
                control_label: str | None = None) -> PerturbDiffModel:
    """Model from a ``[model]`` config section, a gene list and the label vocabularies."""
    encodings = {role: model_cfg[f"{role}_encoding"] for role in ROLES}
    tables = {}
    for role in ROLES:
        if encodings[role] == "table":
            path = model_cfg[f"{role}_table"]
            if not path:
                raise ValueError(f"model.{role}_encoding = 'table' needs model.{role}_table = PATH")
            labels, vectors = load_embedding_table(path)
            tables[role] = table_for_vocab(labels, vectors, vocab[role], role, control_label)
    return PerturbDiffModel(len(genes), vocab, width=model_cfg["width"], depth=model_cfg["depth"],
                            heads=model_cfg["heads"], mlp_ratio=model_cfg["mlp_ratio"],
                            cov_dim=model_cfg["cov_dim"], cov_hidden=model_cfg["cov_hidden"],
                            encodings=encodings, tables=tables)


def build_from_state(model_cfg: dict, genes: list[str], vocab: dict[str, list[str]],
                     state: dict[str, torch.Tensor]) -> PerturbDiffModel:
    """Rebuild a saved model: table encoders take their frozen tables from the state, not from
    files (the checkpoint is self-contained)."""
    encodings = {role: model_cfg[f"{role}_encoding"] for role in ROLES}
    tables = {role: state[f"covariates.encoders.{role}.table"] for role in ROLES if encodings[role] == "table"}
    model = PerturbDiffModel(len(genes), vocab, width=model_cfg["width"], depth=model_cfg["depth"],
                             heads=model_cfg["heads"], mlp_ratio=model_cfg["mlp_ratio"],
                             cov_dim=model_cfg["cov_dim"], cov_hidden=model_cfg["cov_hidden"],
                             encodings=encodings, tables=tables)
    model.load_state_dict(state)
    return model
