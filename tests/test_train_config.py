"""Config loading/overrides, LR schedule and AdamW parameter groups."""
import math

import pytest
import torch

from perturbdiff.config import DEFAULTS, ConfigError, load_config, preset_names, to_toml
from perturbdiff.model import PerturbDiffModel
from perturbdiff.train import lr_factor, param_groups


def test_defaults_reproduce_authors():
    assert load_config("authors") == load_config(None, ["run.dir=runs/authors"])
    d = DEFAULTS
    assert (d["model"]["width"], d["model"]["depth"], d["model"]["heads"]) == (512, 8, 8)
    assert d["optim"]["betas"] == [0.9, 0.98] and d["train"]["ema_decay"] == 0.99
    assert d["diffusion"]["p_drop_cond"] == 0.5 and d["loss"]["kernel"] == "energy"
    assert {"authors", "cpu-small"} <= set(preset_names())


def test_overrides_types_and_errors(tmp_path):
    cfg = load_config("cpu-small", ["model.width=64", "optim.lr=1", "loss.bandwidths=[1, 2.5]",
                                    "run.dir=out/x", "train.bf16=true"])
    assert cfg["model"]["width"] == 64 and cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["loss"]["bandwidths"] == [1.0, 2.5] and cfg["run"]["dir"] == "out/x" and cfg["train"]["bf16"]
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'.*model.width"):
        load_config(None, ["model.widht=3"])
    with pytest.raises(ConfigError, match="model.width must be int"):
        load_config(None, ["model.width=1.5"])
    with pytest.raises(ConfigError, match="train.bf16 must be bool"):
        load_config(None, ["train.bf16=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.width"])
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nwidth = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    bad.write_text("[modle]\nwidth = 3\n")
    with pytest.raises(ConfigError, match="modle.width"):
        load_config(bad)


def test_toml_roundtrip(tmp_path):
    cfg = load_config("cpu-small", ['run.dir="a \\"quoted\\" dir"'])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_lr_schedule_shape():
    f = [lr_factor(s, 1000, 200, 0.1, 0.1) for s in range(1001)]
    assert f[0] == pytest.approx(1 / 200) and f[199] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[200:300])
    assert all(a >= b for a, b in zip(f[300:], f[301:]))
    assert f[1000] == pytest.approx(0.1)
    assert f[650] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_groups():
    vocab = {"perturbation": ["a"], "context": ["c"], "batch": ["b"]}
    model = PerturbDiffModel(8, vocab, width=16, depth=1, heads=2, cov_hidden=8)
    decay, no_decay = param_groups(model, 0.01, decay_embeddings=True)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert nd and all(n.endswith(".bias") for n in nd)
    d = {names[id(p)] for p in decay["params"]}
    assert "covariates.encoders.context.weight" in d and any("q_norm" in n for n in d)
    _, no_decay = param_groups(model, 0.01, decay_embeddings=False)
    assert "covariates.encoders.context.weight" in {names[id(p)] for p in no_decay["params"]}
    assert sum(p.numel() for g in param_groups(model, 0.01, True) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
