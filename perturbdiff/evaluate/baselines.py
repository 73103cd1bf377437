"""Simple baselines written in the prediction format the evaluator (and cell-eval) reads.

Every baseline returns a copy of the real test AnnData whose perturbed cells' expression is
replaced by the baseline's prediction for their (context, perturbation) group; the real
control cells, obs columns, cell order and genes are kept. Deltas are fitted on the
``train`` AnnData as pseudobulk effects: effect(p, c) = mean(train cells of p in c) -
mean(train control cells of c). Predictions are clipped at 0 (log1p expression is
non-negative).

Kinds:
* ``control_mean``: the context's real control mean (predicts no effect).
* ``perturbation_mean``: context control mean + the perturbation's effect averaged over the
  training contexts where it was seen; the mean effect over all training groups when unseen.
* ``context_mean``: mean of all perturbed training cells of the context (cell-eval's "cell
  mean" baseline, per context); an unseen context gets its control mean + the mean effect.
* ``linear``: ridge regression of the training effects on one-hot perturbation + one-hot
  context (unpenalised intercept), effect(p, c) ~ b + a_p + g_c; unseen levels contribute 0.
  The additive design is the pseudobulk analogue of Ahlmann-Eltze et al.'s linear baseline.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .inputs import InputError, check_expression, group_means

KINDS = ("control_mean", "perturbation_mean", "context_mean", "linear")


def _contexts(adata: ad.AnnData, key: str | None, which: str) -> np.ndarray:
    if key is None:
        return np.full(adata.n_obs, "")
    if key not in adata.obs.columns:
        raise InputError(f"{which}: obs key {key!r} not found; available: "
                         f"{list(adata.obs.columns)}")
    return adata.obs[key].to_numpy(dtype=str)


def _perts(adata: ad.AnnData, key: str, which: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise InputError(f"{which}: obs key {key!r} not found; available: "
                         f"{list(adata.obs.columns)}")
    return adata.obs[key].to_numpy(dtype=str)


class _TrainEffects:
    """Pseudobulk effects of the training groups, relative to each context's controls."""

    def __init__(self, train: ad.AnnData, pert_key: str, control_label: str,
                 context_key: str | None):
        perts = _perts(train, pert_key, "train")
        ctxs = _contexts(train, context_key, "train")
        keys = sorted(set(zip(ctxs.tolist(), perts.tolist())))
        rows = {k: [] for k in keys}
        for i, k in enumerate(zip(ctxs.tolist(), perts.tolist())):
            rows[k].append(i)
        means = group_means(train.X, [np.asarray(rows[k]) for k in keys])
        by_key = dict(zip(keys, means))
        self.control = {c: m for (c, p), m in by_key.items() if p == control_label}
        missing = sorted({c for c, p in keys if p != control_label} - set(self.control))
        if missing:
            warnings.warn(f"train contexts without control cells are left out of the effect "
                          f"estimates: {missing[:10]}", stacklevel=3)
        self.groups = [(c, p) for c, p in keys if p != control_label and c in self.control]
        if not self.groups:
            raise InputError(f"train has no perturbed group in a context with control cells "
                             f"({pert_key} == {control_label!r})")
        self.effects = np.stack([by_key[k] - self.control[k[0]] for k in self.groups])
        pert_cells = {}
        for (c, p), idx in rows.items():
            if p != control_label:
                pert_cells.setdefault(c, []).extend(idx)
        self.perturbed_mean = {c: np.asarray(train.X[np.asarray(idx)].mean(0)).ravel()
                               for c, idx in pert_cells.items()}

    def mean_effect(self, pert: str | None = None) -> np.ndarray:
        sel = [i for i, (_, p) in enumerate(self.groups) if pert is None or p == pert]
        return self.effects[sel].mean(0) if sel else self.effects.mean(0)

    def ridge(self, lam: float):
        """Fit effect ~ b + a_p + g_c; return a predictor (pert, context) -> effect."""
        perts = sorted({p for _, p in self.groups})
        ctxs = sorted({c for c, _ in self.groups})
        col = {("p", p): i for i, p in enumerate(perts)}
        col.update({("c", c): len(perts) + i for i, c in enumerate(ctxs)})
        design = np.zeros((len(self.groups), len(col)))
        for r, (c, p) in enumerate(self.groups):
            design[r, col[("p", p)]] = design[r, col[("c", c)]] = 1.0
        # Centre both sides so the intercept is not penalised.
        x_mean, y_mean = design.mean(0), self.effects.mean(0)
        xc, yc = design - x_mean, self.effects - y_mean
        coef = np.linalg.solve(xc.T @ xc + lam * np.eye(len(col)), xc.T @ yc)
        intercept = y_mean - x_mean @ coef

        def predict(pert: str, ctx: str) -> np.ndarray:
            out = intercept.copy()
            for k in (("p", pert), ("c", ctx)):
                if k in col:
                    out = out + coef[col[k]]
            return out
        return predict


def make_baseline(kind: str, train: ad.AnnData, real: ad.AnnData, pert_key: str,
                  control_label: str, context_key: str | None = None,
                  ridge_lambda: float = 1.0) -> ad.AnnData:
    """Baseline prediction for every perturbed cell of ``real`` (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline kind {kind!r}; expected one of {KINDS}")
    check_expression(train, "train")
    check_expression(real, "real")
    if list(train.var_names) != list(real.var_names):
        raise InputError("train and real must have the same genes in the same order")
    fit = _TrainEffects(train, pert_key, control_label, context_key)
    predictor = fit.ridge(ridge_lambda) if kind == "linear" else None
    perts = _perts(real, pert_key, "real")
    ctxs = _contexts(real, context_key, "real")
    x = np.empty(real.shape, dtype=np.float32)
    for c in np.unique(ctxs):
        in_ctx = ctxs == c
        ctrl_rows = np.flatnonzero(in_ctx & (perts == control_label))
        if ctrl_rows.size == 0:
            where = f" in context {c!r}" if context_key else ""
            raise InputError(f"real: no control cells ({pert_key} == {control_label!r}){where}")
        ctrl_mean = group_means(real.X, [ctrl_rows])[0]
        block = real.X[ctrl_rows]
        x[ctrl_rows] = block.toarray() if sp.issparse(block) else block
        for p in np.unique(perts[in_ctx & (perts != control_label)]):
            if kind == "control_mean":
                value = ctrl_mean
            elif kind == "perturbation_mean":
                value = ctrl_mean + fit.mean_effect(p)
            elif kind == "context_mean":
                value = fit.perturbed_mean.get(c)
                if value is None:
                    value = ctrl_mean + fit.mean_effect()
            else:
                value = ctrl_mean + predictor(p, c)
            x[in_ctx & (perts == p)] = np.clip(value, 0.0, None)
    out = ad.AnnData(X=x, obs=real.obs.copy(), var=real.var.copy())
    out.uns["perturbdiff_baseline"] = {"kind": kind, "ridge_lambda": float(ridge_lambda)}
    return out
