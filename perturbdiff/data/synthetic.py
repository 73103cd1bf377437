"""Synthetic perturbation screens with known ground truth (raw negative-binomial counts).

Generative model, per cell i of (perturbation p, context c, batch b, hidden well w)::

    state_i  = ctx_prog[c] + well_prog[w] + N(0, cell_sd^2)            # program activity [K]
    logit_ig = base[g] + ctx_gene[c, g] + batch_gene[b, g] + (state_i + r_i * eff[p, c]) @ W[:, g]
               + r_i * knockdown * [g == target(p)]
    counts   ~ NB(mean = L_i * softmax_g(logit_i), dispersion theta)

* W [K, G]: sparse gene programs (each touches ~5 % of genes, signed loadings).
* eff[p, c] = resp[c] * shared[p] + N(0, context_specific_sd^2) on the programs p acts on: the
  effect of p in a held-out context is mostly predictable from its effect elsewhere and the
  context's own baseline, but not identical.
* r_i ~ Bernoulli(penetrance[w]): each well (a hidden replicate, ~256 cells) has its own response
  penetrance and program offset, so sets of one group differ (a distribution over distributions).
* L_i: log-normal library sizes scaled per batch.

Ground truth goes to ``.uns["synthetic"]`` (see :func:`gene_effects` for gene-level effects).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..atomic import atomic_file

CONTROL = "control"
OBS_KEYS = {"perturbation": "perturbation", "context": "cell_type", "batch": "batch"}
WELL_SIZE = 256


@dataclass
class ScreenParams:
    n_cells: int = 20_000
    n_genes: int = 2000
    n_perturbations: int = 20
    n_contexts: int = 4
    n_batches: int = 2
    n_programs: int = 20
    control_fraction: float = 0.15
    # Median UMIs per cell over the simulated genes; default 0.2 per gene (400 at 2,000 HVG-like
    # genes: ~91 % zeros, PBMC-like; 3,600 at 18,000 genes, a typical whole-transcriptome depth).
    library_size: float | None = None
    library_sd: float = 0.4          # log-normal sd of library sizes
    theta: float = 0.5               # NB inverse dispersion (smaller = more overdispersed)
    effect_sd: float = 2.0           # shared perturbation effect on its programs
    context_specific_sd: float = 0.35
    knockdown: float = -2.5          # on-target log effect (CRISPRi-like)
    cell_sd: float = 0.3
    well_sd: float = 0.1           # per-well program offsets (group-level noise that sets see)
    seed: int = 0


class ScreenModel:
    """All ground-truth parameters of one screen, drawn from ``params.seed``."""

    def __init__(self, params: ScreenParams):
        if params.n_perturbations > params.n_genes:
            raise ValueError("n_perturbations must be <= n_genes (each perturbation targets a gene)")
        for name in ("n_cells", "n_genes", "n_perturbations", "n_contexts", "n_batches", "n_programs"):
            if getattr(params, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(params, name)}")
        if params.library_size is None:
            params = replace(params, library_size=0.2 * params.n_genes)
        self.p = p = params
        rng = np.random.default_rng([p.seed, 0])
        G, K, C, B, P = p.n_genes, p.n_programs, p.n_contexts, p.n_batches, p.n_perturbations
        self.genes = [f"G{g:05d}" for g in range(G)]
        # Heavy-tailed gene abundances give realistic sparsity: most genes are rarely detected.
        self.base = rng.normal(0.0, 2.0, G).astype(np.float32)
        self.W = (rng.normal(0.0, 0.8, (K, G)) * (rng.random((K, G)) < 0.05)).astype(np.float32)
        self.ctx_prog = rng.normal(0.0, 0.7, (C, K)).astype(np.float32)
        self.ctx_gene = rng.normal(0.0, 0.25, (C, G)).astype(np.float32)
        self.batch_gene = rng.normal(0.0, 0.1, (B, G)).astype(np.float32)
        self.batch_lib = np.exp(rng.normal(0.0, 0.15, B))
        acts = rng.random((P, K)) < 3.0 / K  # each perturbation drives ~3 programs
        acts[np.arange(P), rng.integers(0, K, P)] = True
        self.shared = (rng.normal(0.0, p.effect_sd, (P, K)) * acts).astype(np.float32)
        self.response = rng.uniform(0.6, 1.4, C).astype(np.float32)
        self.effect = (self.response[None, :, None] * self.shared[:, None, :]
                       + rng.normal(0.0, p.context_specific_sd, (P, C, K)) * acts[:, None, :]
                       ).astype(np.float32)
        # Targets among the better-expressed genes, so the knock-down is visible.
        self.target = rng.choice(np.argsort(-self.base)[: max(P, G // 4)], P, replace=False)
        self.pert_names = [self.genes[t] for t in self.target]
        self.contexts = [f"ctx{c}" for c in range(C)]
        self.batches = [f"batch{b}" for b in range(B)]
        self._layout(rng)

    def _layout(self, rng: np.random.Generator) -> None:
        """Assign cells to groups and hidden wells, in a shuffled file order."""
        p = self.p
        n_ctrl = int(round(p.control_fraction * p.n_cells))
        pert_groups = p.n_perturbations * p.n_contexts * p.n_batches
        share = rng.dirichlet(np.full(pert_groups, 5.0))
        counts = np.concatenate([_split_count(n_ctrl, np.full(p.n_contexts * p.n_batches, 1.0), rng),
                                 _split_count(p.n_cells - n_ctrl, share, rng)])
        # Group g: control groups first (pert code -1), then perturbation-major.
        ctrl_cb = np.arange(p.n_contexts * p.n_batches)
        pcb = np.arange(pert_groups)
        pert = np.concatenate([np.full(ctrl_cb.size, -1), pcb // (p.n_contexts * p.n_batches)])
        cb = np.concatenate([ctrl_cb, pcb % (p.n_contexts * p.n_batches)])
        group = np.repeat(np.arange(counts.size), counts)
        wells_per_group = np.maximum(1, np.round(counts / WELL_SIZE)).astype(np.int64)
        well_offset = np.cumsum(wells_per_group) - wells_per_group
        well = well_offset[group] + np.floor(rng.random(group.size) * wells_per_group[group]).astype(np.int64)
        n_wells = int(wells_per_group.sum())
        self.well_prog = rng.normal(0.0, p.well_sd, (n_wells, p.n_programs)).astype(np.float32)
        self.penetrance = rng.beta(6.0, 2.0, n_wells).astype(np.float32)
        order = rng.permutation(group.size)
        self.cell_pert = pert[group][order]
        self.cell_ctx = (cb[group] // p.n_batches)[order]
        self.cell_batch = (cb[group] % p.n_batches)[order]
        self.cell_well = well[order]
        self.responder = (rng.random(group.size) < self.penetrance[self.cell_well]) & (self.cell_pert >= 0)

    def obs(self) -> pd.DataFrame:
        labels = np.array([CONTROL] + self.pert_names, dtype=object)[self.cell_pert + 1]
        return pd.DataFrame({
            OBS_KEYS["perturbation"]: pd.Categorical(labels),
            OBS_KEYS["context"]: pd.Categorical(np.array(self.contexts, dtype=object)[self.cell_ctx]),
            OBS_KEYS["batch"]: pd.Categorical(np.array(self.batches, dtype=object)[self.cell_batch]),
            "well": self.cell_well.astype(np.int64),
            "responder": self.responder,
        }, index=pd.Index([f"cell{i:08d}" for i in range(self.p.n_cells)]))

    def ground_truth(self) -> dict:
        return {"program_loadings": self.W, "base_logit": self.base, "context_programs": self.ctx_prog,
                "context_genes": self.ctx_gene, "batch_genes": self.batch_gene,
                "shared_effect": self.shared, "effect": self.effect,
                "context_response": self.response, "target_gene": self.target.astype(np.int64),
                "knockdown": self.p.knockdown, "perturbations": np.array(self.pert_names, dtype=object),
                "contexts": np.array(self.contexts, dtype=object),
                "well_penetrance": self.penetrance, "well_programs": self.well_prog,
                "params": asdict(self.p)}

    def counts(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of cells ``start:stop`` (float32 integers), seeded per (seed, start)."""
        rng = np.random.default_rng([self.p.seed, 1, start])
        pert, ctx, batch = self.cell_pert[start:stop], self.cell_ctx[start:stop], self.cell_batch[start:stop]
        resp = self.responder[start:stop]
        n = stop - start
        state = (self.ctx_prog[ctx] + self.well_prog[self.cell_well[start:stop]]
                 + rng.normal(0.0, self.p.cell_sd, (n, self.p.n_programs)).astype(np.float32))
        state[resp] += self.effect[pert[resp], ctx[resp]]
        logit = state @ self.W
        logit += self.base
        logit += self.ctx_gene[ctx]
        logit += self.batch_gene[batch]
        hit = np.flatnonzero(resp)
        logit[hit, self.target[pert[hit]]] += self.p.knockdown
        logit -= logit.max(axis=1, keepdims=True)
        np.exp(logit, out=logit)
        lib = self.p.library_size * np.exp(rng.normal(0.0, self.p.library_sd, n)) * self.batch_lib[batch]
        mean = logit * (lib / logit.sum(axis=1))[:, None].astype(np.float32)
        # NB as a Poisson-Gamma mixture; float32 gamma draws are ~2x cheaper than float64.
        rate = rng.standard_gamma(self.p.theta, size=mean.shape, dtype=np.float32)
        rate *= mean * np.float32(1.0 / self.p.theta)
        counts = rng.poisson(rate).astype(np.float32)
        return sp.csr_matrix(counts)


def _split_count(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``total`` cells over groups in proportion to ``weights``; every group gets at least one."""
    if total < weights.size:
        raise ValueError(f"{total} cells cannot fill {weights.size} groups; raise n_cells")
    return 1 + rng.multinomial(total - weights.size, weights / weights.sum())


def _chunk_rows(n_genes: int, chunk_size: int | None) -> int:
    # ~20M dense values per chunk bounds the float temporaries to a few hundred MB.
    return chunk_size or max(1, 20_000_000 // n_genes)


def _iter_counts(model: ScreenModel, step: int, workers: int, progress: bool,
                 desc: str) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Count blocks in row order. Each block is seeded by its first row, so the result is the
    same for any number of worker processes; at most 2 x workers blocks are in flight."""
    starts = range(0, model.p.n_cells, step)
    bar = tqdm(total=len(starts), desc=desc, unit="chunk", disable=not progress)
    if workers <= 1:
        for a in starts:
            yield a, model.counts(a, min(a + step, model.p.n_cells))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(model,)) as pool:
            pending: deque = deque()
            for a in starts:
                pending.append((a, pool.submit(_worker_counts, a, min(a + step, model.p.n_cells))))
                if len(pending) >= 2 * workers:
                    first, future = pending.popleft()
                    yield first, future.result()
                    bar.update()
            for first, future in pending:
                yield first, future.result()
                bar.update()
    bar.close()


_WORKER_MODEL: ScreenModel | None = None


def _init_worker(model: ScreenModel) -> None:
    global _WORKER_MODEL
    _WORKER_MODEL = model


def _worker_counts(start: int, stop: int) -> sp.csr_matrix:
    return _WORKER_MODEL.counts(start, stop)


def make_screen(n_cells: int = 20_000, n_genes: int = 2000, n_perturbations: int = 20,
                n_contexts: int = 4, n_batches: int = 2, seed: int = 0, chunk_size: int | None = None,
                progress: bool = False, workers: int = 1, **params) -> ad.AnnData:
    """An in-memory synthetic screen (raw counts in CSR ``.X``); ground truth in ``.uns``."""
    model = ScreenModel(ScreenParams(n_cells=n_cells, n_genes=n_genes, n_perturbations=n_perturbations,
                                     n_contexts=n_contexts, n_batches=n_batches, seed=seed, **params))
    blocks = [b for _, b in _iter_counts(model, _chunk_rows(n_genes, chunk_size), workers, progress, "synth")]
    return ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=model.obs(),
                      var=pd.DataFrame(index=pd.Index(model.genes)),
                      uns={"synthetic": model.ground_truth()})


def write_screen(path: str | os.PathLike, n_cells: int = 1_000_000, n_genes: int = 18_000,
                 n_perturbations: int = 100, n_contexts: int = 8, n_batches: int = 4, seed: int = 0,
                 chunk_size: int | None = None, progress: bool = True, workers: int = 1,
                 **params) -> Path:
    """Stream a synthetic screen to an h5ad without holding the matrix in memory: the h5ad is
    written without X by anndata, then X is appended chunk by chunk as a CSR group with h5py."""
    model = ScreenModel(ScreenParams(n_cells=n_cells, n_genes=n_genes, n_perturbations=n_perturbations,
                                     n_contexts=n_contexts, n_batches=n_batches, seed=seed, **params))
    step = _chunk_rows(n_genes, chunk_size)
    shell = ad.AnnData(obs=model.obs(), var=pd.DataFrame(index=pd.Index(model.genes)),
                       uns={"synthetic": model.ground_truth()})
    with atomic_file(path) as tmp:
        shell.write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            group = f.create_group("X")
            group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                "shape": np.array([n_cells, n_genes])})
            data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                                        chunks=(1 << 18,))
            indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                           chunks=(1 << 18,))
            indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
            indptr[0] = 0
            nnz = 0
            for a, block in _iter_counts(model, step, workers, progress, "synth write"):
                data.resize((nnz + block.nnz,))
                indices.resize((nnz + block.nnz,))
                data[nnz:] = block.data
                indices[nnz:] = block.indices
                indptr[a + 1:a + 1 + block.shape[0]] = nnz + block.indptr[1:]
                nnz += block.nnz
    return Path(path)


def gene_effects(truth: dict) -> np.ndarray:
    """Ground-truth log-scale effect of each perturbation in each context on each gene
    (before library normalisation): ``[P, C, G]`` = effect @ W plus the on-target knock-down."""
    effect = np.einsum("pck,kg->pcg", truth["effect"], truth["program_loadings"])
    target = np.asarray(truth["target_gene"])
    effect[np.arange(target.size), :, target] += truth["knockdown"]
    return effect
