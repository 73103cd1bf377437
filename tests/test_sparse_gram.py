"""perturbdiff::within_distance, ::distance_to, ::split_columns, ::group_sums and the split
sparse/dense products behind the evaluator's e-distance and set distances."""

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from perturbdiff.evaluate import evaluate
from perturbdiff.evaluate.distribution import energy_to_control, mean_pairwise_distance
from perturbdiff.evaluate import evaluator, sparse_gram
from perturbdiff.evaluate.sparse_gram import (SplitCells, dense_genes, density, split_distance_to,
                                              split_within)

pytestmark = pytest.mark.skipif(not sparse_gram.available(), reason="perturbdiff._C not built")


def _random_csr(rng, rows, cols, dens, index_dtype=np.int32, dtype=np.float64):
    m = sp.random(rows, cols, density=dens, format="csr", random_state=rng, dtype=dtype)
    m.data = np.log1p(50 * m.data).astype(dtype)  # log1p-like values, far from 0 in norm
    m.indices = m.indices.astype(index_dtype)
    m.indptr = m.indptr.astype(index_dtype)
    return m


def test_dense_genes_follow_the_cost_model():
    x = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(density(x), [1.0, 0.5, 0.0])
    # both sides fully stored: dense; one side empty: sparse (no work at all)
    np.testing.assert_array_equal(dense_genes(density(x), density(x)), [True, True, False])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dens=st.floats(0, 1), dense_share=st.floats(0, 1))
def test_energy_to_control_on_split_cells_matches_cdist(seed, dens, dense_share):
    """The e-distance from the compiled kernels on cells split by gene (any split), against
    cdist, and against the dense torch path."""
    rng = np.random.default_rng(seed)
    cells, ctrl = _random_csr(rng, 9, 30, dens), _random_csr(rng, 6, 30, dens)
    split = rng.random(30) < dense_share
    c = SplitCells.split(ctrl, split)
    self_distance, sq = split_within(c, [0, 6])
    offsets = np.array([0, 3, 4, 9])
    dense, cd = cells.toarray(), ctrl.toarray()
    ref = [2 * cdist(s, cd).mean() - cdist(s, s).mean() - cdist(cd, cd).mean()
           for s in np.split(dense, offsets[1:-1])]
    e = energy_to_control(SplitCells.split(cells, split), offsets, c, sq, self_distance[0],
                          split_within, split_distance_to)
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-10, atol=1e-10)
    t = torch.from_numpy
    torch_self, torch_sq = mean_pairwise_distance(t(cd))
    np.testing.assert_allclose(energy_to_control(t(dense), offsets, t(cd), torch_sq, torch_self).numpy(),
                               ref, rtol=1e-10, atol=1e-10)


def test_distance_to_unsorted_indices_and_duplicates_add_up():
    # row 0 stores column 2 twice and column 0 after it: a valid (non-canonical) CSR matrix
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 2, 0]), np.array([0, 3, 3])),
                      shape=(2, 3))
    ref = sp.csr_matrix(np.arange(6, dtype=np.float64).reshape(2, 3))
    dense, dense_ref = x.toarray(), ref.toarray()  # duplicates summed
    sq = lambda a: torch.from_numpy((a ** 2).sum(1))  # noqa: E731
    none = torch.zeros(2, 0, dtype=torch.float64)
    out = _distance_to(x, none, sq(dense), ref, none, sq(dense_ref))
    np.testing.assert_allclose(out.numpy(), cdist(dense, dense_ref).mean(1), rtol=1e-14)


def _within(x, dense, offsets, cols=None, split=None, kernels=(), bandwidths=()):
    """(mean distance [S], squared norms) without ``split``, else all three outputs."""
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    offsets = torch.as_tensor(offsets, dtype=torch.int64)
    out = torch.ops.perturbdiff.within_distance(
        t(x.indptr), t(x.indices), t(x.data), dense, offsets,
        offsets[1:] if split is None else torch.as_tensor(split, dtype=torch.int64),
        x.shape[1] if cols is None else cols, list(kernels), list(bandwidths))
    return (out[0][0], out[1]) if split is None else out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), sparse_genes=st.integers(0, 40), dense_genes_=st.integers(0, 12),
       dens=st.floats(0, 1), cuts=st.lists(st.integers(0, 60), max_size=6), seed=st.integers(0, 2**31 - 1),
       index_dtype=st.sampled_from([np.int32, np.int64]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_within_distance_matches_cdist(n, sparse_genes, dense_genes_, dens, cuts, seed, index_dtype, dtype):
    """Mean distance over each segment's pairs (empty segments: NaN) and the rows' squared norms
    of [sparse | dense] cells, against scipy's cdist on the dense matrix, in float64."""
    rng = np.random.default_rng(seed)
    x = _random_csr(rng, n, sparse_genes, dens, index_dtype, dtype)
    d = rng.random((n, dense_genes_)).astype(dtype) * 3
    offsets = np.array([0, *sorted(min(c, n) for c in cuts), n])
    mean, sq = _within(x, torch.from_numpy(d), offsets)
    assert mean.dtype == sq.dtype == torch.from_numpy(d).dtype
    full = np.hstack([x.astype(np.float64).toarray(), d.astype(np.float64)])
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(sq.double().numpy(), (full ** 2).sum(1), rtol=tol, atol=tol)
    ref = [cdist(s, s).mean() if len(s) else np.nan for s in np.split(full, offsets[1:-1])]
    # distances from the norm expansion: fp32 loses ~sqrt(eps) of a distance that is small
    # against the norms, the same as the dense path
    np.testing.assert_allclose(mean.double().numpy(), ref, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=1e-3 if dtype == np.float32 else 1e-9)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=4),
       sparse_genes=st.integers(0, 30), dense_genes_=st.integers(0, 8), dens=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_within_distance_two_parts_and_kernels_match_the_reference(sizes, sparse_genes, dense_genes_,
                                                                   dens, seed, dtype):
    """Segments of two parts (the predicted and the real cells of a perturbation): the distances
    within each part, and the energy and RBF means within and between the parts, against cdist
    and ops.reference.radial on the dense matrix (V-statistics, self-pairs included)."""
    from perturbdiff.evaluate.distribution import CELLFLOW_SIGMAS
    from perturbdiff.ops.reference import radial

    rng = np.random.default_rng(seed)
    n = sum(a + b for a, b in sizes)
    x = _random_csr(rng, n, sparse_genes, dens, np.int32, dtype)
    d = rng.random((n, dense_genes_)).astype(dtype) * 2
    offsets = np.concatenate([[0], np.cumsum([a + b for a, b in sizes])])
    split = offsets[:-1] + np.array([a for a, _ in sizes])
    distance, sq, means = _within(x, torch.from_numpy(d), offsets, split=split,
                                  kernels=["energy", "rbf"], bandwidths=CELLFLOW_SIGMAS)
    assert distance.shape == (2, len(sizes)) and means.shape == (2, 3, len(sizes))
    full = np.hstack([x.astype(np.float64).toarray(), d.astype(np.float64)])
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sq.double().numpy(), (full ** 2).sum(1), **tol)
    for i, (a, b, m) in enumerate(zip(offsets[:-1], offsets[1:], split)):
        first, second = full[a:m], full[m:b]
        for part, (u, v) in enumerate([(first, first), (second, second), (first, second)]):
            if part < 2:
                expect = cdist(u, v).mean() if len(u) else np.nan
                np.testing.assert_allclose(distance[part, i].double().item(), expect, **tol)
            sqd = torch.from_numpy(cdist(u, v) ** 2)
            for k, (kernel, bw) in enumerate([("energy", None), ("rbf", CELLFLOW_SIGMAS)]):
                expect = radial(kernel, sqd, bw).mean().item() if sqd.numel() else np.nan
                np.testing.assert_allclose(means[k, part, i].double().item(), expect, **tol)


def test_within_distance_unsorted_indices_and_duplicates_add_up():
    # row 0 stores column 2 twice and column 0 after them; row 2 stores column 1 twice
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0, 0.5, 4.0, 1.5]), np.array([2, 2, 0, 1, 1, 1]),
                       np.array([0, 3, 4, 6])), shape=(3, 3))
    dense = x.toarray()  # duplicates summed
    mean, sq = _within(x, torch.zeros(3, 0, dtype=torch.float64), [0, 3])
    np.testing.assert_allclose(sq.numpy(), (dense ** 2).sum(1), rtol=1e-15)
    np.testing.assert_allclose(mean.numpy(), [cdist(dense, dense).mean()], rtol=1e-14)


def test_within_distance_is_bitwise_reproducible_and_opchecked():
    rng = np.random.default_rng(2)
    x = _random_csr(rng, 200, 80, 0.1, np.int64)
    d = torch.rand(200, 7, dtype=torch.float64)
    offsets = [0, 30, 31, 120, 200]
    a, b = _within(x, d, offsets), _within(x, d, offsets)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    t = torch.from_numpy
    # two non-empty parts per segment (an empty one is NaN, which opcheck's comparisons reject)
    torch.library.opcheck(torch.ops.perturbdiff.within_distance.default,
                          (t(x.indptr), t(x.indices), t(x.data), d, torch.tensor([0, 30, 120, 200]),
                           torch.tensor([10, 31, 199]), 80, ["energy", "rbf"], [0.5, 2.0]))


def test_within_distance_rejects_bad_input():
    rng = np.random.default_rng(0)
    x = _random_csr(rng, 6, 5, 0.6)
    d = torch.zeros(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="offsets must run from 0 to the number of cells"):
        _within(x, d, [0, 5])
    with pytest.raises(ValueError, match="offsets decrease at segment 1"):
        _within(x, d, [0, 4, 2, 6])
    with pytest.raises(ValueError, match=r"dense must be \[6, genes\]"):
        _within(x, d[:5], [0, 6])
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 2\)"):
        _within(x, d, [0, 6], cols=2)
    with pytest.raises(TypeError, match="float32 or both float64"):
        _within(x, d.float(), [0, 6])
    with pytest.raises(ValueError, match=r"split\[0\] = 7 lies outside its segment \[0, 6\]"):
        _within(x, d, [0, 6], split=[7])
    with pytest.raises(ValueError, match=r"split must hold one row per segment \(1\)"):
        _within(x, d, [0, 6], split=[2, 3])
    with pytest.raises(ValueError, match="unknown kernel 'gauss'"):
        _within(x, d, [0, 6], split=[3], kernels=["gauss"], bandwidths=[1.0])
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        _within(x, d, [0, 6], split=[3], kernels=["rbf"], bandwidths=[-1.0])
    with pytest.raises(TypeError, match="offsets and split must be int64"):
        t = torch.from_numpy
        torch.ops.perturbdiff.within_distance(t(x.indptr), t(x.indices), t(x.data), d,
                                              torch.tensor([0, 6], dtype=torch.int32),
                                              torch.tensor([6], dtype=torch.int32), 5, [], [])


def _distance_to(x, d, sq, ref, ref_d, ref_sq, cols=None):
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    ref_t = ref.T.tocsr()
    if cols is not None:
        ref_t = sp.csr_matrix((ref_t.data, ref_t.indices, ref_t.indptr[:cols + 1]), shape=(cols, ref.shape[0]))
    return torch.ops.perturbdiff.distance_to(t(x.indptr), t(x.indices), t(x.data), d, sq,
                                             t(ref_t.indptr.astype(ref.indptr.dtype)),
                                             t(ref_t.indices.astype(ref.indptr.dtype)), t(ref_t.data),
                                             ref_d, ref_sq)


def _sq_norms(x, d):
    return torch.from_numpy(np.asarray(x.multiply(x).sum(1)).ravel().astype(x.dtype)) + d.square().sum(1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 150), m=st.integers(0, 40), sparse_genes=st.integers(0, 40),
       dense_genes_=st.integers(0, 12), dens=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       index_dtype=st.sampled_from([np.int32, np.int64]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_distance_to_matches_cdist(n, m, sparse_genes, dense_genes_, dens, seed, index_dtype, dtype):
    """Each cell's mean distance to a reference set (none: NaN) of [sparse | dense] cells, against
    scipy's cdist on the dense matrices; more cells than one block of rows."""
    rng = np.random.default_rng(seed)
    x, ref = (_random_csr(rng, k, sparse_genes, dens, index_dtype, dtype) for k in (n, m))
    d, ref_d = (torch.from_numpy(rng.random((k, dense_genes_)).astype(dtype) * 3) for k in (n, m))
    out = _distance_to(x, d, _sq_norms(x, d), ref, ref_d, _sq_norms(ref, ref_d))
    assert out.dtype == d.dtype and out.shape == (n,)
    full, full_ref = (np.hstack([a.astype(np.float64).toarray(), b.double().numpy()])
                      for a, b in ((x, d), (ref, ref_d)))
    ref_mean = cdist(full, full_ref).mean(1) if m else np.full(n, np.nan)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(out.double().numpy(), ref_mean, rtol=tol, atol=tol)


def _shuffle_rows(x, rng):
    """The same matrix with each row's stored entries in random order (a valid CSR matrix)."""
    y = x.copy()
    for a, b in zip(y.indptr[:-1], y.indptr[1:]):
        order = a + rng.permutation(b - a)
        y.indices[a:b], y.data[a:b] = y.indices[order], y.data[order]
    return y


@pytest.mark.parametrize("ascending", [True, False])
def test_distances_over_several_column_tiles(ascending):
    """Both kernels multiply sparse parts one tile of 512 columns at a time when every row's
    columns ascend (else all columns at once): 1,300 columns, rows with entries in every tile
    and rows with none in some, against cdist."""
    rng = np.random.default_rng(7)
    x = _random_csr(rng, 300, 1300, 0.02).toarray()
    x[:40, 500:1100] = 0  # rows with an empty middle tile
    x = sp.csr_matrix(x)
    if not ascending:
        x = _shuffle_rows(x, rng)
    assert x.has_sorted_indices == ascending
    d = torch.rand(300, 3, dtype=torch.float64)
    full = np.hstack([x.toarray(), d.numpy()])
    offsets = [0, 90, 290, 300]
    mean, sq = _within(x, d, offsets)
    np.testing.assert_allclose(mean.numpy(), [cdist(s, s).mean() for s in np.split(full, offsets[1:-1])],
                               rtol=1e-12)
    out = _distance_to(x, d, sq, x[:70], d[:70], sq[:70])
    # (the first 70 cells are in the reference too: sqrt of a rounded 0 costs ~1e-8 absolute)
    np.testing.assert_allclose(out.numpy(), cdist(full, full[:70]).mean(1), rtol=1e-9, atol=1e-7)


def _density_ramp(rng, rows, cols, dtype=np.float64):
    """Cells whose genes are stored in 0 % to 100 % of them (gene g in about g / cols): genes on
    both sides of the kernels' dense-row threshold in one matrix. One stored value in ten comes as
    two entries of half of it (duplicates, rows still ascending)."""
    x = (rng.random((rows, cols)) < np.linspace(0, 1, cols)) * np.log1p(50 * rng.random((rows, cols)))
    row, col = np.nonzero(x)
    data = x[row, col].astype(dtype)
    twice = rng.random(len(data)) < 0.1
    data[twice] /= 2
    row, col, data = (np.concatenate([a, a[twice]]) for a in (row, col, data))
    order = np.lexsort((col, row))
    ptr = np.searchsorted(row[order], np.arange(rows + 1)).astype(np.int32)
    dup = sp.csr_matrix((data[order], col[order].astype(np.int32), ptr), shape=x.shape)
    assert not dup.has_canonical_format and np.allclose(dup.toarray(), x)
    return dup


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ascending", [True, False])
def test_distances_mix_scattered_and_dense_products(dtype, ascending):
    """Genes stored in a small fraction of the other side's cells take Gustavson's scattered
    products, the others the dense-row products (register blocks of 32 outputs and a tail): 77
    reference cells, segments of 5 to 140 cells, 700 genes (two column tiles when the rows ascend),
    duplicate entries; against cdist."""
    rng = np.random.default_rng(3)
    x = _density_ramp(rng, 300, 700, dtype)
    if not ascending:
        x = _shuffle_rows(x, rng)
    d = torch.from_numpy(rng.random((300, 2)).astype(dtype))
    full = np.hstack([x.toarray(), d.numpy()]).astype(np.float64)
    tol = dict(rtol=2e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-9)
    offsets = [0, 5, 145, 223, 300]
    mean, sq = _within(x, d, offsets)
    np.testing.assert_allclose(mean.double().numpy(),
                               [cdist(s, s).mean() for s in np.split(full, offsets[1:-1])], **tol)
    ref = x[223:]
    out = _distance_to(x[:223], d[:223], sq[:223], ref, d[223:], sq[223:])
    np.testing.assert_allclose(out.double().numpy(), cdist(full[:223], full[223:]).mean(1), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_row_products_for_every_reference_size(dtype):
    """Reference sets of 1 to 80 cells, their genes all stored in most of them (dense rows): rows
    shorter than one vector, every number of whole vectors after the register blocks, with and
    without a part of one; against cdist."""
    rng = np.random.default_rng(5)
    x, ref = _random_csr(rng, 30, 20, 0.3, dtype=dtype), _random_csr(rng, 80, 20, 0.7, dtype=dtype)
    d, ref_d = (torch.from_numpy(rng.random((r, 1)).astype(dtype)) for r in (30, 80))
    full, ref_full = (np.hstack([a.toarray(), b.numpy()]).astype(np.float64)
                      for a, b in ((x, d), (ref, ref_d)))
    tol = dict(rtol=2e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-9)
    sq, ref_sq = _sq_norms(x, d), _sq_norms(ref, ref_d)
    for m in range(1, 81):
        out = _distance_to(x, d, sq, ref[:m], ref_d[:m], ref_sq[:m])
        np.testing.assert_allclose(out.double().numpy(), cdist(full, ref_full[:m]).mean(1),
                                   err_msg=f"{m} reference cells", **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ascending", [True, False])
def test_distance_to_cells_denser_than_the_reference(dtype, ascending):
    """Cells stored in 90 % of every gene (a model's prediction) against reference cells stored in
    0 % to 100 % of them: the genes where the reference is sparser go by its stored values (copies of
    32 cells, in tiles of 2,048 genes when the rows ascend: ~2,170 of 3,000 make two), the others by the
    dense-row and scattered products; 300 cells (blocks of 256 and 44 rows, the last copy 12 wide),
    100 and 300 reference cells (fewer: the copy would cost more than it saves), duplicate entries;
    against cdist."""
    rng = np.random.default_rng(11)
    genes = 3000
    x = _random_csr(rng, 300, genes, 0.9, dtype=dtype)
    ref = _density_ramp(rng, 300, genes, dtype)
    if not ascending:
        x, ref = _shuffle_rows(x, rng), _shuffle_rows(ref, rng)
    d, ref_d = (torch.from_numpy(rng.random((r, 2)).astype(dtype)) for r in (300, 300))
    full, ref_full = (np.hstack([a.toarray(), b.numpy()]).astype(np.float64)
                      for a, b in ((x, d), (ref, ref_d)))
    tol = dict(rtol=2e-5, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-8)
    sq, ref_sq = _sq_norms(x, d), _sq_norms(ref, ref_d)
    for m in (100, 300):
        out = _distance_to(x, d, sq, ref[:m], ref_d[:m], ref_sq[:m])
        np.testing.assert_allclose(out.double().numpy(), cdist(full, ref_full[:m]).mean(1),
                                   err_msg=f"{m} reference cells", **tol)


def test_dense_products_of_the_portable_build():
    """ATEN_CPU_CAPABILITY=default selects the non-AVX2 build of the dense-row products: the tests
    above pass with it too."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                    "mix_scattered_and_dense or every_reference_size or denser_than"], env=env, check=True,
                   capture_output=True)


def test_distance_to_is_bitwise_reproducible_and_opchecked():
    rng = np.random.default_rng(4)
    x, ref = _random_csr(rng, 300, 60, 0.1, np.int64), _random_csr(rng, 50, 60, 0.2, np.int64)
    d, ref_d = torch.rand(300, 5, dtype=torch.float64), torch.rand(50, 5, dtype=torch.float64)
    args = (x, d, _sq_norms(x, d), ref, ref_d, _sq_norms(ref, ref_d))
    assert torch.equal(_distance_to(*args), _distance_to(*args))
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    t = torch.from_numpy
    ref_t = ref.T.tocsr()
    torch.library.opcheck(torch.ops.perturbdiff.distance_to.default,
                          (t(x.indptr), t(x.indices), t(x.data), d, args[2],
                           t(ref_t.indptr.astype(np.int64)), t(ref_t.indices.astype(np.int64)),
                           t(ref_t.data), ref_d, args[5]))


def test_distance_to_rejects_bad_input():
    rng = np.random.default_rng(0)
    x, ref = _random_csr(rng, 6, 5, 0.6), _random_csr(rng, 4, 5, 0.6)
    d, ref_d = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    sq, ref_sq = _sq_norms(x, d), _sq_norms(ref, ref_d)
    with pytest.raises(ValueError, match=r"sq must hold one squared norm per cell \(6\)"):
        _distance_to(x, d, sq[:5], ref, ref_d, ref_sq)
    with pytest.raises(ValueError, match=r"ref_dense must be \[4, 2\]"):
        _distance_to(x, d, sq, ref, ref_d[:, :1], ref_sq)
    with pytest.raises(ValueError, match=r"dense must be \[6, genes\]"):
        _distance_to(x, d[:5], sq, ref, ref_d, ref_sq)
    with pytest.raises(ValueError, match=r"the cells' sparse part's column indices must lie in \[0, 3\)"):
        _distance_to(x, d, sq, ref, ref_d, ref_sq, cols=3)
    with pytest.raises(TypeError, match="every value tensor must be Double"):
        _distance_to(x, d.float(), sq, ref, ref_d, ref_sq)
    with pytest.raises(ValueError, match="different genes"):
        cells = SplitCells.split(x, np.array([True, False, False, False, False]))
        split_distance_to(cells, sq, SplitCells.split(ref, np.zeros(5, bool)), ref_sq)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("own_controls", [False, True])
def test_evaluate_sparse_and_dense_inputs_agree(shared_data, fmt, own_controls):
    """On real (sparse) cells, the sparse products (sparse .X, CSR or CSC) and the dense GEMM
    path (dense .X) give the same metrics, pearson_edistance and the set distances included, per
    context; the prediction carries the real control cells or controls of its own."""
    real = ad.read_h5ad(shared_data)[:, :150]
    real = real[real.obs["cell_type"].isin(["T98G", "U87MG"])].copy()
    rng = np.random.default_rng(0)
    x = real.X.toarray()
    moved = np.flatnonzero(real.obs["condition"].to_numpy(str) != "control")
    x[moved] = x[rng.permutation(moved)] * (1 + 0.1 * rng.random((len(moved), x.shape[1])))
    if own_controls:
        x[real.obs["condition"].to_numpy(str) == "control"] *= 1.05
    pred = ad.AnnData(sp.csr_matrix(x).asformat(fmt), obs=real.obs, var=real.var)
    real.X = sp.csr_matrix(real.X).asformat(fmt)

    def run(p, r):
        return evaluate(p, r, "condition", "control", context_key="cell_type",
                        progress=False).per_pert

    sparse = run(pred, real)
    assert sparse["pearson_edistance"].notna().all()
    pred_d, real_d = pred.copy(), real.copy()
    pred_d.X, real_d.X = pred.X.toarray(), real.X.toarray()
    dense = run(pred_d, real_d)
    num = sparse.select_dtypes("number").columns
    np.testing.assert_allclose(sparse[num].to_numpy(), dense[num].to_numpy(), rtol=1e-9,
                               atol=1e-12)


def test_within_split_pays_for_cells_denser_than_their_controls():
    dense_cells, sparse_cells = np.full(100, 0.9), np.full(100, 0.05)
    to_ctrl = np.zeros(100, bool)  # the controls rarely store these genes
    # 3,000 cells of 100 genes either way: in ten perturbations, or in a thousand (fewer pairs)
    own = sparse_gram.within_genes(dense_cells, to_ctrl, [300] * 10, stored=270_000)
    assert own is not None and own.all()
    assert sparse_gram.within_genes(dense_cells, to_ctrl, [3] * 1000, stored=270_000) is None
    assert sparse_gram.within_genes(sparse_cells, to_ctrl, [300] * 10, stored=15_000) is None
    assert sparse_gram.within_genes(dense_cells, np.ones(100, bool), [300] * 10, stored=270_000) is None


@pytest.mark.parametrize("split", ["never", "always"])
def test_evaluate_dense_prediction_against_sparse_controls(shared_data, monkeypatch, split):
    """A prediction stored nearly everywhere (as perturbdiff predict writes it) against sparse
    real controls: with its cells split apart for their products with each other or not, the
    metrics equal the dense GEMM path's."""
    real = ad.read_h5ad(shared_data)[:, :120]
    real = real[real.obs["cell_type"] == "T98G"].copy()
    x = real.X.toarray()
    moved = np.flatnonzero(real.obs["condition"].to_numpy(str) != "control")
    x[moved] += np.random.default_rng(0).random((len(moved), x.shape[1])) * 0.2
    pred = ad.AnnData(sp.csr_matrix(x), obs=real.obs, var=real.var)
    real.X = sp.csr_matrix(real.X)
    calls = []
    within_cells = evaluator._Block.within_cells
    monkeypatch.setattr(evaluator._Block, "within_cells",
                        lambda *a: calls.append(within_cells(*a)) or calls[-1])
    monkeypatch.setattr(sparse_gram, "SPLIT_NS" if split == "always" else "WITHIN_GEMM_SAVING_NS", 0.0)
    sparse = evaluate(pred, real, "condition", "control", profile="cell-eval", progress=False).per_pert
    assert len(calls) == 2 and (calls[1] is not None) == (split == "always")  # (real, pred)
    pred.X, real.X = pred.X.toarray(), real.X.toarray()
    dense = evaluate(pred, real, "condition", "control", profile="cell-eval", progress=False).per_pert
    num = sparse.select_dtypes("number").columns
    np.testing.assert_allclose(sparse[num].to_numpy(), dense[num].to_numpy(), rtol=1e-9, atol=1e-12)


def _split_columns(x, dense_mask):
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    position = torch.from_numpy(np.where(dense_mask, np.cumsum(dense_mask) - 1, -1).astype(np.int64))
    return torch.ops.perturbdiff.split_columns(t(x.indptr), t(x.indices), t(x.data), position,
                                               int(dense_mask.sum()))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), cols=st.integers(0, 30), dens=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       index_dtype=st.sampled_from([np.int32, np.int64]), dtype=st.sampled_from([np.float32, np.float64]))
def test_split_columns_matches_scipy(n, cols, dens, seed, index_dtype, dtype):
    rng = np.random.default_rng(seed)
    x = _random_csr(rng, n, cols, dens, index_dtype, dtype)
    mask = rng.random(cols) < 0.4
    ptr, idx, val, dense = _split_columns(x, mask)
    assert ptr.dtype == idx.dtype == torch.from_numpy(x.indptr).dtype and val.dtype == dense.dtype
    sparse = sp.csr_matrix((val.numpy(), idx.numpy(), ptr.numpy()), shape=x.shape)
    np.testing.assert_array_equal(sparse.toarray(), x.toarray() * ~mask)
    np.testing.assert_array_equal(dense.numpy(), x.toarray()[:, mask])


def test_split_columns_adds_duplicates_and_keeps_order():
    # row 0 stores column 2 twice (dense) and columns 1, 0 (sparse) out of order
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0, 4.0]), np.array([2, 1, 2, 0]), np.array([0, 4, 4])),
                      shape=(2, 3))
    ptr, idx, val, dense = _split_columns(x, np.array([False, False, True]))
    assert ptr.tolist() == [0, 2, 2] and idx.tolist() == [1, 0] and val.tolist() == [2.0, 4.0]
    assert dense.tolist() == [[4.0], [0.0]]


def test_split_columns_opcheck():
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    x = _random_csr(np.random.default_rng(1), 7, 6, 0.5, np.int64)
    t = torch.from_numpy
    torch.library.opcheck(torch.ops.perturbdiff.split_columns.default,
                          (t(x.indptr), t(x.indices), t(x.data), torch.tensor([-1, 0, -1, 1, -1, -1]), 2))


def test_split_columns_rejects_bad_input():
    rng = np.random.default_rng(0)
    x = _random_csr(rng, 4, 5, 0.6)
    t = torch.from_numpy
    with pytest.raises(ValueError, match=r"position\[1\] = 3 is not below dense_cols \(2\)"):
        torch.ops.perturbdiff.split_columns(t(x.indptr), t(x.indices), t(x.data),
                                            torch.tensor([-1, 3, 0, 1, -1]), 2)
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\)"):
        torch.ops.perturbdiff.split_columns(t(x.indptr), t(x.indices), t(x.data), torch.tensor([-1, 0, -1]), 1)
    with pytest.raises(TypeError, match="position must be int64"):
        torch.ops.perturbdiff.split_columns(t(x.indptr), t(x.indices), t(x.data),
                                            torch.full((5,), -1, dtype=torch.int32), 0)


def _group_sums(x, groups, cols=None):
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    rows = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
    return torch.ops.perturbdiff.group_sums(t(x.indptr), t(x.indices), t(x.data), t(rows), t(offsets),
                                            x.shape[1] if cols is None else cols)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), cols=st.integers(0, 30), dens=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       sizes=st.lists(st.integers(0, 12), max_size=5), index_dtype=st.sampled_from([np.int32, np.int64]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_group_sums_match_numpy(n, cols, dens, seed, sizes, index_dtype, dtype):
    """Sums of groups of rows (a row may sit in several groups, a group may be empty) in float64,
    against the dense matrix, and the evaluator's group_means equal to its scipy route."""
    from perturbdiff.evaluate import inputs

    rng = np.random.default_rng(seed)
    x = _random_csr(rng, n, cols, dens, index_dtype, dtype)
    groups = [rng.integers(0, n, k) for k in sizes]
    out = _group_sums(x, groups)
    assert out.dtype == torch.float64 and out.shape == (len(groups), cols)
    dense = x.toarray().astype(np.float64)
    ref = np.array([dense[g].sum(0) for g in groups]).reshape(len(groups), cols)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    groups = [g for g in groups if len(g)]  # means of non-empty groups
    if groups:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(inputs, "has_kernel", lambda *a, **k: False)
            scipy_route = inputs.group_means(x, groups)
        np.testing.assert_allclose(inputs.group_means(x, groups), scipy_route, rtol=1e-12, atol=1e-15)


def test_group_sums_add_duplicates_and_are_opchecked():
    # row 0 stores column 2 twice and column 0 after them
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0, 0.5]), np.array([2, 2, 0, 1]), np.array([0, 3, 4])),
                      shape=(2, 3))
    np.testing.assert_array_equal(_group_sums(x, [[0, 1], [1], [0, 0]]).numpy(),
                                  [[3.0, 0.5, 3.0], [0.0, 0.5, 0.0], [6.0, 0.0, 6.0]])
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    y = _random_csr(np.random.default_rng(3), 9, 6, 0.5, np.int64)
    t = torch.from_numpy
    torch.library.opcheck(torch.ops.perturbdiff.group_sums.default,
                          (t(y.indptr), t(y.indices), t(y.data), torch.tensor([0, 4, 8, 2, 2]),
                           torch.tensor([0, 2, 5]), 6))


def test_group_sums_reject_bad_input():
    x = _random_csr(np.random.default_rng(0), 4, 5, 0.6)
    t = torch.from_numpy
    call = lambda rows, offsets, cols=5: torch.ops.perturbdiff.group_sums(  # noqa: E731
        t(x.indptr), t(x.indices), t(x.data), torch.tensor(rows), torch.tensor(offsets), cols)
    with pytest.raises(ValueError, match=r"rows\[1\] = 4 is not a row of the 4-row matrix"):
        call([0, 4], [0, 2])
    with pytest.raises(ValueError, match="offsets must run from 0 to the number of cells"):
        call([0, 1], [0, 1])
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\)"):
        call([0, 1], [0, 2], cols=3)
    with pytest.raises(TypeError, match="rows and offsets must be int64"):
        torch.ops.perturbdiff.group_sums(t(x.indptr), t(x.indices), t(x.data),
                                         torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1]), 5)
