"""Metric definitions against hand-checkable examples and scipy/sklearn, input errors,
baselines and report files."""

import math
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as ss
from scipy.spatial.distance import cdist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score

from perturbdiff._extension import has_kernel
from perturbdiff.evaluate import InputError, describe, evaluate, score_tables
from perturbdiff.evaluate.inputs import StoredCells, load_anndata
from perturbdiff.evaluate.baselines import make_baseline
from perturbdiff.evaluate import de_metrics as de_metrics_module
from perturbdiff.evaluate.de_metrics import de_metrics, de_spearman_sig
from perturbdiff.evaluate.distribution import energy_to_control, mean_pairwise_distance
from perturbdiff.evaluate.expression import discrimination_scores, mean_metrics
from perturbdiff.evaluate.ranking import (ascending_order, average_precision_rows, masked_average_ranks,
                                          masked_spearman, roc_auc_rows)
from perturbdiff.evaluate.report import write_report
from perturbdiff.evaluate.wilcoxon import (benjamini_hochberg, log2_fold_change, rank_sum_test,
                                           rank_sum_test_sparse, sort_control,
                                           sparse_kernel_available)

small_ints = st.lists(st.integers(0, 4), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(ctrl=small_ints, a=small_ints, b=small_ints)
def test_rank_sum_matches_scipy(ctrl, a, b):
    ctrl_t = torch.tensor(ctrl, dtype=torch.float64)[:, None]
    cells = torch.tensor(a + b, dtype=torch.float64)[:, None]
    seg = torch.tensor([0] * len(a) + [1] * len(b))
    u, p = rank_sum_test(cells, seg, 2, sort_control(ctrl_t))
    for i, x in enumerate((a, b)):
        if len(set(x) | set(ctrl)) == 1:  # scipy returns NaN; pdex defines p = 1
            assert p[i, 0] == 1.0
            continue
        ref = ss.mannwhitneyu(x, ctrl, method="asymptotic")
        assert u[i, 0].item() == pytest.approx(ref.statistic, abs=1e-9)
        assert p[i, 0].item() == pytest.approx(ref.pvalue, abs=1e-12)


needs_sparse_kernel = pytest.mark.skipif(not sparse_kernel_available(), reason="perturbdiff._C not built")


@needs_sparse_kernel
@settings(max_examples=60, deadline=None)
@given(data=st.data(), genes=st.integers(1, 6), sizes=st.lists(st.integers(1, 12), min_size=1,
                                                                  max_size=4),
       n_ctrl=st.integers(1, 15))
def test_sparse_rank_sum_kernel_matches_torch(data, genes, sizes, n_ctrl):
    # Small integer values (many ties, zeros, negatives) stress the tie and zero-run handling.
    values = st.integers(-2, 3).map(float)
    cells = np.array(data.draw(st.lists(st.lists(values, min_size=genes, max_size=genes),
                                        min_size=sum(sizes), max_size=sum(sizes))))
    ctrl = np.array(data.draw(st.lists(st.lists(values, min_size=genes, max_size=genes),
                                       min_size=n_ctrl, max_size=n_ctrl)))
    sorted_ctrl = sort_control(torch.from_numpy(ctrl))
    from_sparse = sort_control(sp.csr_matrix(ctrl))  # zeros as one run among negatives/positives
    assert torch.equal(from_sparse.values, sorted_ctrl.values)
    assert torch.equal(from_sparse.tie_term, sorted_ctrl.tie_term)
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    u_ref, p_ref = rank_sum_test(torch.from_numpy(cells), seg, len(sizes), sorted_ctrl)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    stored = sp.csr_matrix(cells)
    if data.draw(st.booleans()) and cells[0, 0] == 0:  # explicitly stored zeros count as zeros
        coo = stored.tocoo()
        stored = sp.csr_matrix((np.append(coo.data, 0.0), (np.append(coo.row, 0),
                                                            np.append(coo.col, 0))), shape=cells.shape)
    if data.draw(st.booleans()):  # int64 indices, any sparse format
        stored = sp.csc_matrix(stored)
        stored.indices, stored.indptr = stored.indices.astype(np.int64), stored.indptr.astype(np.int64)
    u, p = rank_sum_test_sparse(stored, offsets, sorted_ctrl)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)


@needs_sparse_kernel
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pool=st.integers(20, 400), n_ctrl=st.integers(1, 200),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=3), fill=st.floats(0.05, 1.0),
       heavy_tail=st.booleans())
def test_sparse_rank_sum_kernel_matches_torch_on_mostly_distinct_values(seed, pool, n_ctrl, sizes,
                                                                         fill, heavy_tail):
    """Values from a pool of distinct floats (negatives included, shared with the controls): groups
    without a repeated value take the kernel's one-by-one search (through a bucket table over the
    positive controls from 8 of them on: heavy tails fill few buckets), the others its sorted runs;
    groups of more than 512 values always sort."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 2, pool)
    if heavy_tail:
        values = np.sign(values) * np.expm1(3 * np.abs(values))
    genes = 3
    cells = rng.choice(values, (sum(sizes), genes)) * (rng.random((sum(sizes), genes)) < fill)
    ctrl = rng.choice(values, (n_ctrl, genes)) * (rng.random((n_ctrl, genes)) < fill)
    sorted_ctrl = sort_control(torch.from_numpy(ctrl))
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    u_ref, p_ref = rank_sum_test(torch.from_numpy(cells), seg, len(sizes), sorted_ctrl)
    u, p = rank_sum_test_sparse(sp.csr_matrix(cells), np.concatenate([[0], np.cumsum(sizes)]),
                                sort_control(sp.csr_matrix(ctrl)))
    torch.testing.assert_close(u, u_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)


@needs_sparse_kernel
def test_rank_sum_op_opcheck():
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    rng = np.random.default_rng(0)
    cells = sp.random(20, 7, density=0.3, format="csr", random_state=1)
    ctrl = torch.sort(torch.from_numpy(rng.random((7, 9))), dim=1).values
    for index in (np.int32, np.int64):
        args = (torch.from_numpy(cells.indptr.astype(index)),
                torch.from_numpy(cells.indices.astype(index)), torch.from_numpy(cells.data),
                torch.tensor([0, 5, 20]), ctrl)
        torch.library.opcheck(torch.ops.perturbdiff.rank_sum.default, args)
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\)"):
        torch.ops.perturbdiff.rank_sum(*args[:4], ctrl[:3])  # fewer control genes than columns
    with pytest.raises(ValueError, match="seg_start must run from 0 to the number of cells"):
        torch.ops.perturbdiff.rank_sum(*args[:3], torch.tensor([0, 5, 19]), ctrl)
    with pytest.raises(ValueError, match="seg_start decrease at segment 1"):
        torch.ops.perturbdiff.rank_sum(*args[:3], torch.tensor([0, 6, 5, 20]), ctrl)
    unsorted = args[1].clone()
    row = int(np.argmax(np.diff(cells.indptr) > 1))  # a row with two stored values
    unsorted[cells.indptr[row]:cells.indptr[row] + 2] = unsorted[cells.indptr[row]:cells.indptr[row] + 2].flip(0)
    with pytest.raises(ValueError, match=f"column indices of row {row} must be strictly increasing"):
        torch.ops.perturbdiff.rank_sum(args[0], unsorted, *args[2:])


def test_energy_to_control_matches_cdist():
    rng = np.random.default_rng(0)
    sets, ctrl = [rng.random((n, 6)) for n in (3, 1, 5)], rng.random((4, 6))
    c = torch.from_numpy(ctrl)
    self_distance, sq_norms = mean_pairwise_distance(c)
    e = energy_to_control(torch.from_numpy(np.vstack(sets)), np.array([0, 3, 4, 9]), c,
                          sq_norms, self_distance)
    ref = [2 * cdist(s, ctrl).mean() - cdist(s, s).mean() - cdist(ctrl, ctrl).mean()
           for s in sets]
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_bh_matches_scipy(ps):
    ours = benjamini_hochberg(torch.tensor([ps], dtype=torch.float64))[0].numpy()
    assert np.allclose(ours, ss.false_discovery_control(np.array(ps)), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()),
                min_size=3, max_size=30))
def test_ranking_stats_match_scipy_sklearn(rows):
    a, b, lab = (np.array(c, dtype=float) for c in zip(*rows))
    t = lambda v: torch.tensor(v)[None]  # noqa: E731
    rho = masked_spearman(t(a), t(b))[0].item()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ss.ConstantInputWarning)
        ref = ss.spearmanr(a, b).statistic
    assert (math.isnan(rho) and math.isnan(ref)) or rho == pytest.approx(ref, abs=1e-12)
    lab = lab.astype(bool)
    auc = roc_auc_rows(t(lab), t(b))[0].item()
    ap = average_precision_rows(t(lab), t(b))[0].item()
    # the evaluator's shared sort: an ascending order serves both, ties in b (frequent here) in
    # any order: numpy's, and a random one
    shuffled_ties = torch.from_numpy(np.lexsort((np.random.default_rng(len(b)).random(len(b)), b)))[None]
    for ascending in (ascending_order(t(b)), shuffled_ties):
        assert roc_auc_rows(t(lab), t(b), ascending)[0].item() == pytest.approx(auc, abs=1e-15, nan_ok=True)
        assert average_precision_rows(t(lab), t(b), ascending)[0].item() == pytest.approx(
            ap, abs=1e-15, nan_ok=True)
    if 0 < lab.sum() < len(lab):
        assert auc == pytest.approx(roc_auc_score(lab, b), abs=1e-12)
        assert ap == pytest.approx(average_precision_score(lab, b), abs=1e-12)
    else:
        assert math.isnan(auc) and math.isnan(ap)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.0, np.inf, -np.inf]), st.booleans()),
                         min_size=5, max_size=5), min_size=1, max_size=4))
def test_masked_ranks_match_scipy_on_the_masked_entries(rows):
    values = torch.tensor([[v for v, _ in r] for r in rows], dtype=torch.float64)
    mask = torch.tensor([[m for _, m in r] for r in rows])
    ranks = masked_average_ranks(values, mask).numpy()
    for r, v, m in zip(ranks, values.numpy(), mask.numpy()):
        np.testing.assert_array_equal(r[m], ss.rankdata(v[m]) if m.any() else [])
        assert (r[~m] == 0).all()
    np.testing.assert_array_equal(masked_average_ranks(values).numpy(),
                                  ss.rankdata(values.numpy(), axis=1))


def test_mean_metrics_by_hand():
    real = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    pred = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64)
    ctrl_r = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ctrl_p = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    m = mean_metrics(real, pred, ctrl_r, ctrl_p)
    assert m["mse"].item() == pytest.approx(4 / 3)
    assert m["mae"].item() == pytest.approx(2 / 3)
    # deltas: real (0, 1, 2), pred (0, 1, 3)
    assert m["mse_delta"].item() == pytest.approx(1 / 3)
    assert m["pearson_delta"].item() == pytest.approx(ss.pearsonr([0, 1, 3], [0, 1, 2])[0])
    assert m["r2"].item() == pytest.approx(r2_score([1, 2, 3], [1, 2, 5]))
    assert m["r2_delta"].item() == pytest.approx(r2_score([0, 1, 2], [0, 1, 3]))


def test_discrimination_score_by_hand():
    d_real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    # p0 lands on p1's effect (rank 1 -> 1 - 1/3); p1, p2 are closest to themselves.
    d_pred = torch.tensor([[0.5, 1.0], [0.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    s = discrimination_scores(d_real, d_pred, [[], [], []], metrics=("l1",))
    assert s["discrimination_score_l1"].tolist() == pytest.approx([2 / 3, 1.0, 1.0])
    # Hiding column 1 from p0 leaves 0.5 to both p0 and p1: a tie, broken by order.
    s = discrimination_scores(d_real, d_pred, [[1], [], []], metrics=("l1",))
    assert s["discrimination_score_l1"][0].item() == 1.0


@pytest.mark.parametrize("de_metrics", [de_metrics, de_metrics_module.de_metrics_torch])
def test_de_metrics_by_hand(de_metrics):
    # 5 genes; real DE genes 0,1,2 (|LFC| 3,2,1); pred DE genes 1,0,4 (|LFC| 5,4,1).
    fdr_r = torch.tensor([[0.01, 0.01, 0.01, 0.5, 0.5]], dtype=torch.float64)
    lfc_r = torch.tensor([[3.0, -2.0, 1.0, 0.1, 0.0]], dtype=torch.float64)
    fdr_p = torch.tensor([[0.01, 0.01, 0.9, 0.9, 0.01]], dtype=torch.float64)
    lfc_p = torch.tensor([[4.0, 5.0, -1.0, 0.0, 1.0]], dtype=torch.float64)
    m = {k: v.item() for k, v in de_metrics(fdr_r, lfc_r, fdr_p, lfc_p).items()}
    assert m["overlap_at_N"] == pytest.approx(2 / 3)  # top3 pred {1,0,4} vs {0,1,2}
    assert m["precision_at_N"] == pytest.approx(2 / 3)
    assert m["de_sig_genes_recall"] == pytest.approx(2 / 3)
    assert m["de_direction_match"] == pytest.approx(1 / 3)  # only gene 0 agrees in sign
    assert m["de_spearman_lfc_sig"] == pytest.approx(ss.spearmanr([3, -2, 1], [4, 5, -1])[0])
    assert (m["de_nsig_counts_real"], m["de_nsig_counts_pred"]) == (3, 3)
    assert m["roc_auc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0],
                                                       -np.log10([0.01, 0.01, 0.9, 0.9, 0.01])))
    none = de_metrics(torch.full((1, 5), 0.9, dtype=torch.float64), lfc_r, fdr_p, lfc_p)
    assert none["overlap_at_N"].item() == 0.0 and math.isnan(none["de_direction_match"].item())
    assert de_spearman_sig(torch.tensor([0, 0]), torch.tensor([1, 2])) == 1.0


needs_de_kernel = pytest.mark.skipif(not has_kernel("de_metrics"),
                                     reason="this build lacks perturbdiff::de_metrics")


def _de_inputs(rng, perts, genes):
    """FDR and LFC matrices full of what the ranks must handle: ties in |LFC| and FDR (and
    both), FDRs at the threshold, infinite and signed-zero fold changes, rows with no or every
    gene significant."""
    fdr = rng.choice([0.0, 0.01, 0.02, 0.049999, 0.05, 0.3, 1.0], (perts, genes))
    fdr[0] = 0.9  # nothing significant
    if perts > 1:
        fdr[1] = 0.01  # everything significant
    lfc = rng.choice([0.0, -0.0, 0.5, -0.5, 1.0, -2.0, np.inf, -np.inf], (perts, genes))
    lfc = np.where(rng.random((perts, genes)) < 0.5, lfc, rng.normal(size=(perts, genes)))
    return torch.from_numpy(fdr), torch.from_numpy(lfc)


@needs_de_kernel
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), perts=st.integers(1, 6),
       genes=st.one_of(st.integers(1, 40), st.integers(60, 700)))  # top-50..500 lists cut tie runs
def test_compiled_de_metrics_equal_the_torch_version(seed, perts, genes):
    rng = np.random.default_rng(seed)
    inputs = (*_de_inputs(rng, perts, genes), *_de_inputs(rng, perts, genes))
    compiled = de_metrics(*inputs)
    reference = de_metrics_module.de_metrics_torch(*inputs)
    assert compiled.keys() == reference.keys()
    for name, ref in reference.items():  # (a few of the torch version's are float32 values)
        torch.testing.assert_close(compiled[name], ref.to(torch.float64), rtol=0, atol=1e-12,
                                   equal_nan=True, msg=name)


@needs_de_kernel
def test_de_metrics_op_opcheck_and_nan():
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    rng = np.random.default_rng(0)
    # FDRs on both sides of the threshold in every row: every metric defined (opcheck compares
    # without NaN)
    fdr_r, fdr_p = (torch.from_numpy(rng.random((4, 30)) * 0.1) for _ in range(2))
    lfc_r, lfc_p = (torch.from_numpy(rng.normal(size=(4, 30))) for _ in range(2))
    torch.library.opcheck(torch.ops.perturbdiff.de_metrics.default, (fdr_r, lfc_r, fdr_p, lfc_p, 0.05, [5, 10]))
    inputs = (*_de_inputs(rng, 4, 30), *_de_inputs(rng, 4, 30))
    nan_fdr = inputs[0].clone()
    nan_fdr[2, 3] = math.nan
    with pytest.raises(ValueError, match="must not hold NaN"):
        torch.ops.perturbdiff.de_metrics(nan_fdr, *inputs[1:], 0.05, [5])
    with pytest.raises(TypeError, match="must be float64"):
        torch.ops.perturbdiff.de_metrics(inputs[0].float(), *inputs[1:], 0.05, [5])
    # NaN goes to the torch version, which defines it
    got = de_metrics(nan_fdr, *inputs[1:])
    for name, ref in de_metrics_module.de_metrics_torch(nan_fdr, *inputs[1:]).items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=0, equal_nan=True, msg=name)


def test_log2_fold_change_edge_cases():
    t = torch.log1p(torch.tensor([3.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    r = torch.log1p(torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64))
    lfc = log2_fold_change(t, r)
    assert lfc.tolist() == pytest.approx([math.log2(3), 0.0, -math.inf, math.inf])


def _toy(seed=0, n_genes=12, contexts=("a",)):
    rng = np.random.default_rng(seed)
    obs = []
    for c in contexts:
        obs += [("ctrl", c)] * 20 + [("P1", c)] * 10 + [("G2", c)] * 10
    obs = pd.DataFrame(obs, columns=["pert", "ctx"], index=[f"c{i}" for i in range(len(obs))])
    x = np.log1p(rng.poisson(2.0, (len(obs), n_genes)).astype(float))
    x[obs["pert"].to_numpy() == "P1", 0] += 1.5
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))


def test_evaluate_self_is_perfect_and_contexts_are_separate():
    real = _toy(contexts=("a", "b"))
    res = evaluate(real, real, "pert", "ctrl", context_key="ctx", progress=False)
    t = res.per_pert
    assert list(t["context"]) == ["a", "a", "b", "b"]
    assert np.allclose(t["mse"], 0) and np.allclose(t["pearson_delta"], 1)
    assert np.allclose(t["discrimination_score_l1"], 1) and np.allclose(t["energy_distance"], 0)
    assert set(res.agg["statistic"]) >= {"count", "null_count", "mean", "25%", "max"}


def test_chunks_buffers_and_shared_controls_keep_results():
    real = _toy(n_genes=30)
    x = real.X.copy()
    perturbed = (real.obs["pert"] != "ctrl").to_numpy()
    x[perturbed] = np.abs(x[perturbed] + np.random.default_rng(5).normal(0, 0.3, (20, 30)))
    real.X = sp.csr_matrix(real.X)
    pred = ad.AnnData(sp.csr_matrix(x), obs=real.obs, var=real.var)

    def run(p, **kw):
        return evaluate(p, real, "pert", "ctrl", progress=False, **kw).per_pert

    base = run(pred)  # one chunk; the controls, equal in both files, prepared once
    # One perturbation per chunk (a reused dense buffer); dense pred controls prepared apart.
    for other in (run(pred, chunk_elements=1), run(ad.AnnData(x, obs=real.obs, var=real.var))):
        pd.testing.assert_frame_equal(other, base, rtol=1e-10)


@pytest.mark.parametrize("breaker, message", [
    (lambda p: p[:, ::-1].copy(), "different order"),
    (lambda p: p[:, 1:].copy(), "different gene sets"),
    (lambda p: p[p.obs["pert"] != "ctrl"].copy(), "no control cells"),
    (lambda p: p[p.obs["pert"] != "G2"].copy(), "only in real"),
    (lambda p: ad.AnnData(np.round(np.expm1(p.X)), obs=p.obs, var=p.var), "integer counts"),
    (lambda p: ad.AnnData(np.where(np.arange(p.n_vars) == 3, np.nan, p.X), obs=p.obs,
                          var=p.var), "NaN"),
    (lambda p: ad.AnnData(p.X, obs=p.obs.rename(columns={"pert": "x"}), var=p.var), "'pert'"),
])
def test_bad_inputs_raise_clear_errors(breaker, message):
    real = _toy()
    with pytest.raises(InputError, match=message):
        evaluate(breaker(real), real, "pert", "ctrl", progress=False)


def test_files_are_read_in_part_and_whole_when_a_key_is_missing(tmp_path):
    real = _toy(contexts=("a", "b"))
    real.X = sp.csr_matrix(real.X)
    real.layers["counts"] = real.X.copy()
    real.obsm["X_pca"] = np.zeros((real.n_obs, 3))
    real.obs["batch"] = "b1"
    path = tmp_path / "real.h5ad"
    real.write_h5ad(path)
    part = load_anndata(path, "real", ("pert", "ctx"))
    assert isinstance(part, StoredCells) and list(part.obs.columns) == ["pert", "ctx"]
    pd.testing.assert_frame_equal(part.obs, real.obs[["pert", "ctx"]].reset_index(drop=True))
    assert list(part.var_names) == list(real.var_names) and (part.X != real.X).nnz == 0
    whole = load_anndata(path, "real", ("pert", "missing"))  # read whole: errors list every column
    assert "batch" in whole.obs and "counts" in whole.layers
    pd.testing.assert_frame_equal(evaluate(path, path, "pert", "ctrl", context_key="ctx",
                                           progress=False).per_pert,
                                  evaluate(real, real, "pert", "ctrl", context_key="ctx",
                                           progress=False).per_pert)
    with pytest.raises(InputError, match="'nope'"):
        evaluate(path, path, "nope", "ctrl", progress=False)


def test_lean_read_equals_anndata_for_every_layout_it_reads(tmp_path):
    """X dense, CSR or CSC; categorical, string, numeric and boolean obs columns. Encodings it
    does not read (a nullable integer column here) send the file to anndata whole."""
    real = _toy()
    real.obs["dose"] = np.arange(real.n_obs, dtype=float)
    real.obs["flag"] = real.obs["pert"] == "P1"
    real.obs["n"] = pd.array(np.arange(real.n_obs), dtype="Int64")
    keys = ("pert", "dose", "flag")
    for layout in (np.asarray, sp.csr_matrix, sp.csc_matrix):
        real.X = layout(real.X)
        path = tmp_path / f"{layout.__name__}.h5ad"
        real.write_h5ad(path)
        stored = ad.read_h5ad(path)
        part = load_anndata(path, "real", keys)
        assert isinstance(part, StoredCells) and type(part.X) is type(stored.X)
        assert part.shape == stored.shape and part.n_obs == stored.n_obs and part.n_vars == stored.n_vars
        np.testing.assert_array_equal(sp.csr_matrix(part.X).toarray(), sp.csr_matrix(stored.X).toarray())
        pd.testing.assert_frame_equal(part.obs, stored.obs[list(keys)].reset_index(drop=True))
        pd.testing.assert_index_equal(part.var_names, stored.var_names)
        assert isinstance(load_anndata(path, "real", ("pert", "n")), ad.AnnData)


def test_evaluating_files_does_not_import_anndata(tmp_path):
    real = _toy()
    real.write_h5ad(tmp_path / "real.h5ad")
    code = ("import sys; from perturbdiff.evaluate import evaluate; "
            f"t = evaluate({str(tmp_path / 'real.h5ad')!r}, {str(tmp_path / 'real.h5ad')!r}, 'pert', 'ctrl', "
            "progress=False).per_pert; print(len(t), 'anndata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_describe_and_score():
    t = pd.DataFrame({"mae": [0.1, 0.3, np.nan, 0.2], "pearson_delta": [0.5, 0.7, 0.9, 1.0]})
    agg = describe(t, ["mae", "pearson_delta"]).set_index("statistic")
    assert agg.loc["count", "mae"] == 3 and agg.loc["null_count", "mae"] == 1
    assert agg.loc["mean", "mae"] == pytest.approx(0.2)
    assert agg.loc["50%", "pearson_delta"] == 0.9  # nearest rank, index round(1.5) = 2
    base = describe(t.assign(mae=0.4, pearson_delta=0.5), ["mae", "pearson_delta"])
    s = score_tables(describe(t, ["mae", "pearson_delta"]), base).set_index("metric")
    assert s.loc["mae", "from_baseline"] == pytest.approx(1 - 0.2 / 0.4)
    assert s.loc["pearson_delta", "from_baseline"] == pytest.approx((0.775 - 0.5) / 0.5)
    assert s.loc["avg_score", "from_baseline"] == pytest.approx((0.5 + 0.55) / 2)


@pytest.mark.parametrize("kind", ["control_mean", "perturbation_mean", "context_mean", "linear"])
def test_baselines_format(kind):
    train = _toy(seed=1, contexts=("a", "b"))
    real = _toy(seed=2, contexts=("c",))
    pred = make_baseline(kind, train, real, "pert", "ctrl", context_key="ctx")
    assert pred.shape == real.shape and list(pred.var_names) == list(real.var_names)
    pd.testing.assert_frame_equal(pred.obs, real.obs)
    ctrl = (real.obs["pert"] == "ctrl").to_numpy()
    assert np.allclose(pred.X[ctrl], real.X[ctrl], atol=1e-6)
    p1 = (real.obs["pert"] == "P1").to_numpy()
    assert np.ptp(pred.X[p1], axis=0).max() == 0  # one profile per group
    if kind == "control_mean":
        assert np.allclose(pred.X[p1][0], real.X[ctrl].mean(0), atol=1e-6)
    if kind == "perturbation_mean":  # P1's training effect on gene 0 is ~ +1.5
        assert pred.X[p1][0, 0] - real.X[ctrl][:, 0].mean() > 1.0
    res = evaluate(pred, real, "pert", "ctrl", context_key="ctx", progress=False)
    assert len(res.per_pert) == 2


def test_report_files(tmp_path):
    real = _toy()
    pred = make_baseline("perturbation_mean", _toy(seed=3), real, "pert", "ctrl")
    base = make_baseline("control_mean", _toy(seed=3), real, "pert", "ctrl")
    results = {n: evaluate(p, real, "pert", "ctrl", progress=False)
               for n, p in (("model", pred), ("ctrl", base))}
    out = write_report(results, tmp_path / "rep", real, {"model": pred, "ctrl": base},
                       baselines=["ctrl"])
    names = {p.name for p in out.iterdir()}
    assert {"results.csv", "agg_results.csv", "scores.csv", "report.md", "metrics.png",
            "de_recovery.png", "deltas_model.png"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left behind
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["model"].unique()) == ["ctrl", "model"] and len(table) == 4
    assert "avg_score" in pd.read_csv(out / "scores.csv")["metric"].tolist()


def test_cli_evaluate_and_baseline(tmp_path, monkeypatch):
    from perturbdiff.evaluate import cli_baseline, cli_evaluate
    import argparse
    kept = []  # the command keeps freed memory (its own process); the test process stays as it is
    monkeypatch.setattr(cli_evaluate, "keep_freed_memory", lambda: kept.append(True))
    real, train = _toy(), _toy(seed=4)
    real.write_h5ad(tmp_path / "real.h5ad")
    train.write_h5ad(tmp_path / "train.h5ad")
    for mod, argv in ((cli_baseline, ["--train", str(tmp_path / "train.h5ad"), "--real",
                                      str(tmp_path / "real.h5ad"), "--kind", "linear",
                                      "--pert-key", "pert", "--control-label", "ctrl",
                                      "--out", str(tmp_path / "lin.h5ad")]),
                      (cli_evaluate, ["--pred", str(tmp_path / "lin.h5ad"), "--real",
                                      str(tmp_path / "real.h5ad"), "--pert-key", "pert",
                                      "--control-label", "ctrl", "--out",
                                      str(tmp_path / "rep"), "--no-progress",
                                      "--profile", "vcc"])):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        assert mod.run(parser.parse_args(argv)) == 0
    agg = pd.read_csv(tmp_path / "rep" / "agg_results.csv")
    assert set(agg.columns) == {"model", "statistic", "mae", "discrimination_score_l1",
                                "overlap_at_N"}
    parser = argparse.ArgumentParser()
    cli_evaluate.add_arguments(parser)
    bad = parser.parse_args(["--pred", str(tmp_path / "missing.h5ad"), "--real",
                             str(tmp_path / "real.h5ad"), "--pert-key", "pert",
                             "--control-label", "ctrl", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not found"):
        cli_evaluate.run(bad)
    assert len(kept) == 2
    cli_evaluate.run(parser.parse_args(["--pred", str(tmp_path / "lin.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                                        "--pert-key", "pert", "--control-label", "ctrl", "--no-progress",
                                        "--out", str(tmp_path / "rep2"), "--release-freed-memory"]))
    assert len(kept) == 2 and (tmp_path / "rep2" / "results.csv").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_gpu_evaluation_equals_cpu(shared_data, sparse):
    """The CUDA path (dense cell blocks on the GPU) gives the CPU path's numbers; the CPU path is
    the one held to cell-eval's in the parity tests."""
    real = ad.read_h5ad(shared_data)
    x = real.X.toarray() if sp.issparse(real.X) else np.asarray(real.X)
    rng = np.random.default_rng(0)
    perturbed = np.flatnonzero(real.obs["condition"].to_numpy(str) != "control")
    y = x.copy()
    y[perturbed] = x[rng.permutation(perturbed)] * rng.uniform(0.8, 1.2, (len(perturbed), 1))
    pred = real.copy()
    pred.X, real.X = (sp.csr_matrix(y), sp.csr_matrix(x)) if sparse else (y, x)
    cpu = evaluate(pred, real, "condition", "control", "cell_type", device="cpu", progress=False)
    gpu = evaluate(pred, real, "condition", "control", "cell_type", device="cuda", progress=False)
    pd.testing.assert_frame_equal(gpu.per_pert, cpu.per_pert, rtol=1e-9, atol=1e-12)
