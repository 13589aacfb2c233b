"""01_vae tests: the SGVB math against closed forms and Monte Carlo, the model, learning, resume and the CLIs."""

import dataclasses
import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train
from model import (
    SIZES,
    VAE,
    VAEConfig,
    bernoulli_log_likelihood,
    elbo,
    gaussian_kl,
    importance_sampled_log_px,
    init_normal_,
    log_normal,
    log_standard_normal,
    num_params,
    reparameterize,
    vae_config,
    wake_sleep,
)
from train import binarize

from shared import UserError
from shared.checkpoint import save_checkpoint
from shared.cli import config_from_preset, parse_config, run_entry
from shared.data import synthetic_images
from shared.testing import (
    checkpoints_equal,
    missing_readme_files,
    missing_readme_references,
    readme_commands_that_fail,
    run_interrupted_and_straight,
    run_script,
    same_training,
)

STAGE_DIR = Path(__file__).parents[1]


def tiny_vae(z_dim=2, seed=0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(arch="mlp", z_dim=z_dim, hidden=16, layers=1, act="tanh")).double()


def tiny_batch(n=4) -> torch.Tensor:
    images, _ = synthetic_images(n, seed=3)
    return binarize(images, torch.Generator().manual_seed(0)).double()


# ----------------------------------------------------------------------------------------------------- math
def test_analytic_kl_equals_monte_carlo_kl():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g).double()
    z = reparameterize(mu, logvar, torch.randn(400_000, 3, 4, generator=g, dtype=torch.float64))  # (S, 3, 4)
    mc = (log_normal(z, mu, logvar) - log_standard_normal(z)).mean(0)  # E_q[log q - log p], (3,)
    assert torch.allclose(gaussian_kl(mu, logvar), mc, atol=0.03), (gaussian_kl(mu, logvar), mc)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))  # q = p


def test_bernoulli_log_likelihood_is_minus_summed_bce():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64)
    x = torch.bernoulli(torch.full_like(logits, 0.3), generator=g)
    y = torch.sigmoid(logits)
    by_hand = (x * y.log() + (1 - x) * (1 - y).log()).flatten(1).sum(1)
    bce = torch.stack([F.binary_cross_entropy(y[i], x[i], reduction="sum") for i in range(5)])
    assert torch.allclose(bernoulli_log_likelihood(x, logits), by_hand, atol=1e-8)
    assert torch.allclose(bernoulli_log_likelihood(x, logits), -bce, atol=1e-8)


def test_reparameterized_gradients_match_analytic_gradients():
    # E_{z ~ N(mu, sigma^2)}[exp(z)] = exp(mu + sigma^2 / 2): d/dmu = m, d/dlogvar = m * sigma^2 / 2.
    mu = torch.tensor([0.3, -0.5], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-1.0, 0.2], dtype=torch.float64, requires_grad=True)
    eps = torch.randn(1_000_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reparameterize(mu, logvar, eps).exp().mean(0).sum().backward()
    with torch.no_grad():
        m = torch.exp(mu + logvar.exp() / 2)
        assert torch.allclose(mu.grad, m, rtol=0.01), (mu.grad, m)
        assert torch.allclose(logvar.grad, m * logvar.exp() / 2, rtol=0.02), (logvar.grad, m * logvar.exp() / 2)


def test_reparameterized_samples_have_the_posterior_moments():
    mu, logvar = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.5])
    z = reparameterize(mu.expand(200_000, 2), logvar.expand(200_000, 2))
    assert torch.allclose(z.mean(0), mu, atol=0.02) and torch.allclose(z.var(0), logvar.exp(), rtol=0.02)


def test_importance_sampling_with_k1_is_the_elbo_in_expectation_and_grows_with_k():
    model, x = tiny_vae(), tiny_batch()
    with torch.no_grad():  # move q away from the prior: KL >= 2 nats, so a sign slip in log q - log p shows
        model.encoder[1][-1].bias[:2] += 1.5   # mu
        model.encoder[1][-1].bias[2:] -= 1.0   # log sigma^2
        assert (gaussian_kl(*model.encode(x)) > 2).all(), gaussian_kl(*model.encode(x))
    torch.manual_seed(1)
    with torch.no_grad():
        elbos = torch.stack([elbo(model, x)["elbo"] for _ in range(2000)])       # (S, B): analytic-KL SGVB
        is1 = torch.stack([importance_sampled_log_px(model, x, 1) for _ in range(2000)])  # (S, B)
        is10 = torch.stack([importance_sampled_log_px(model, x, 10) for _ in range(400)])
        is100 = torch.stack([importance_sampled_log_px(model, x, 100) for _ in range(100)])
    se = (elbos.var(0) / len(elbos) + is1.var(0) / len(is1)).sqrt()
    assert ((elbos.mean(0) - is1.mean(0)).abs() < 4 * se + 1e-3).all(), (elbos.mean(0), is1.mean(0), se)
    assert (is1.mean(0) + 0.5 < is10.mean(0)).all() and (is10.mean(0) < is100.mean(0)).all()


def test_sgvb_with_l_draws_averages_l_one_draw_terms_and_divides_the_variance_by_l():
    """Eq. (7): L~B = (1/L) sum_l log p(x|z_l) - KL; each draw's term is the L = 1 estimator's, so the mean is the
    same and, the KL being analytic, the variance is the one-draw variance over L."""
    model, x = tiny_vae(), tiny_batch()
    with torch.no_grad():
        torch.manual_seed(3)
        three = elbo(model, x, samples=3)
        torch.manual_seed(3)  # the same eps, drawn as (L, B, N_z), decoded one draw at a time
        mu, logvar = model.encode(x)
        eps = torch.randn(3, *mu.shape, dtype=mu.dtype)
        by_hand = torch.stack([bernoulli_log_likelihood(x, model.decode(reparameterize(mu, logvar, e))) for e in eps])
        assert torch.allclose(three["rec"], by_hand.mean(0), atol=1e-4)
        assert torch.allclose(three["elbo"], by_hand.mean(0) - gaussian_kl(mu, logvar), atol=1e-4)
        torch.manual_seed(4)
        one = torch.stack([elbo(model, x)["elbo"] for _ in range(3000)])                 # (S, B)
        eight = torch.stack([elbo(model, x, samples=8)["elbo"] for _ in range(3000)])  # (S, B)
    se = (one.var(0) / len(one) + eight.var(0) / len(eight)).sqrt()
    assert ((one.mean(0) - eight.mean(0)).abs() < 4 * se).all()
    ratio = eight.var(0) / one.var(0)  # 1/8 = 0.125, each estimate +-4.5 % (the one-draw ELBO is heavy-tailed)
    assert ((ratio > 0.10) & (ratio < 0.155)).all(), ratio


def test_beta_weights_only_the_kl_term():
    model, x = tiny_vae(), tiny_batch()
    torch.manual_seed(0)
    a = elbo(model, x, beta=1.0)
    torch.manual_seed(0)
    b = elbo(model, x, beta=4.0)
    assert torch.allclose(a["elbo"], b["elbo"]) and torch.allclose(a["objective"], a["elbo"])
    assert torch.allclose(b["objective"], b["rec"] - 4.0 * b["kl"])


# ---------------------------------------------------------------------------------------------------- model
def test_shapes_and_named_sizes():
    for name, cfg in SIZES.items():
        model = VAE(cfg)
        mu, logvar = model.encode(torch.zeros(3, 1, 28, 28))
        assert mu.shape == logvar.shape == (3, cfg.z_dim), name
        assert model.decode(mu).shape == (3, 1, 28, 28), name
    # Appendix C MLPs: 784 -> 500 -> 2*20 and 20 -> 500 -> 784, weights and biases.
    assert num_params(VAE(SIZES["mlp-paper"])) == (784 * 500 + 500 + 500 * 40 + 40) + (20 * 500 + 500 + 500 * 784 + 784)
    assert num_params(VAE(SIZES["mlp"])) == 1_379_152
    assert num_params(VAE(SIZES["conv"])) == 3_525_217
    assert vae_config("mlp", 2).z_dim == 2 and vae_config("mlp").z_dim == 32


def test_prior_samples_are_decoder_means_at_seeded_standard_normal_z():
    import sample

    model = tiny_vae().float()
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(5))  # the seed's z ~ p(z) = N(0, I), (7, N_z)
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(z))                        # Bernoulli means, (7, 1, 28, 28)
    for batch_size in (7, 3):  # the batches draw one stream of z, so the batch size never changes a sample
        assert torch.allclose(sample.sample_prior(model, 7, batch_size, seed=5), expected, atol=1e-6), batch_size
    assert not torch.allclose(sample.sample_prior(model, 7, 7, seed=6), expected, atol=1e-3)


def test_training_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model = VAE(VAEConfig(z_dim=8, hidden=64, layers=1))
    x = binarize(synthetic_images(64, seed=0)[0], torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = -elbo(model, x)["elbo"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-20:])


class MeansWithKnownSpread(torch.nn.Module):
    """encode(x): posterior means whose variance over the images is 1, 0.02, 0.005 and 0 per dimension."""

    def encode(self, x):
        s = x.flatten(1)[:, :1] * 2 - 1                         # (N, 1) = ±1, each half of the images
        mu = s * torch.tensor([1.0, 0.02**0.5, 0.005**0.5, 0.0])  # (N, 4)
        return mu, torch.zeros_like(mu)


def test_active_units_count_the_dimensions_whose_posterior_mean_moves_with_x():
    from likelihood import active_units, posterior_mean_variance

    x = (torch.arange(2000) % 2).float().view(-1, 1, 1, 1).expand(-1, 1, 28, 28)  # half all-ones images
    a_u = posterior_mean_variance(MeansWithKnownSpread(), x, batch_size=300)
    torch.testing.assert_close(a_u, torch.tensor([1.0, 0.02, 0.005, 0.0], dtype=torch.float64) * 2000 / 1999)
    assert active_units(MeansWithKnownSpread(), x, batch_size=300) == 2       # variance 1 and 0.02 > 0.01
    assert active_units(MeansWithKnownSpread(), x, batch_size=300, threshold=0.004) == 3


# ------------------------------------------------------------------------------- the wake-sleep baseline
def test_wake_sleep_phases_each_reach_only_their_own_network():
    model, x = tiny_vae(), tiny_batch()
    terms = wake_sleep(model, x)
    enc, dec = list(model.encoder.parameters()), list(model.decoder.parameters())
    for phase, reached, untouched in (("wake", dec, enc), ("sleep", enc, dec)):
        grads = torch.autograd.grad(terms[phase].sum(), enc + dec, allow_unused=True, retain_graph=True)
        by_param = dict(zip(map(id, enc + dec), grads))
        assert all(by_param[id(p)] is None for p in untouched), phase
        assert all(by_param[id(p)] is not None and by_param[id(p)].abs().sum() > 0 for p in reached), phase
    torch.manual_seed(5)
    logged = wake_sleep(model, x)["elbo"]
    torch.manual_seed(5)
    assert torch.equal(logged, elbo(model, x)["elbo"])  # the same SGVB estimate as AEVB's, at the same noise


class FirstLatentInEightPixels(torch.nn.Module):
    """A fixed decoder: pixels 0-7 are on with probability sigmoid(2 z_1), every other pixel is off. A picture
    tells of z_1 only its count of ones n, and nothing of z_2."""

    def forward(self, z):                                   # (B, 2) -> (B, 1, 28, 28) logits
        logits = torch.full((len(z), 784), -30.0)
        logits[:, :8] = 2 * z[:, :1]
        return logits.view(-1, 1, 28, 28)


def pictures_with_n_ones(n: torch.Tensor) -> torch.Tensor:
    """Pictures whose first n pixels are on, the rest off: (len(n), 1, 28, 28)."""
    return (torch.arange(784) < n[:, None]).float().view(-1, 1, 28, 28)


def first_latent_log_joint(n: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """log p(z_1) + log p(x|z_1) under FirstLatentInEightPixels for the pictures with n ones, z_2 integrated out
    (the 776 pixels that are off add 776 log sigmoid(30) ~ -7e-11): (len(n), len(z1))."""
    return -0.5 * (math.log(2 * math.pi) + z1**2) + n[:, None] * F.logsigmoid(2 * z1) \
        + (8 - n[:, None]) * F.logsigmoid(-2 * z1)


def test_sleep_phase_moment_matches_the_true_posterior_of_the_dreams():
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="mlp", z_dim=2, hidden=32, layers=1, act="tanh"))
    model.decoder = FirstLatentInEightPixels()
    opt = torch.optim.Adam(model.encoder.parameters(), lr=5e-3)
    for _ in range(400):  # only the sleep phase trains: this decoder has no parameters
        loss = -wake_sleep(model, torch.zeros(256, 1, 28, 28))["sleep"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = torch.arange(9)
    x = pictures_with_n_ones(n)                                        # a picture with n = 0..8 ones
    with torch.no_grad():
        mu, logvar = model.encode(x)                                   # (9, 2)
    # p(z_1 | n) ∝ N(z_1; 0, 1) sigmoid(2 z_1)^n sigmoid(-2 z_1)^(8-n), by quadrature on a grid
    grid = torch.linspace(-8, 8, 8001, dtype=torch.float64)
    w = first_latent_log_joint(n, grid).softmax(dim=1)                 # (9, grid)
    mean = (w * grid).sum(1)
    var = (w * (grid - mean[:, None]) ** 2).sum(1)
    # Sleep minimizes KL(p || q), and for a Gaussian q that matches the posterior's mean and variance
    assert (mu[:, 0] - mean).abs().max() < 0.2, (mu[:, 0], mean)
    assert ((logvar[:, 0].exp() / var).log().abs() < 0.4).all(), (logvar[:, 0].exp(), var)
    assert mu[:, 1].abs().max() < 0.1 and logvar[:, 1].abs().max() < 0.15  # z_2: the prior N(0, 1)


class GaussianByCountOfOnes(torch.nn.Module):
    """A fixed encoder: q(z|x) = N(mu[n], diag(exp(logvar[n]))), n the count of ones in pixels 0-7: (B, 4)."""

    def __init__(self, mu, logvar):
        super().__init__()
        self.mu, self.logvar = mu, logvar                      # (9, 2) each

    def forward(self, x):
        n = x.flatten(1)[:, :8].sum(1).long()
        return torch.cat([self.mu[n], self.logvar[n]], 1)


def test_importance_sampled_log_px_in_chunks_is_the_exact_log_px_by_quadrature():
    """(IS) with k = 1900 drawn in chunks of 300 (six full ones and one of 100) against log p(x) by quadrature,
    for FirstLatentInEightPixels: p(x) = ∫ N(z_1; 0, 1) sigmoid(2 z_1)^n sigmoid(-2 z_1)^(8-n) dz_1."""
    n = torch.arange(9)
    x = pictures_with_n_ones(n)
    grid = torch.linspace(-8, 8, 8001, dtype=torch.float64)
    log_joint = first_latent_log_joint(n, grid)                               # (9, grid)
    exact = torch.logsumexp(log_joint, dim=1) + math.log(grid[1] - grid[0])   # (9,), -1.99 (n = 0) .. -6.62 (n = 4)
    w = log_joint.softmax(dim=1)
    mean = (w * grid).sum(1)
    var = (w * (grid - mean[:, None]) ** 2).sum(1)
    # q: near the posterior but not it (z_1: mean + 0.2, 1.5 x the variance; z_2: N(0.3, 1.2^2), not the prior)
    mu = torch.stack([mean + 0.2, torch.full_like(mean, 0.3)], 1)
    logvar = torch.stack([(1.5 * var).log(), torch.full_like(var, 2 * math.log(1.2))], 1)
    model = VAE(VAEConfig(arch="mlp", z_dim=2, hidden=4, layers=1))
    model.encoder, model.decoder = GaussianByCountOfOnes(mu, logvar), FirstLatentInEightPixels()
    torch.manual_seed(0)
    estimate = importance_sampled_log_px(model, x, 1900, chunk=300)
    assert (estimate - exact).abs().max() < 0.05, (estimate, exact)  # one estimate's sd ~0.013 nats
    assert (estimate - exact).mean().abs() < 0.02, (estimate - exact)


def test_importance_sampled_log_px_chunks_are_one_logmeanexp_over_all_k_weights(monkeypatch):
    import model as model_module

    weights = 3 * torch.randn(1900, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (k, B)
    sizes = []

    def known_log_weights(model, x, k):  # hands out the next k rows of `weights`
        sizes.append(k)
        return weights[sum(sizes) - k:sum(sizes)]

    monkeypatch.setattr(model_module, "log_weights", known_log_weights)
    estimate = importance_sampled_log_px(None, torch.zeros(3, 1, 28, 28), 1900, chunk=300)
    assert sizes == [300] * 6 + [100]
    torch.testing.assert_close(estimate, torch.logsumexp(weights, dim=0) - math.log(1900), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ training and CLIs
def smoke_cfg(**kw):
    return config_from_preset(train.TrainConfig, train.PRESETS, "smoke", device="cpu", **kw)


def test_binarize_draws_bernoulli_pixels_with_the_grey_level_as_probability():
    grey = torch.full((20000,), 64, dtype=torch.uint8)
    b = binarize(grey, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.mean().item() - 64 / 255) < 0.015
    assert not torch.equal(b, binarize(grey, torch.Generator().manual_seed(1)))  # a fresh draw each time


def test_training_loop_minimizes_minus_the_beta_weighted_elbo_and_the_elbo_rises(tmp_path, monkeypatch):
    """Eq. (8) with the --beta extension: the step's loss is -(mean reconstruction - beta mean KL) over the
    minibatch, a per-datapoint mean (a sum would scale the step by B), and training raises the ELBO."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(beta=4.0, log_every=1, sample_every=0, ckpt_every=0, run_name="beta4"))
    rows = [r for r in map(json.loads, (tmp_path / "01_vae" / "beta4" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    assert len(rows) == 60
    for r in rows:
        assert r["loss"] == pytest.approx(-(r["rec"] - 4.0 * r["kl"]), rel=1e-5), r
    assert np.mean([r["elbo"] for r in rows[-5:]]) > np.mean([r["elbo"] for r in rows[:5]]) + 20


def test_init_std_redraws_the_weights_the_run_starts_from(tmp_path, monkeypatch):
    """The paper preset's N(0, 0.01) initialization reaches the trained model (a step at lr 1e-9 barely moves it)."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(init_std=0.01, optimizer="adagrad", lr=1e-9, steps=1, sample_every=0, ckpt_every=0,
                         run_name="init"))
    weights = torch.load(tmp_path / "01_vae" / "init" / "ckpt.pt", weights_only=True)["model"]
    big = [w for w in weights.values() if w.numel() >= 1000]
    assert big and all(abs(w.std().item() - 0.01) < 0.0005 for w in big)


def test_training_and_test_images_are_binarized_fresh_and_once(tmp_path, monkeypatch):
    """Grey images (level 64) show both: every training batch is a new Bernoulli draw with that probability, and
    the test set is drawn once, with its fixed seed, the same at every call."""
    grey = torch.full((256, 1, 28, 28), 64, dtype=torch.uint8)
    monkeypatch.setattr(train, "load_images", lambda dataset, train=True: (grey, torch.zeros(256, dtype=torch.long)))
    seen, real_elbo = [], train.elbo

    def spy(model, x, *args, **kwargs):
        seen.append(x.clone())
        return real_elbo(model, x, *args, **kwargs)

    monkeypatch.setattr(train, "elbo", spy)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(steps=2, sample_every=0, ckpt_every=0, eval_examples=64, run_name="grey"))
    batches = seen[:2]  # the two training steps (the final evaluation calls elbo too)
    for x in batches:
        assert set(x.unique().tolist()) == {0.0, 1.0} and abs(x.mean().item() - 64 / 255) < 0.02
    assert not torch.equal(batches[0], batches[1])
    test_a, test_b = train.binarized_test_set("mnist", 100)[0], train.binarized_test_set("mnist", 100)[0]
    assert torch.equal(test_a, test_b)
    assert torch.equal(test_a, binarize(grey[:100], torch.Generator().manual_seed(train.TEST_SEED)))


def test_resume_is_bit_identical(tmp_path):
    cfg = smoke_cfg(steps=12, sample_every=4, ckpt_every=3, log_every=2)
    straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at=7, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 12
    assert checkpoints_equal(straight, resumed, keys=("model", "optimizer"))  # every weight and Adam moment
    assert same_training(straight, resumed) == []  # and the step, the RNG states and the rest of the checkpoint


def test_a_finished_run_continued_to_more_steps_logs_what_one_longer_run_logs(tmp_path, monkeypatch):
    """The README's Fig. 2 recipe trains 10^5 steps, then resumes with --steps 200000: the test ELBO of the first
    run's end must stay in metrics.jsonl, as the periodic evaluation at that step of one 2 x 10^5-step run would
    have it."""
    from shared.images import read_metrics

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    common = dict(sample_every=4, ckpt_every=0, log_every=2)
    train.main(smoke_cfg(steps=12, run_name="straight", **common))
    train.main(smoke_cfg(steps=8, run_name="extended", **common))
    train.main(smoke_cfg(steps=12, run_name="extended", resume="auto", **common))
    rows = [[{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "01_vae" / name /
                                                                               "metrics.jsonl")]
            for name in ("straight", "extended")]
    assert [r["step"] for r in rows[0] if "test_elbo" in r] == [4, 8, 12] and rows[0] == rows[1]


def test_warmup_ramps_the_learning_rate_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(smoke_cfg(steps=12, warmup=8, lr=1e-3, sample_every=0, run_name="ramp", stop_at=3))
    ckpt = torch.load(tmp_path / "01_vae" / "ramp" / "ckpt.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 3 / 8)  # step 3 of 8
    straight, resumed = run_interrupted_and_straight(train.main, smoke_cfg(steps=12, warmup=8, sample_every=0),
                                                     stop_at=5, experiments=tmp_path / "pair")
    assert same_training(straight, resumed) == []
    assert straight["optimizer"]["param_groups"][0]["lr"] == pytest.approx(straight["config"]["lr"])  # ramp over


def test_resume_is_bit_identical_with_the_papers_adagrad_and_weight_decay(tmp_path):
    cfg = smoke_cfg(steps=8, ckpt_every=3, sample_every=0, optimizer="adagrad", lr=0.02, weight_decay=1e-3,
                    init_std=0.01)
    straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at=5, experiments=tmp_path)
    assert checkpoints_equal(straight, resumed, keys=("model", "optimizer"))  # Adagrad's squared-gradient sums
    assert same_training(straight, resumed) == []
    group = straight["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 1e-3 and group["lr"] == 0.02
    assert all(set(s) >= {"sum", "step"} for s in straight["optimizer"]["state"].values())  # it is Adagrad


def test_wake_sleep_resumes_bit_identically_and_its_bound_rises(tmp_path):
    cfg = smoke_cfg(steps=40, ckpt_every=10, sample_every=20, method="wake-sleep", log_every=5)
    straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at=25, experiments=tmp_path)
    assert checkpoints_equal(straight, resumed, keys=("model", "optimizer"))  # the dreams' noise resumes too
    assert same_training(straight, resumed) == []
    rows = [json.loads(line) for line in (tmp_path / "01_vae" / "straight" / "metrics.jsonl").read_text().splitlines()]
    bounds = [r["elbo"] for r in rows if "elbo" in r]
    assert np.mean(bounds[-2:]) > np.mean(bounds[:2]) + 20, bounds  # wake-sleep raises the ELBO too, nats


def test_paper_preset_is_section_5():
    paper = train.PRESETS["paper"]
    assert (paper["model"], paper["optimizer"], paper["batch_size"], paper["init_std"]) == \
        ("mlp-paper", "adagrad", 100, 0.01)
    assert paper["lr"] in (0.01, 0.02, 0.1)                      # the paper's three Adagrad step sizes
    assert math.isclose(paper["weight_decay"] * 60_000, 1.0)     # N(0, I) prior on theta, per training image
    assert paper["steps"] * paper["batch_size"] == 10**7          # a tenth of Fig. 2's axis


def test_init_normal_draws_every_parameter_from_n0_std():
    model = init_normal_(VAE(SIZES["mlp-paper"]), 0.01)
    values = torch.cat([p.flatten() for p in model.parameters()])  # 815,824 numbers
    assert abs(values.std().item() - 0.01) < 1e-4 and abs(values.mean().item()) < 1e-4
    assert all(p.abs().max() > 0 for p in model.parameters())     # biases too, not only weights


def test_lower_bound_curve_bins_training_elbo_between_evaluations(tmp_path):
    import figures

    (tmp_path / "config.json").write_text(json.dumps({"batch_size": 100, "z_dim": 0, "model": "mlp-paper"}))
    rows = [{"step": 10, "elbo": -200.0}, {"step": 20, "elbo": -180.0}, {"step": 20, "test_elbo": -185.0},
            {"step": 30, "elbo": -150.0}, {"step": 30, "test_elbo": -155.0}, {"step": 40, "elbo": -1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    curve = figures.lower_bound_curve(tmp_path)
    assert curve == dict(z_dim=20, method="aevb", seen=[2000, 3000], test=[-185.0, -155.0], train=[-190.0, -150.0])
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "config.json").write_text(json.dumps({"batch_size": 100, "z_dim": 20, "method": "wake-sleep"}))
    (ws / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert figures.lower_bound_curve(ws) == {**curve, "method": "wake-sleep"}
    path, numbers = figures.main(["--curves", str(tmp_path), str(ws), "--out", str(tmp_path / "pics")])
    assert path.name == "lower_bound_curves.png" and path.stat().st_size > 5000
    assert json.loads(numbers.read_text()) == {str(tmp_path): curve, str(ws): {**curve, "method": "wake-sleep"}}
    with pytest.raises(UserError, match="not a run folder"):
        figures.lower_bound_curve(tmp_path / "pics")
    # a 2-process torchrun run sees twice the images per step
    torch.save({"stage": "01_vae", "world_size": 2}, ws / "ckpt.pt")
    assert figures.lower_bound_curve(ws)["seen"] == [4000, 6000]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp))
    train.main(smoke_cfg(run_name="smoke", steps=20, sample_every=10))
    yield tmp
    mp.undo()


def test_smoke_run_writes_its_outputs_and_sample_py_a_valid_npz(smoke_run, tmp_path):
    run_dir = smoke_run / "01_vae" / "smoke"
    assert {"ckpt.pt", "metrics.jsonl", "loss.png", "config.json"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "samples" / "final.png").is_file()
    import sample

    out = sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--num-samples", "10", "--out", str(tmp_path / "s.npz")])
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28) and images.max() > 0
    assert (tmp_path / "s.png").is_file()


def test_figures_and_likelihood_on_a_2d_latent(smoke_run, tmp_path, monkeypatch):
    import figures
    import likelihood

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(smoke_run))
    train.main(smoke_cfg(run_name="z2", steps=5, z_dim=2))
    ckpt = str(smoke_run / "01_vae" / "z2" / "ckpt.pt")
    names = {p.name for p in figures.main(["--ckpt", ckpt, "--out", str(tmp_path), "--dataset", "synthetic"])}
    assert names == {"reconstructions.png", "prior_samples.png", "interpolation.png", "manifold.png",
                     "latent_codes.png"}
    res = likelihood.main(["--ckpt", ckpt, "--k", "20", "--num-test", "8", "--dataset", "synthetic"])
    assert res["test_nll"] > 0 and -res["test_nll"] > res["test_elbo"] - 3 * res["test_elbo_se"]


def test_manifold_decodes_the_inverse_cdf_grid_z1_left_to_right_z2_top_to_bottom_high_to_low():
    """Fig. 4: tile (row i, column j) of the n x n picture is decoded from z = (Phi^-1((j + 1/2) / n),
    Phi^-1(1 - (i + 1/2) / n)), so z_1 grows to the right and z_2 upward, as in the latent-codes scatter."""
    import figures

    class ZInPixels(torch.nn.Module):  # logits of pixels 0 and 1 are z_1 and z_2
        def forward(self, z):
            return F.pad(z, (0, 782)).view(-1, 1, 28, 28)

    model = VAE(VAEConfig(arch="mlp", z_dim=2, hidden=4, layers=1))
    model.decoder = ZInPixels()
    for n in (20, 5):
        tiles = figures.manifold(model, n)                                     # (n*n, 1, 28, 28), row-major
        assert tiles.shape == (n * n, 1, 28, 28)
        z = torch.logit(tiles.flatten(1)[:, :2].double()).view(n, n, 2)        # (row, column, (z_1, z_2))
        g = torch.tensor([NormalDist().inv_cdf((j + 0.5) / n) for j in range(n)], dtype=torch.float64)
        torch.testing.assert_close(z[..., 0], g.expand(n, n), atol=1e-4, rtol=0)            # z_1 by column
        torch.testing.assert_close(z[..., 1], g.flip(0)[:, None].expand(n, n), atol=1e-4, rtol=0)  # z_2 by row
    assert z[0, 0, 0] < 0 < z[0, 0, 1]  # the top-left tile: z_1 low, z_2 high


def _one_line_error(code, stderr):
    lines = stderr.strip().splitlines()
    return code == 2 and "Traceback" not in stderr and sum("error:" in line for line in lines) == 1 \
        and "error:" in lines[-1]


def test_train_cli_error_exits_2_with_one_line_as_a_user_sees_it(tmp_path):
    res = run_script(STAGE_DIR / "train.py", "--preset", "smoke", "--batch-size", "-1", experiments=tmp_path)
    assert _one_line_error(res.returncode, res.stderr), (res.returncode, res.stderr)
    assert res.stderr.strip() == "error: --batch-size must be at least 1, got -1"


@pytest.mark.parametrize("args", [["--z-dim", "-3"], ["--model", "nope"], ["--dataset", "imagenet"],
                                  ["--resume", "/no/such/ckpt.pt"], ["--beta", "-1"],
                                  ["--method", "wake-sleep", "--beta", "0.5"], ["--method", "sleep"],
                                  ["--model", "conv", "--init-std", "0.01"], ["--latent-samples", "0"],
                                  ["--method", "wake-sleep", "--latent-samples", "2"],
                                  ["--method", "wake-sleep", "--compile"]])
def test_train_cli_errors_exit_2_with_one_line(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    run = lambda: train.main(parse_config(train.TrainConfig, train.PRESETS, train.STAGE, ["--preset", "smoke", *args]))  # noqa: E731,E501
    with pytest.raises(SystemExit) as exit_info:
        run_entry(run)
    assert _one_line_error(exit_info.value.code, capsys.readouterr().err), args


def test_sample_cli_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    import sample

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    foreign = save_checkpoint({"stage": "02_gan", "config": {}, "model": {}}, tmp_path / "gan.pt")
    alien = save_checkpoint({"stage": "01_vae", "config": {"model": "mlp", "z_dim": 7}, "model": {}}, tmp_path / "a.pt")
    no_config = save_checkpoint({"stage": "01_vae", "model": {}}, tmp_path / "no_config.pt")
    (tmp_path / "afile").write_text("")
    for args in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(foreign)], ["--ckpt", str(alien)],
                 ["--ckpt", str(no_config)],
                 ["--num-samples", "0"], ["--out", "x.png"], ["--out", str(tmp_path / "afile" / "s.npz")]):
        with pytest.raises(SystemExit) as exit_info:
            run_entry(sample.main, args)
        assert _one_line_error(exit_info.value.code, capsys.readouterr().err), args


@pytest.mark.parametrize("script, args", [
    ("likelihood", ["--k", "0"]), ("likelihood", ["--num-test", "-5"]), ("likelihood", ["--k", "abc"]),
    ("likelihood", ["--seed", "-1"]), ("likelihood", ["--dataset", "cifar10"]), ("likelihood", ["--bogus"]),
    ("likelihood", ["--num-test", "10001"]),
    ("likelihood", ["--k", "1", "--num-test", "2", "--json", str(Path(__file__).parent)]),  # a folder
    ("figures", ["--seed", "x"]), ("figures", ["--seed", str(2**64)]), ("figures", ["--dataset", "cifar10"]),
    ("figures", ["--out", __file__]), ("figures", ["--bogus"]), ("figures", ["--prefix", "../../../proc/x"])])
def test_likelihood_and_figures_cli_errors_exit_2_with_one_line(script, args, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        run_entry(module.main, args)
    err = capsys.readouterr().err
    assert _one_line_error(exit_info.value.code, err) and "usage:" not in err, (args, err)


def test_readme_references_exist():
    assert missing_readme_references(STAGE_DIR) == []
    assert missing_readme_files(STAGE_DIR) == []  # pictures, links and the asset files the numbers cite


def test_readme_commands_parse():  # every command a reader may copy still takes its flags
    assert readme_commands_that_fail(STAGE_DIR) == []


def test_default_preset_matches_dataclass_defaults():
    default, cfg = train.PRESETS["default"], train.TrainConfig()
    assert all(getattr(cfg, k) == v for k, v in default.items()), default
    assert dataclasses.asdict(cfg)["beta"] == 1.0 and math.isclose(cfg.lr, 1e-3)
