"""The training-step fast paths keep the math: the self-conditioning input embedding, the few-row
adaLN linear, clipping folded into the fused AdamW step, and the model under bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

from perturbdiff.model import PerturbDiffModel
from perturbdiff.model.crossdit import FewRowsLinear, _FewRowsLinear, _SelfCondEmbed, adaln
from perturbdiff.heap import keep_freed_memory
from perturbdiff.train import clip_and_step, make_optimizer
from perturbdiff.config import DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = {"perturbation": ["P1", "P2", "control"], "context": ["A", "B"], "batch": ["b0"]}


@pytest.mark.parametrize("with_sc", [False, True])
def test_self_cond_embed_is_linear_on_the_concatenation(with_sc):
    g = torch.Generator().manual_seed(0)
    x, sc = torch.rand(2, 5, 7, generator=g, dtype=torch.float64), torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 14, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    out = _SelfCondEmbed.apply(x, sc if with_sc else None, w, b)
    ref = F.linear(torch.cat([x, sc if with_sc else torch.zeros_like(x)], -1), w, b)
    torch.testing.assert_close(out, ref)
    (gw, gb), (rw, rb) = (torch.autograd.grad((o * o).sum(), (w, b)) for o in (out, ref))
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)
    xg = x.clone().requires_grad_()
    scg = sc.clone().requires_grad_() if with_sc else None
    assert torch.autograd.gradcheck(_SelfCondEmbed.apply, (xg, scg, w, b))


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_few_rows_linear_gradcheck(rows):
    g = torch.Generator().manual_seed(rows)
    args = (torch.randn(rows, 6, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True))
    torch.testing.assert_close(_FewRowsLinear.apply(*args), F.linear(*args))
    assert torch.autograd.gradcheck(_FewRowsLinear.apply, args)


def test_few_rows_linear_is_a_linear():
    torch.manual_seed(0)
    m = adaln(16, 6)
    torch.nn.init.normal_(m[1].weight)
    assert isinstance(m[1], torch.nn.Linear) and [n for n, _ in m.named_parameters()] == ["1.weight", "1.bias"]
    for shape in [(3, 1, 16), (2, 16), (16,), (4, 20, 16)]:  # per set, flat, vector, per cell (plain)
        c = torch.randn(*shape)
        torch.testing.assert_close(m(c), F.linear(F.silu(c), m[1].weight, m[1].bias), rtol=1e-5, atol=1e-5)
    assert FewRowsLinear(4, 3, bias=False)(torch.ones(2, 4)).shape == (2, 3)


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = PerturbDiffModel(12, VOCAB, width=16, depth=2, heads=2, cov_hidden=8)
    x = torch.rand(2, 3, 12)
    out = model(x, torch.tensor([3, 500]), torch.rand(2, 3, 12), torch.tensor([0, 1]), torch.tensor([1, 0]),
                torch.tensor([0, 0]), self_cond=torch.rand(2, 3, 12))
    (out.sum() * 50).backward()
    return model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clip", [1e-3, 1e6, 0.0])
def test_clip_and_step_matches_clip_grad_norm(fused, clip):
    optim = dict(DEFAULTS["optim"], fused=fused, lr=1e-2)
    optim = {k: v[0] if isinstance(v, tuple) else v for k, v in optim.items()}
    a, b = _model_and_grads(), _model_and_grads()  # same seed: same weights and gradients
    opt_a, opt_b = make_optimizer(a, optim), make_optimizer(b, optim)
    if clip > 0:
        ref_norm = torch.nn.utils.clip_grad_norm_(a.parameters(), clip)
    opt_a.step()
    norm = clip_and_step(opt_b, [p for p in b.parameters()], clip)
    if clip > 0:
        torch.testing.assert_close(norm, ref_norm)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)
    assert not hasattr(opt_b, "grad_scale")


def test_model_trains_under_bf16_autocast():
    torch.manual_seed(0)
    model = PerturbDiffModel(12, VOCAB, width=16, depth=2, heads=2, cov_hidden=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 12), torch.tensor([3, 500]), torch.rand(2, 3, 12), torch.tensor([0, 1]),
                    torch.tensor([1, 0]), torch.tensor([0, 0]), self_cond=torch.rand(2, 3, 12))
    out.float().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


def test_keep_freed_memory_is_harmless():
    assert keep_freed_memory() in (True, False)
    assert torch.ones(5_000_000).sum().item() == 5_000_000
