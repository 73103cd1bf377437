"""Random-Fourier-feature ops on every backend: set embeddings and the linear-time MMD, over the
[B, S, G] grid (forward and forward+backward) and single large pairs."""

from perturbdiff.ops import rff


def test_set_embedding_batch(measure, make_case_inputs, make_feature_map, batch_shape, rff_backend, direction):
    B, S, G = batch_shape
    d = make_case_inputs("rff", B, S, S, G, "rbf", 1)
    fmap = make_feature_map(G, d["bandwidths"])
    emb = measure(lambda x: rff.set_embedding(x, fmap, backend=rff_backend), direction, d["x"])[0]
    assert emb.shape == (B, fmap.num_outputs)


def test_rff_mmd_batch(measure, make_case_inputs, make_feature_map, batch_shape, rff_backend, direction):
    B, S, G = batch_shape
    d = make_case_inputs("rff", B, S, S, G, "rbf", 1)
    fmap = make_feature_map(G, d["bandwidths"])
    value = measure(lambda x: rff.rff_mmd(x, d["y"], feature_map=fmap, backend=rff_backend), direction, d["x"])[0]
    assert value.shape == (B,)


def test_rff_mmd_pair(measure, make_case_inputs, make_feature_map, pair_shape, rff_backend):
    n, G = pair_shape
    d = make_case_inputs("rff", 0, n, n, G, "rbf", 1)
    fmap = make_feature_map(G, d["bandwidths"])
    value = measure(lambda x: rff.rff_mmd(x, d["y"], feature_map=fmap, backend=rff_backend), "fwd", d["x"])[0]
    assert value.dim() == 0
