"""Cross-DiT and covariate encoder: shapes, authors' init, equivariance, dead parameters, tables."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perturbdiff.model import PerturbDiffModel, load_embedding_table
from perturbdiff.model.covariates import table_for_vocab

VOCAB = {"perturbation": ["P1", "P2", "control"], "context": ["A", "B"], "batch": ["b0", "b1"]}
G = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    torch.manual_seed(0)
    return PerturbDiffModel(G, VOCAB, width=32, depth=3, heads=4, cov_hidden=16, **kw)


def inputs(b=3, s=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctrl, sc = (torch.rand(b, s, G, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (b,), generator=g)
    codes = [torch.randint(0, len(VOCAB[r]), (b,), generator=g) for r in VOCAB]
    return x, t, ctrl, codes, sc


def randomise_adaln(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(0, 0.1)


def test_shapes_and_dtypes():
    model = tiny()
    x, t, ctrl, codes, sc = inputs()
    out = model(x, t, ctrl, *codes, self_cond=sc)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert (out >= 0).all(), "ReLU head: predicted expression is non-negative"
    assert model(x, t, ctrl, *codes, drop_cond=True).shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t, ctrl, *codes).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[B, S, 24\]"):
        model(x[..., :-1], t, ctrl[..., :-1], *codes)
    with pytest.raises(ValueError, match="context code out of range"):
        model(x, t, ctrl, codes[0], torch.tensor([0, 1, 2]), codes[2])


def test_adaln_zero_init_makes_blocks_identity():
    model = tiny()
    bb = model.backbone
    for block in bb.blocks:
        for mod in (block.adaLN_modulation, block.ctrl_adaLN_modulation):
            assert torch.count_nonzero(mod[-1].weight) == 0 and torch.count_nonzero(mod[-1].bias) == 0
    assert torch.count_nonzero(bb.final_layer.linear.weight) > 0, "the head is xavier, not zero"
    x, t, ctrl, codes, sc = inputs()
    h = bb.embed_noisy(x, sc) + bb.null_emb
    hc = bb.ctrl_embedder(ctrl) + bb.null_emb
    c = (bb.t_embedder(t) + bb.y_embedder(model.covariates(*codes)))[:, None]
    for block in bb.blocks:
        h2, hc2 = block(h, hc, c)
        assert torch.equal(h2, h)
        assert hc2 is None or torch.equal(hc2, hc)
    expected = torch.relu(bb.final_layer.linear(torch.nn.functional.layer_norm(h, (32,), eps=1e-6)))
    torch.testing.assert_close(model(x, t, ctrl, *codes, self_cond=sc), expected)


@settings(max_examples=15, deadline=None)
@given(st.permutations(list(range(6))))
def test_permutation_equivariance_over_cells(perm):
    model = tiny()
    randomise_adaln(model)
    x, t, ctrl, codes, sc = inputs(s=6)
    p = torch.tensor(perm)
    out = model(x, t, ctrl, *codes, self_cond=sc)
    out_p = model(x[:, p], t, ctrl[:, p], *codes, self_cond=sc[:, p])
    torch.testing.assert_close(out_p, out[:, p], atol=1e-5, rtol=1e-5)


def test_sets_are_independent():
    model = tiny()
    randomise_adaln(model)
    x, t, ctrl, codes, sc = inputs()
    full = model(x, t, ctrl, *codes, self_cond=sc)
    one = model(x[1:2], t[1:2], ctrl[1:2], *[c[1:2] for c in codes], self_cond=sc[1:2])
    torch.testing.assert_close(one[0], full[1], atol=1e-5, rtol=1e-5)


def test_no_dead_parameters():
    """Every parameter gets a gradient once both guidance states are used (authors' dead
    control head, last control MLP etc. are not built)."""
    model = tiny()
    randomise_adaln(model)
    x, t, ctrl, codes, sc = inputs()
    loss = model(x, t, ctrl, *codes, self_cond=sc).sum() + model(x, t, ctrl, *codes, drop_cond=True).sum()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []
    last = model.backbone.blocks[-1]
    assert last.ctrl_mlp is None and last.attn.proj.out_features == 32
    assert last.ctrl_adaLN_modulation[-1].out_features == 2 * 32


def test_control_set_influences_output():
    model = tiny()
    randomise_adaln(model)
    x, t, ctrl, codes, sc = inputs()
    assert not torch.allclose(model(x, t, ctrl, *codes), model(x, t, ctrl + 1, *codes))


def test_perturbation_encodings():
    model = tiny(encodings={"perturbation": "none"})
    x, t, ctrl, codes, _ = inputs()
    other = codes[0].flip(0)
    torch.testing.assert_close(model(x, t, ctrl, *codes), model(x, t, ctrl, other, *codes[1:]))
    with pytest.raises(ValueError, match="unknown batch encoding"):
        tiny(encodings={"batch": "esm"})


def test_embedding_table_csv_and_npy(tmp_path):
    (tmp_path / "ctx.csv").write_text("label,e1,e2\nA,1.0,2.0\nB,3.0,4.0\nC,5.0,6.0\n")
    labels, vec = load_embedding_table(tmp_path / "ctx.csv")
    assert labels == ["A", "B", "C"] and vec.shape == (3, 2)
    np.save(tmp_path / "pert.npy", np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    (tmp_path / "pert.labels.txt").write_text("P1\nP2\n")
    plabels, pvec = load_embedding_table(tmp_path / "pert.npy")
    table = table_for_vocab(plabels, pvec, VOCAB["perturbation"], "perturbation", "control")
    torch.testing.assert_close(table[2], torch.tensor([0.5, 0.5]))  # control = mean of table
    with pytest.warns(UserWarning, match="lacks 1 label"):
        table_for_vocab(labels, vec, ["A", "Z"], "context")
    model = tiny(encodings={"context": "table"}, tables={"context": table_for_vocab(labels, vec, ["A", "B"], "context")})
    assert not model.covariates.encoders["context"].table.requires_grad
    (tmp_path / "bad.npy").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="labels.txt"):
        load_embedding_table(tmp_path / "bad.npy")
    (tmp_path / "bad.csv").write_text("A,1,x\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_embedding_table(tmp_path / "bad.csv")
