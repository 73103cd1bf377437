"""``evaluate()``: cell-eval-compatible metrics of a prediction against the real cells.

Design notes and deliberate differences from cell-eval 0.8.2 (values are otherwise equal):

* Everything is tensor work over all perturbations and genes at once (torch, on ``device``);
  memory is bounded by processing perturbations in chunks of at most ``chunk_elements``
  expression values (cells x genes) per file, densified into one reused buffer per file, or
  ``chunk_elements / 2`` stored values when no metric needs the cells dense.
* On CPU, sparse cells stay sparse: DE runs through a compiled rank-sum kernel (a column's
  zeros are one tie run), and the e-distance and the set distances through compiled distance
  kernels (``sparse_gram.py``), so the work grows with the stored values. With the set
  distances, each perturbation's predicted and real cells form one segment of a joint block
  whose single pass gives both files' within-perturbation distances and the kernel means.
* The control cells of a context are prepared once (split or dense for the e-distance, sorted
  per gene for DE), for both files when the prediction carries the real controls.
* DE is pdex's: Mann-Whitney U per gene vs the control cells (tie-corrected normal
  approximation, continuity correction), BH FDR per perturbation, log2 fold change of
  expm1(mean log1p) pseudobulks with epsilon 0. A gene whose control mean is 0 therefore has
  an infinite fold change; like cell-eval we keep it (it ranks first by |LFC|).
* Discrimination scores hide the target gene's column; a combination "A+B" also hides A and B
  (``target_exclusion="components"``, default; "exact" is cell-eval's rule). Exact distance
  ties are broken by perturbation order (cell-eval's argsort leaves them arbitrary).
* Metrics without a value (e.g. de_direction_match with no real DE gene, an AUC whose labels
  are one class) are NaN in ``per_pert``; aggregates skip them (cell-eval lets a NaN poison
  the mean).
* pearson_edistance and de_spearman_sig are one number per context, repeated on every row of
  that context, as cell-eval repeats them. clustering_agreement (Leiden) is not computed.
* Integer counts are rejected with a message instead of being normalised silently.
* With ``context_key``, groups are (context, perturbation) and each context uses its own
  control cells; discrimination ranks compare perturbations within the same context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import catalog, sparse_gram
from .aggregate import describe
from .de_metrics import de_metrics, de_spearman_sig
from .distribution import (SET_DISTANCES, energy_from_terms, energy_to_control,
                           from_kernel_means, joint_kernels, mean_pairwise_distance,
                           pred_real_distances)
from .expression import discrimination_scores, mean_metrics, target_gene_columns
from .inputs import (ContextGroups, check_expression, check_genes, dense_tensor, group_cells,
                     group_means, load_anndata)
from .ranking import masked_pearson
from .sparse_gram import (SplitCells, dense_genes, density, split_distance_to, split_within,
                          within_genes)
from .wilcoxon import (SortedControl, benjamini_hochberg, log2_fold_change, rank_sum_test,
                       rank_sum_test_sparse, sort_control, sparse_kernel_available)

if TYPE_CHECKING:
    import anndata as ad

DEFAULT_CHUNK_ELEMENTS = 1 << 23  # 8 Mi values (64 MiB in float64) per dense cell block


@dataclass
class EvalResult:
    """Per-perturbation metrics and their aggregate (cell-eval's results / agg_results)."""

    per_pert: pd.DataFrame
    agg: pd.DataFrame
    metrics: list[str]
    pert_key: str
    control_label: str
    context_key: str | None = None

    @property
    def key_columns(self) -> list[str]:
        return (["context"] if self.context_key else []) + ["perturbation"]


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _chunks(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive perturbation ranges whose summed sizes fit the budget (>= 1 each)."""
    out, start, cells = [], 0, 0
    limit = max(1, limit)
    for i, n in enumerate(sizes):
        if i > start and cells + n > limit:
            out.append((start, i))
            start, cells = i, 0
        cells += n
    out.append((start, len(sizes)))
    return out


@dataclass
class _Control:
    """A context's control cells in one file, prepared once for the metrics that use them."""

    x: object  # scipy sparse or numpy rows
    dense: torch.Tensor | None = None
    sq_norms: torch.Tensor | None = None  # e-distance: squared norms of the cells and E|c-c'|
    self_distance: torch.Tensor | None = None
    split: SplitCells | None = None  # sparse e-distance: the controls split by gene
    sorted: SortedControl | None = None  # DE

    def energy_distances(self, cells, offsets: np.ndarray, within_cells=None) -> torch.Tensor:
        """The e-distance of each perturbation of ``cells`` (dense, or ``SplitCells`` when the
        controls are split too), perturbation i owning rows offsets[i]:offsets[i + 1].
        ``within_cells``: the same cells split on other genes for their products with each other
        (``sparse_gram.within_genes``), or None."""
        if self.split is not None:
            among = cells if within_cells is None else within_cells
            return energy_to_control(cells, offsets, self.split, self.sq_norms,
                                     self.self_distance, lambda _, o: split_within(among, o),
                                     split_distance_to)
        return energy_to_control(cells, offsets, self.dense, self.sq_norms, self.self_distance)


def _control(x, need_de: bool, need_edist: bool, dense_genes: np.ndarray | None, device,
             dtype, like: _Control | None = None) -> _Control:
    """``dense_genes``: None for e-distance products on dense cells, else the gene split of
    the sparse products. ``like``: the same cells prepared for the other file, reused but for
    a different gene split."""
    if like is not None:
        if like.split is None or np.array_equal(like.split.dense_genes, dense_genes):
            return like
        return replace(like, split=SplitCells.split(x, dense_genes))
    ctrl = _Control(x)
    if (need_edist and dense_genes is None) or (need_de and not sp.issparse(x)):
        ctrl.dense = dense_tensor(x, device, dtype)
    if need_edist and dense_genes is not None:
        ctrl.split = SplitCells.split(x, dense_genes)
        self_distance, ctrl.sq_norms = split_within(ctrl.split, [0, x.shape[0]])
        ctrl.self_distance = self_distance[0]
    elif need_edist:
        ctrl.self_distance, ctrl.sq_norms = mean_pairwise_distance(ctrl.dense)
    if need_de:  # sparse controls are sorted by their stored values only
        ctrl.sorted = sort_control(x if sp.issparse(x) else ctrl.dense, device)
    return ctrl


def _same_cells(a, b) -> bool:
    if a.shape != b.shape or sp.issparse(a) != sp.issparse(b):
        return False
    return (a != b).nnz == 0 if sp.issparse(a) else np.array_equal(a, b)


@dataclass
class _Side:
    """One file's data for one context: matrix, means and control cells."""

    x: object
    rows: list[np.ndarray]
    means: torch.Tensor
    ctrl_mean: torch.Tensor
    ctrl: _Control
    buffer: np.ndarray | None = None  # reused by dense()

    def stored(self) -> list[int]:
        """Stored values of each perturbation's cells (all values unless the matrix is CSR)."""
        per_row = (np.diff(self.x.indptr) if sp.isspmatrix_csr(self.x)
                   else np.full(self.x.shape[0], self.x.shape[1]))
        return [int(per_row[r].sum()) for r in self.rows]

    def block(self, a: int, b: int) -> "_Block":
        rows = self.rows[a:b]
        return _Block(self.x[np.concatenate(rows)],
                      np.concatenate([[0], np.cumsum([len(r) for r in rows])]))

    def reserve(self, chunks: list[tuple[int, int]]) -> None:
        """Allocate dense()'s buffer once, for the largest block: fresh memory per block (or a
        buffer grown block by block) costs page faults, up to a tenth of the metric time."""
        if sp.issparse(self.x):
            rows = max(sum(len(r) for r in self.rows[a:b]) for a, b in chunks)
            self.buffer = np.empty(rows * self.x.shape[1], self.x.dtype)

    def dense(self, blk: "_Block", device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's cells as a dense tensor (valid until the next call: it may share the
        buffer) and each row's perturbation index."""
        seg = torch.repeat_interleave(torch.arange(len(blk.offsets) - 1),
                                      torch.from_numpy(np.diff(blk.offsets)))
        return dense_tensor(blk.x, device, dtype, self.buffer), seg.to(device)


@dataclass
class _Block:
    """The cells of consecutive perturbations of one file, gathered once per chunk."""

    x: object  # scipy sparse or numpy rows, grouped by perturbation
    offsets: np.ndarray  # [P + 1]: perturbation i owns rows offsets[i]:offsets[i + 1]

    def sets(self, cells) -> list:
        """Each perturbation's rows of the dense tensor ``cells``."""
        return [cells[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def within_cells(self, density: np.ndarray, to_ref: np.ndarray) -> SplitCells | None:
        """The cells split for their products with each other, when that pays apart from
        ``to_ref``, their split for the products with the controls (``within_genes``)."""
        own = within_genes(density, to_ref, np.diff(self.offsets), self.x.nnz)
        return None if own is None else SplitCells.split(self.x, own)

    def de_fdr(self, dense, ctrl: SortedControl, sparse: bool) -> torch.Tensor:
        """BH-adjusted rank-sum p-values [P, G]: the compiled sparse kernel when ``sparse``,
        else the torch test on the dense cells."""
        if sparse:
            return benjamini_hochberg(rank_sum_test_sparse(self.x, self.offsets, ctrl)[1])
        cells, seg = dense
        return benjamini_hochberg(rank_sum_test(cells, seg, len(self.offsets) - 1, ctrl)[1])


def _joint_sparse(pred: _Block, real: _Block, split: np.ndarray, pred_ctrl: _Control,
                  real_ctrl: _Control, need_edist: bool) -> dict[str, torch.Tensor]:
    """The set distances (and e-distances) of sparse cells: each perturbation's predicted and
    real cells become the two parts of one segment of a joint block, so that one
    perturbdiff::within_distance call yields both files' E|x-x'| and the kernel means within and
    between the parts, each Gram entry computed once."""
    pairs = zip(pred.offsets[:-1], pred.offsets[1:], real.offsets[:-1], real.offsets[1:])
    joint = SplitCells.split(sp.vstack([part for a, b, c, d in pairs
                                        for part in (pred.x[a:b], real.x[c:d])], format="csr"),
                             split)
    n_pred, n_real = np.diff(pred.offsets), np.diff(real.offsets)
    offsets = np.concatenate([[0], np.cumsum(n_pred + n_real)])
    cut = offsets[:-1] + n_pred
    distance, sq, means = split_within(joint, offsets, cut, *joint_kernels())
    out = from_kernel_means(means)
    if need_edist:
        # the joint rows of each file, in its block's order
        is_pred = np.repeat(np.tile([True, False], len(n_pred)), np.ravel([n_pred, n_real], "F"))
        rows = np.arange(offsets[-1])
        to_ctrl = {}  # by control object: the files' controls are usually the same cells
        for key, ctrl, within_d, block, mine in (
                ("_edist_pred", pred_ctrl, distance[0], pred, rows[is_pred]),
                ("_edist_real", real_ctrl, distance[1], real, rows[~is_pred])):
            if id(ctrl) not in to_ctrl:
                to_ctrl[id(ctrl)] = split_distance_to(joint, sq, ctrl.split, ctrl.sq_norms)
            out[key] = energy_from_terms(within_d, to_ctrl[id(ctrl)][torch.from_numpy(mine)],
                                         block.offsets, ctrl.self_distance)
    return out


def _side(x, rows, ctrl_rows, ctrl: _Control, device, dtype) -> _Side:
    means = torch.from_numpy(group_means(x, [ctrl_rows] + rows)).to(device, dtype)
    return _Side(x=x, rows=rows, means=means[1:], ctrl_mean=means[0], ctrl=ctrl)


def _evaluate_context(groups: ContextGroups, real: ad.AnnData, pred: ad.AnnData,
                      genes: np.ndarray, wanted: set[str], target_exclusion: str,
                      chunk_elements: int, device, dtype,
                      cell_density: tuple[np.ndarray, np.ndarray] | None, bar) -> pd.DataFrame:
    """One context's metrics. ``cell_density``: the real and the predicted file's per-gene
    density, given when both files are sparse and a metric multiplies cells on the CPU."""
    need_de = bool(wanted & set(catalog.DE_METRICS))
    need_edist = "pearson_edistance" in wanted
    need_sets = bool(wanted & SET_DISTANCES.keys())
    need_cells = need_de or need_edist or need_sets
    on_cpu64 = torch.device(device).type == "cpu" and dtype == torch.float64
    # On CPU compiled kernels test sparse columns for DE (zeros as one tie run) and multiply
    # sparse cells for the e-distance and set distances; elsewhere (and for dense inputs) torch
    # works densely.
    sparse_de = on_cpu64 and sparse_kernel_available()
    sparse_cells = ((need_edist or need_sets) and on_cpu64 and sparse_gram.available()
                    and cell_density is not None)
    ctrl_x = real.X[groups.real_ctrl], pred.X[groups.pred_ctrl]
    split_r = split_p = None
    if sparse_cells:  # each file's gene split for its products with its controls ...
        split_r, split_p = (dense_genes(d, density(c)) for d, c in zip(cell_density, ctrl_x))
        if need_sets:  # ... or one for both, when predicted cells meet real ones
            split_r = split_p = split_r | split_p
    ctrl_r = _control(ctrl_x[0], need_de, need_edist, split_r, device, dtype)
    # A prediction normally carries the real control cells: prepare them once.
    ctrl_p = _control(ctrl_x[1], need_de, need_edist, split_p, device, dtype,
                      like=ctrl_r if _same_cells(ctrl_r.x, ctrl_x[1]) else None)
    r = _side(real.X, groups.real_rows, groups.real_ctrl, ctrl_r, device, dtype)
    p = _side(pred.X, groups.pred_rows, groups.pred_ctrl, ctrl_p, device, dtype)
    cols: dict[str, torch.Tensor] = dict(mean_metrics(r.means, p.means, r.ctrl_mean,
                                                      p.ctrl_mean))
    if wanted & {f"discrimination_score_{m}" for m in ("l1", "l2", "cosine")}:
        excluded = target_gene_columns(groups.perts, genes, target_exclusion)
        cols.update(discrimination_scores(r.means - r.ctrl_mean, p.means - p.ctrl_mean,
                                          excluded))
    chunk_cols: dict[str, list[torch.Tensor]] = {}
    if need_cells:
        need_dense = ((need_edist or need_sets) and not sparse_cells) or (need_de and not sparse_de)
        if need_dense:  # the budget bounds each file's dense block
            chunks = _chunks([len(a) + len(b) for a, b in zip(groups.real_rows, groups.pred_rows)],
                             chunk_elements // len(genes))
        else:  # cells stay sparse: the budget bounds stored values (halved: faster conversions)
            chunks = _chunks([a + b for a, b in zip(r.stored(), p.stored())], chunk_elements // 2)
        if need_dense:
            r.reserve(chunks)
            p.reserve(chunks)
        for a, b in chunks:
            real_blk, pred_blk = r.block(a, b), p.block(a, b)
            real_dense = pred_dense = real_cells = pred_cells = None
            if need_dense:
                real_dense = r.dense(real_blk, device, dtype)
                pred_dense = p.dense(pred_blk, device, dtype)
                real_cells, pred_cells = real_dense[0], pred_dense[0]
            within_r = within_p = None
            if sparse_cells and not need_sets:
                real_cells = SplitCells.split(real_blk.x, split_r)
                pred_cells = SplitCells.split(pred_blk.x, split_p)
                within_r = real_blk.within_cells(cell_density[0], split_r)
                within_p = pred_blk.within_cells(cell_density[1], split_p)
            out: dict[str, torch.Tensor] = {}
            if need_de:
                fdr_r = real_blk.de_fdr(real_dense, r.ctrl.sorted, sparse_de)
                fdr_p = pred_blk.de_fdr(pred_dense, p.ctrl.sorted, sparse_de)
                out.update(de_metrics(fdr_r, log2_fold_change(r.means[a:b], r.ctrl_mean),
                                      fdr_p, log2_fold_change(p.means[a:b], p.ctrl_mean)))
            if sparse_cells and need_sets:  # both files' products in one pass
                out.update(_joint_sparse(pred_blk, real_blk, split_r, p.ctrl, r.ctrl, need_edist))
            else:
                if need_edist:
                    out["_edist_real"] = r.ctrl.energy_distances(real_cells, real_blk.offsets,
                                                                 within_r)
                    out["_edist_pred"] = p.ctrl.energy_distances(pred_cells, pred_blk.offsets,
                                                                 within_p)
                if need_sets:
                    out.update(pred_real_distances(pred_blk.sets(pred_cells),
                                                   real_blk.sets(real_cells)))
            for k, v in out.items():
                chunk_cols.setdefault(k, []).append(v.detach())
            bar.update(b - a)
    else:
        bar.update(len(groups.perts))
    cols.update({k: torch.cat(v) for k, v in chunk_cols.items()})
    n = len(groups.perts)
    if need_de:
        cols["de_spearman_sig"] = torch.full(
            (n,), de_spearman_sig(cols["de_nsig_counts_real"], cols["de_nsig_counts_pred"]))
    if need_edist:
        # One Pearson correlation across the context's perturbations (scipy's pearsonr).
        value = masked_pearson(cols.pop("_edist_real")[None], cols.pop("_edist_pred")[None])
        cols["pearson_edistance"] = value.expand(n)
    keys = ({"context": [groups.context] * n} if groups.context is not None else {}) | {
        "perturbation": groups.perts}
    return pd.DataFrame(keys | {m: cols[m].to(torch.float64).cpu().numpy()
                                for m in catalog.ALL_METRICS if m in wanted})


def evaluate(pred: ad.AnnData | str | os.PathLike, real: ad.AnnData | str | os.PathLike,
             pert_key: str, control_label: str, context_key: str | None = None,
             profile: str = "full", device: str | torch.device | None = None,
             progress: bool = True, *, target_exclusion: str = "components",
             chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> EvalResult:
    """Score predicted cells against real cells, per perturbation (and context).

    pred, real: AnnData or .h5ad paths with log1p expression, the same genes in the same
    order, the same (context, perturbation) groups, and control cells in every context (the
    prediction carries the real controls). Returns per-perturbation metrics and aggregates.
    """
    metrics = catalog.profile_metrics(profile)
    keys = (pert_key,) + ((context_key,) if context_key else ())
    real_ad = load_anndata(real, "real", keys)
    pred_ad = load_anndata(pred, "pred", keys)
    genes = check_genes(real_ad, pred_ad)
    check_expression(real_ad, "real")
    check_expression(pred_ad, "pred")
    contexts = group_cells(real_ad, pred_ad, pert_key, control_label, context_key)
    dev = _device(device)
    # The gene split of the sparse products starts from the files' densities: once, not per
    # context.
    multiplies = bool(set(metrics) & {"pearson_edistance", *SET_DISTANCES})
    cell_density = ((density(real_ad.X), density(pred_ad.X))
                    if multiplies and dev.type == "cpu" and sp.issparse(real_ad.X)
                    and sp.issparse(pred_ad.X) else None)
    total = sum(len(g.perts) for g in contexts)
    frames = []
    with tqdm(total=total, desc="evaluate", unit="pert", disable=not progress) as bar:
        for groups in contexts:
            frames.append(_evaluate_context(groups, real_ad, pred_ad, genes, set(metrics),
                                            target_exclusion, chunk_elements, dev,
                                            torch.float64, cell_density, bar))
    per_pert = pd.concat(frames, ignore_index=True)
    return EvalResult(per_pert=per_pert, agg=describe(per_pert, metrics), metrics=metrics,
                      pert_key=pert_key, control_label=control_label,
                      context_key=context_key)
