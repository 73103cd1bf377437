"""The training step (denoiser forward/backward + diffusion loss with the energy term + AdamW) and
the data loader, when those parts of the package are importable (skipped otherwise)."""

import pytest
import torch


def test_training_step(measure, make_case_inputs, train_shape):
    denoiser = pytest.importorskip("perturbdiff.model.denoiser")
    diffusion = pytest.importorskip("perturbdiff.diffusion")
    (B, S, G), (width, depth, heads) = train_shape
    d = make_case_inputs("energy", B, S, S, G)
    device = d["x"].device
    vocab = {"perturbation": ["control", "p1"], "context": ["c1"], "batch": ["b1"]}
    model = denoiser.PerturbDiffModel(G, vocab, width=width, depth=depth, heads=heads).to(device)
    schedule, loss_cfg = diffusion.GaussianDiffusion(), diffusion.LossConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    codes = torch.ones(B, dtype=torch.long, device=device)
    batch = {"x": d["x"], "ctrl": d["y"], "mask": torch.ones(B, S, dtype=torch.bool, device=device),
             "pert": codes, "context": codes * 0, "batch": codes * 0}
    gen = torch.Generator(device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = schedule.training_losses(model, batch, loss_cfg, gen)["loss"]
        loss.backward()
        opt.step()
        return loss.detach()

    measure(step, "call")


@pytest.fixture(scope="module")
def store(tmp_path_factory, quick):
    data = pytest.importorskip("perturbdiff.data")
    from perturbdiff.data.synthetic import OBS_KEYS

    cells, genes = (600, 16) if quick else (20_000, 2000)
    adata = data.make_screen(n_cells=cells, n_genes=genes, n_perturbations=4 if quick else 20, seed=0)
    path = data.prepare_store(adata, tmp_path_factory.mktemp("bench") / "store", OBS_KEYS["perturbation"],
                              OBS_KEYS["context"], OBS_KEYS["batch"], progress=False)
    return data.PerturbStore.open(path)


def test_data_loader(measure, store, quick):
    from perturbdiff.data import make_loader

    S, B = (8, 2) if quick else (256, 8)
    batches = iter(make_loader(store, "all", set_size=S, sets_per_batch=B, seed=0))

    def next_batch():
        nonlocal batches
        try:
            return next(batches)["x"]
        except StopIteration:  # a new epoch: the loader is re-created, as the trainer does
            batches = iter(make_loader(store, "all", set_size=S, sets_per_batch=B, seed=0))
            return next(batches)["x"]

    x = measure(next_batch, "call")[0]
    assert x.shape == (B, S, store.n_genes)
