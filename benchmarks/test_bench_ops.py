"""Exact kernel ops on every backend: energy distance and multi-bandwidth RBF MMD (forward and
forward+backward) and kernel mean embeddings, over the [B, S, G] grid and single large pairs."""

import pytest

from perturbdiff import ops

SIX_BANDWIDTHS = 6  # perturbdiff.benchmark's x2 ladder around the median heuristic


def test_energy_batch(measure, make_case_inputs, batch_shape, backend, direction):
    B, S, G = batch_shape
    d = make_case_inputs("energy", B, S, S, G)
    value = measure(lambda x: ops.energy_distance(x, d["y"], backend=backend), direction, d["x"])[0]
    assert value.shape == (B,)


def test_mmd_rbf_batch(measure, make_case_inputs, batch_shape, backend, direction):
    B, S, G = batch_shape
    d = make_case_inputs("mmd", B, S, S, G, "rbf", SIX_BANDWIDTHS)
    value = measure(lambda x: ops.mmd(x, d["y"], "rbf", d["bandwidths"], backend=backend), direction, d["x"])[0]
    assert value.shape == (B,)


def test_energy_pair(measure, make_case_inputs, pair_shape, backend):
    n, G = pair_shape
    if backend == "torch" and n > 4096:
        pytest.skip("the pure-torch reference materialises the (2n)^2 Gram matrix several times")
    d = make_case_inputs("energy", 0, n, n, G)
    value = measure(lambda x: ops.energy_distance(x, d["y"], backend=backend), "fwd", d["x"])[0]
    assert value.dim() == 0


def test_kme_batch(measure, make_case_inputs, batch_shape, backend, direction):
    B, S, G = batch_shape
    d = make_case_inputs("kme", B, S, S, G, "rbf", 1)
    value = measure(lambda x: ops.kme(x, d["y"], "rbf", d["bandwidths"], backend=backend), direction, d["x"])[0]
    assert value.shape == (B, S)


def test_kme_pair(measure, make_case_inputs, pair_shape, backend):
    n, G = pair_shape
    queries = max(n // 8, 1)
    d = make_case_inputs("kme", 0, n, queries, G, "rbf", 1)
    value = measure(lambda x: ops.kme(x, d["y"], "rbf", d["bandwidths"], backend=backend), "fwd", d["x"])[0]
    assert value.shape == (queries,)
