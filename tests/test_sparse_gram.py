"""perturbdiff::csr_mm, ::within_distance, ::distance_to, ::split_columns and the split
sparse/dense products behind the evaluator's e-distance."""

import functools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from perturbdiff.evaluate import evaluate
from perturbdiff.evaluate.distribution import (energy_to_control, mean_distance_to,
                                               mean_pairwise_distance, within_distances)
from perturbdiff.evaluate import sparse_gram
from perturbdiff.evaluate.sparse_gram import (SplitCells, dense_genes, density, split_distance_to,
                                              split_gram, split_within)

pytestmark = pytest.mark.skipif(not sparse_gram.available(), reason="perturbdiff._C not built")


def _random_csr(rng, rows, cols, dens, index_dtype=np.int32, dtype=np.float64):
    m = sp.random(rows, cols, density=dens, format="csr", random_state=rng, dtype=dtype)
    m.data = np.log1p(50 * m.data).astype(dtype)  # log1p-like values, far from 0 in norm
    m.indices = m.indices.astype(index_dtype)
    m.indptr = m.indptr.astype(index_dtype)
    return m


def _csr_mm(a, b, m=None):
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    return torch.ops.perturbdiff.csr_mm(t(a.indptr), t(a.indices), t(a.data), t(b.indptr),
                                        t(b.indices), t(b.data), b.shape[1] if m is None else m)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), k=st.integers(1, 30), m=st.integers(0, 25),
       dens=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       index_dtype=st.sampled_from([np.int32, np.int64]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_csr_mm_matches_dense_product(n, k, m, dens, seed, index_dtype, dtype):
    rng = np.random.default_rng(seed)
    a = _random_csr(rng, n, k, dens, index_dtype, dtype)
    b = _random_csr(rng, k, m, dens, index_dtype, dtype)
    out = _csr_mm(a, b)
    assert out.dtype == torch.from_numpy(a.data).dtype and out.shape == (n, m)
    ref = a.astype(np.float64).toarray() @ b.astype(np.float64).toarray()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol * (1 + np.abs(ref).max(initial=0)))


def test_csr_mm_unsorted_indices_and_duplicates_add_up():
    # row 0 stores column 2 twice and column 0 after it: a valid (non-canonical) CSR matrix
    a = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 2, 0]), np.array([0, 3, 3])),
                      shape=(2, 3))
    b = sp.csr_matrix(np.arange(6, dtype=np.float64).reshape(3, 2))
    np.testing.assert_array_equal(_csr_mm(a, b).numpy(), a.toarray() @ b.toarray())


def test_csr_mm_is_bitwise_reproducible():
    rng = np.random.default_rng(1)
    a, b = _random_csr(rng, 300, 200, 0.1), _random_csr(rng, 200, 90, 0.1)
    assert torch.equal(_csr_mm(a, b), _csr_mm(a, b))


def test_csr_mm_opcheck():
    rng = np.random.default_rng(0)
    a, b = _random_csr(rng, 7, 5, 0.5, np.int64), _random_csr(rng, 5, 4, 0.5, np.int64)
    from perturbdiff.ops import _cpp  # noqa: F401  (registers the op's fake, which opcheck runs)

    t = torch.from_numpy
    args = (t(a.indptr), t(a.indices), t(a.data), t(b.indptr), t(b.indices), t(b.data), 4)
    torch.library.opcheck(torch.ops.perturbdiff.csr_mm.default, args)


def test_csr_mm_rejects_bad_input():
    rng = np.random.default_rng(0)
    a, b = _random_csr(rng, 4, 5, 0.6), _random_csr(rng, 5, 3, 0.6)
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 2\)"):
        _csr_mm(a, b, m=2)
    with pytest.raises(ValueError, match=r"A's column indices must lie in \[0, 4\)"):
        _csr_mm(a, b[:4])
    t = torch.from_numpy
    with pytest.raises(ValueError, match="differ in length"):
        torch.ops.perturbdiff.csr_mm(t(a.indptr), t(a.indices), t(a.data[:-1]), t(b.indptr),
                                     t(b.indices), t(b.data), 3)
    with pytest.raises(TypeError, match="float32 or both float64"):
        torch.ops.perturbdiff.csr_mm(t(a.indptr), t(a.indices), t(a.data), t(b.indptr),
                                     t(b.indices), t(b.data.astype(np.float32)), 3)
    with pytest.raises(TypeError, match="int32 or all int64"):
        torch.ops.perturbdiff.csr_mm(t(a.indptr), t(a.indices.astype(np.int64)), t(a.data),
                                     t(b.indptr), t(b.indices), t(b.data), 3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dens_x=st.floats(0, 1), dens_y=st.floats(0, 1))
def test_split_gram_matches_dense_product(seed, dens_x, dens_y):
    rng = np.random.default_rng(seed)
    x, y = _random_csr(rng, 23, 40, dens_x), _random_csr(rng, 9, 40, dens_y)
    split = rng.random(40) < 0.5  # any split gives the same product
    sx, sy = SplitCells.split(x, split), SplitCells.split(y, split)
    np.testing.assert_allclose(split_gram(sx, sy).numpy(), x.toarray() @ y.toarray().T,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(split_gram(sx[3:11]).numpy(),
                               x[3:11].toarray() @ x[3:11].toarray().T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="different genes"):
        split_gram(sx, SplitCells.split(y, ~split))


def test_dense_genes_follow_the_cost_model():
    x = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(density(x), [1.0, 0.5, 0.0])
    # both sides fully stored: dense; one side empty: sparse (no work at all)
    np.testing.assert_array_equal(dense_genes(density(x), density(x)), [True, True, False])


def test_energy_to_control_on_split_cells_matches_cdist():
    rng = np.random.default_rng(3)
    cells, ctrl = _random_csr(rng, 9, 30, 0.2), _random_csr(rng, 6, 30, 0.2)
    split = dense_genes(density(cells), density(ctrl))
    c = SplitCells.split(ctrl, split)
    self_distance, sq = mean_pairwise_distance(c, split_gram)
    offsets = np.array([0, 3, 4, 9])
    dense, cd = cells.toarray(), ctrl.toarray()
    ref = [2 * cdist(s, cd).mean() - cdist(s, s).mean() - cdist(cd, cd).mean()
           for s in np.split(dense, offsets[1:-1])]
    # per-perturbation products through split_gram, or the compiled distance kernels
    gram_within = functools.partial(within_distances, gram=split_gram)
    gram_to = functools.partial(mean_distance_to, gram=split_gram)
    for within, distance_to in ((gram_within, gram_to), (split_within, split_distance_to)):
        e = energy_to_control(SplitCells.split(cells, split), offsets, c, sq, self_distance,
                              within, distance_to)
        np.testing.assert_allclose(e.numpy(), ref, rtol=1e-10)


def _within(x, dense, offsets, cols=None):
    t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr))  # noqa: E731
    return torch.ops.perturbdiff.within_distance(t(x.indptr), t(x.indices), t(x.data), dense,
                                                 torch.as_tensor(offsets, dtype=torch.int64),
                                                 x.shape[1] if cols is None else cols)


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
    torch.library.opcheck(torch.ops.perturbdiff.within_distance.default,
                          (t(x.indptr), t(x.indices), t(x.data), d, torch.tensor(offsets), 80))


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
    with pytest.raises(TypeError, match="offsets must be int64"):
        t = torch.from_numpy
        torch.ops.perturbdiff.within_distance(t(x.indptr), t(x.indices), t(x.data), d,
                                              torch.tensor([0, 6], dtype=torch.int32), 5)


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
def test_evaluate_sparse_and_dense_inputs_agree(shared_data, fmt):
    """On real (sparse) cells, the sparse products (sparse .X, CSR or CSC) and the dense GEMM
    path (dense .X) give the same metrics, pearson_edistance included, per context."""
    real = ad.read_h5ad(shared_data)[:, :150]
    real = real[real.obs["cell_type"].isin(["T98G", "U87MG"])].copy()
    rng = np.random.default_rng(0)
    x = real.X.toarray()
    moved = np.flatnonzero(real.obs["condition"].to_numpy(str) != "control")
    x[moved] = x[rng.permutation(moved)] * (1 + 0.1 * rng.random((len(moved), x.shape[1])))
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
