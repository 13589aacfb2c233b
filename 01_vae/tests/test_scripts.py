"""sample.py, likelihood.py, figures.py and train.py's flags: each flag reaches the number or picture it names."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import train
from model import VAE, VAEConfig, vae_config
from test_vae import smoke_cfg
from torchvision.io import read_image

from shared import UserError
from shared.checkpoint import provenance, save_checkpoint
from shared.images import save_grid, to_uint8


def vae_checkpoint(path, z_dim=3, weights=True):
    """A checkpoint of an untrained "mlp" VAE with N_z = z_dim (no training: seconds saved)."""
    torch.manual_seed(0)
    model = VAE(vae_config("mlp", z_dim))
    payload = {**provenance("01_vae", {"model": "mlp", "z_dim": z_dim}, 0, 0, git="")}
    if weights:
        payload["model"] = model.state_dict()
    return save_checkpoint(payload, path), model.eval()


# ------------------------------------------------------------------------------------------------- sample.py
def test_sample_main_writes_the_seeds_decoder_means_as_uint8_and_a_64_image_grid(tmp_path):
    """--seed picks the z of the .npz, whose uint8 pixels are 255 x the Bernoulli means; the grid is 8 x 8."""
    import sample

    ckpt, model = vae_checkpoint(tmp_path / "vae.pt")
    run = lambda seed, name: np.load(sample.main(["--ckpt", str(ckpt), "--num-samples", "70", "--seed", str(seed),  # noqa: E731
                                                  "--batch-size", "32", "--out", str(tmp_path / name)]))["images"]
    images = run(3, "a.npz")
    expected = to_uint8(sample.sample_prior(model, 70, 70, seed=3), (0.0, 1.0)).numpy()
    assert np.array_equal(images, expected)
    assert not np.array_equal(run(4, "b.npz"), images)  # another seed, other samples
    assert read_image(tmp_path / "a.png").shape[1:] == (2 + 8 * 30, 2 + 8 * 30)  # the first 64 of 70, 8 x 8 tiles


def test_a_checkpoint_without_weights_is_a_user_error(tmp_path):
    """A checkpoint whose config names a VAE but which has no "model" entry is a UserError, not a KeyError."""
    import sample

    ckpt, _ = vae_checkpoint(tmp_path / "empty.pt", weights=False)
    with pytest.raises(UserError, match="does not hold this stage's VAE weights"):
        sample.load_model(str(ckpt))


# --------------------------------------------------------------------------------------------- likelihood.py
def test_likelihood_main_is_seeded_and_measures_num_test_images_with_k_samples(tmp_path):
    """--seed fixes the q(z|x) draws (same seed, same numbers; another seed, others); --num-test and --k reach the
    measurement, and --json holds what main returns."""
    import likelihood

    ckpt, _ = vae_checkpoint(tmp_path / "vae.pt")
    args = ["--ckpt", str(ckpt), "--dataset", "synthetic", "--k", "4", "--num-test", "6", "--batch-size", "4"]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    first = likelihood.main([*args, "--seed", "1", "--json", str(tmp_path / "nll.json")])
    assert (first["num_test"], first["k"]) == (6, 4)
    assert strip(likelihood.main([*args, "--seed", "1"])) == strip(first)
    assert likelihood.main([*args, "--seed", "2"])["test_nll"] != first["test_nll"]
    assert json.loads((tmp_path / "nll.json").read_text()) == first


def test_likelihood_batch_size_must_be_positive():
    """--batch-size 0 is a UserError before any work (not a ValueError from range())."""
    import likelihood

    with pytest.raises(UserError, match="--batch-size must be positive"):
        likelihood.main(["--batch-size", "0"])


def test_likelihood_takes_the_whole_test_split(tmp_path, monkeypatch):
    """--num-test 10000 (all of MNIST's test split) is allowed and is the number of images measured."""
    import likelihood

    sizes = []
    monkeypatch.setattr(likelihood, "load_model", lambda ckpt, device: (None, {"step": 0}, tmp_path / "c.pt"))
    monkeypatch.setattr(likelihood, "binarized_test_set",
                        lambda dataset, n: sizes.append(n) or (torch.zeros(n, 1), None))
    monkeypatch.setattr(likelihood, "measure", lambda model, x, k, batch_size: {"num_test": len(x)})
    assert likelihood.main(["--num-test", "10000", "--k", "1"])["num_test"] == 10_000 and sizes == [10_000]


def test_measure_reports_means_standard_errors_and_active_units(monkeypatch):
    """The ELBO averages elbo_samples draws per image, the NLL is -mean log p(x) of k-sample IS, each with its
    standard error std / sqrt(N), and a dimension is active when A_u > 0.01."""
    import likelihood

    calls, ks = [], []

    def fake_elbo(model, xb):  # the c-th call's estimate is c for every image of the batch
        calls.append(len(xb))
        return {"elbo": torch.full((len(xb),), float(len(calls) - 1))}

    def fake_is(model, xb, k):  # log p(x) = -(1 + image index)
        ks.append(k)
        return -(xb.flatten(1)[:, 0] + 1)

    monkeypatch.setattr(likelihood, "elbo", fake_elbo)
    monkeypatch.setattr(likelihood, "importance_sampled_log_px", fake_is)
    monkeypatch.setattr(likelihood, "posterior_mean_variance",
                        lambda model, x: torch.tensor([1.0, 0.02, 0.005, 0.0, 0.0], dtype=torch.float64))
    x = torch.arange(4.0).view(4, 1, 1, 1)
    res = likelihood.measure(SimpleNamespace(cfg=SimpleNamespace(z_dim=4)), x, k=7, batch_size=2)
    assert calls == [2] * 20 and ks == [7, 7]  # 10 ELBO draws per batch, one IS estimate with k = 7
    elbos, log_px = torch.tensor([4.5, 4.5, 14.5, 14.5]), torch.tensor([-1.0, -2.0, -3.0, -4.0])
    assert res["test_elbo"] == pytest.approx(9.5) and res["test_elbo_se"] == pytest.approx(elbos.std() / 2)
    assert res["test_nll"] == pytest.approx(2.5) and res["test_nll_se"] == pytest.approx(log_px.std() / 2)
    assert res["active_units"] == 2 and res["z_dim"] == 4 and (res["num_test"], res["k"]) == (4, 7)
    assert res["active_units_by_threshold"] == {"0.005": 2, "0.01": 2, "0.02": 1, "0.05": 1, "0.1": 1}


# ------------------------------------------------------------------------------------------------ figures.py
class ZInPixels(torch.nn.Module):
    """A decoder whose logits of pixels 0 .. N_z - 1 are z itself."""

    def forward(self, z):
        return torch.nn.functional.pad(z, (0, 784 - z.shape[1])).view(-1, 1, 28, 28)


def test_reconstructions_put_each_row_of_16_inputs_above_its_decoder_means_at_mu():
    """reconstructions(x): 16 inputs, then the 16 decoder means at z = mu(x) (not a sample, not log sigma^2)."""
    import figures

    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="mlp", z_dim=3, hidden=8, layers=1, act="tanh"))
    model.decoder = ZInPixels()
    x = torch.rand(32, 1, 28, 28).round()
    out = figures.reconstructions(model, x)
    mu = model.encode(x)[0]
    recon = torch.sigmoid(ZInPixels()(mu))
    assert out.shape == (64, 1, 28, 28)
    for row in (0, 1):
        assert torch.equal(out[32 * row:32 * row + 16], x[16 * row:16 * row + 16])
        torch.testing.assert_close(out[32 * row + 16:32 * row + 32], recon[16 * row:16 * row + 16])


def test_interpolation_walks_from_mu_a_to_mu_b_in_equal_steps():
    """Row b of interpolation(): decoder means at z = (1 - t) mu(x_a) + t mu(x_b), t = 0, 1/9, ..., 1."""
    import figures

    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="mlp", z_dim=3, hidden=8, layers=1, act="tanh"))
    model.decoder = ZInPixels()
    x_a, x_b = torch.rand(2, 1, 28, 28).round(), torch.rand(2, 1, 28, 28).round()
    z = torch.logit(figures.interpolation(model, x_a, x_b).flatten(1)[:, :3].double()).view(2, 10, 3)
    mu_a, mu_b = model.encode(x_a)[0].double(), model.encode(x_b)[0].double()
    t = torch.arange(10, dtype=torch.float64)[None, :, None] / 9
    torch.testing.assert_close(z, (1 - t) * mu_a[:, None] + t * mu_b[:, None], atol=1e-5, rtol=0)


def test_figures_main_draws_the_seeds_prior_samples_and_test_images_under_the_prefix(tmp_path):
    """--seed picks the prior samples, --prefix names the files, and the pictures are of the fixed test images:
    reconstructions of 0-31 and interpolations from images 32-37 to 38-43."""
    import figures
    import sample

    ckpt, model = vae_checkpoint(tmp_path / "vae.pt")
    paths = figures.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "f"), "--dataset", "synthetic",
                          "--seed", "3", "--prefix", "p_"])
    assert sorted(p.name for p in paths) == ["p_interpolation.png", "p_prior_samples.png", "p_reconstructions.png"]
    x = train.binarized_test_set("synthetic", 44)[0]
    grid = dict(value_range=(0.0, 1.0))
    refs = {"p_prior_samples.png": save_grid(sample.sample_prior(model, 64, 64, 3), tmp_path / "a.png", **grid),
            "p_interpolation.png": save_grid(figures.interpolation(model, x[32:38], x[38:44]), tmp_path / "b.png",
                                             nrow=10, **grid),
            "p_reconstructions.png": save_grid(figures.reconstructions(model, x[:32]), tmp_path / "c.png", nrow=16,
                                               **grid)}
    for name, ref in refs.items():
        assert torch.equal(read_image(tmp_path / "f" / name), read_image(ref)), name


# ------------------------------------------------------------------------------------------ train.py's flags
def test_latent_samples_init_std_eval_examples_and_seed_reach_the_run(tmp_path, monkeypatch):
    """--latent-samples is the L of every training step's SGVB estimate, --init-std the std of the weights the
    run starts from, --eval-examples the number of test images the ELBO is measured on, whose noise is seeded by
    the step (the logged number is reproducible from the checkpoint), and --seed fixes the z of the sample grids."""
    import sample

    seen, evaluated, real_elbo, real_test_elbo = [], [], train.elbo, train.test_elbo

    def spy_elbo(model, x, *args, **kwargs):
        seen.append(args)
        return real_elbo(model, x, *args, **kwargs)

    def spy_test_elbo(model, x_test, *args, **kwargs):
        evaluated.append(len(x_test))
        return real_test_elbo(model, x_test, *args, **kwargs)

    monkeypatch.setattr(train, "elbo", spy_elbo)
    monkeypatch.setattr(train, "test_elbo", spy_test_elbo)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(steps=2, latent_samples=3, init_std=0.03, optimizer="adagrad", lr=1e-9, sample_every=0,
                         ckpt_every=0, eval_examples=40, seed=3, run_name="flags"))
    assert seen[:2] == [(1.0, 3), (1.0, 3)] and evaluated == [40]
    run = tmp_path / "01_vae" / "flags"
    weights = torch.load(run / "ckpt.pt", weights_only=True)["model"]
    big = [w for w in weights.values() if w.numel() >= 1000]
    assert big and all(abs(w.std().item() - 0.03) < 0.0015 for w in big)
    model = sample.load_model(str(run / "ckpt.pt"))[0]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    torch.manual_seed(10_000 + 2)
    again = real_test_elbo(model, train.binarized_test_set("synthetic", 40)[0])
    assert [r["test_elbo"] for r in logged if "test_elbo" in r] == [pytest.approx(again, rel=1e-6)]
    z = torch.randn(64, model.cfg.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = save_grid(torch.sigmoid(model.decode(z)), tmp_path / "ref.png", value_range=(0.0, 1.0))
    assert torch.equal(read_image(run / "samples" / "final.png"), read_image(ref))


def test_checkpoints_come_every_ckpt_every_steps_and_samples_every_sample_every(tmp_path, monkeypatch):
    """--ckpt-every sets when checkpoints are written (and the end), --sample-every when grids are drawn."""
    from shared.experiment import Run

    saved, real_save = [], Run.save_checkpoint

    def spy(self, **kwargs):
        saved.append(self.step)
        return real_save(self, **kwargs)

    monkeypatch.setattr(Run, "save_checkpoint", spy)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(steps=4, ckpt_every=3, sample_every=2, eval_examples=16, run_name="every"))
    assert saved == [3, 4]
    grids = sorted(p.name for p in (tmp_path / "01_vae" / "every" / "samples").iterdir())
    assert grids == ["final.png", "step0000002.png"]  # the last step draws final.png instead
