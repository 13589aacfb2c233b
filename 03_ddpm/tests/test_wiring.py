"""Flags and arguments reaching where they are used: sample.py, figures.py, train.py and the samplers' options."""

import json
import math
from types import SimpleNamespace

import figures
import numpy as np
import pytest
import sample
import torch
import train
from diffusion import Diffusion, discretized_gaussian_log_likelihood, normal_kl
from model import build_unet
from test_diffusion import _some_eps_theta

from shared.checkpoint import provenance, save_checkpoint
from shared.cli import config_from_preset
from shared.data import load_images
from shared.images import to_uint8

T = 10
CFG = dict(model="tiny", dropout=0.0, timesteps=T, schedule="linear", beta_1=1e-4, beta_T=0.02)


def _unet(seed):
    torch.manual_seed(seed)
    net = build_unet("tiny", dropout=0.0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # not the zero init: the output depends on the weights
    return net.state_dict()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A T = 10 checkpoint whose EMA and raw weights differ (written directly: no training needed)."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint({**provenance(train.STAGE, CFG, 0, 1, git="test"), "model": _unet(0), "ema": _unet(1)}, path)
    return path


# ---- sample.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generate_is_batches_of_the_sampler_from_one_seeded_generator(sampler):
    """generate = the sampler with its steps, eta and variance, on batches of at most batch_size, all drawn from
    one generator seeded with seed: n = 5 in batches of 3 is the sampler on 3 then on 2 images."""
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    got = sample.generate(eps_theta, d, 5, sampler, steps=3, eta=0.7, var="beta_tilde", batch_size=3, seed=4)
    g = torch.Generator().manual_seed(4)
    if sampler == "ddim":
        run = lambda n: d.sample_ddim(eps_theta, (n, 1, 28, 28), S=3, eta=0.7, generator=g)  # noqa: E731
    else:
        run = lambda n: d.sample_ddpm(eps_theta, (n, 1, 28, 28), sigma="beta_tilde", generator=g)  # noqa: E731
    want = torch.cat([run(3), run(2)])
    assert got.shape == (5, 1, 28, 28) and torch.equal(got, want)


def test_sample_main_passes_every_flag_to_generate_and_saves_what_it_returns(ckpt, tmp_path, monkeypatch):
    """--sampler/--steps/--eta/--var/--batch-size/--seed/--num-samples reach generate; the npz holds its images."""
    calls, real = [], sample.generate

    def spy(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    out = tmp_path / "s.npz"
    # --eta 1 and --steps T are the inclusive ends of their ranges
    sample.main(["--ckpt", str(ckpt), "--num-samples", "3", "--steps", str(T), "--eta", "1", "--var", "beta_tilde",
                 "--batch-size", "2", "--seed", "7", "--out", str(out)])
    assert calls == [(3, "ddim", T, 1.0, "beta_tilde", 2, 7, torch.device("cpu"))]
    model, d, _ = sample.load_model(ckpt, "cpu")
    want = real(model, d, 3, "ddim", T, 1.0, "beta_tilde", 2, 7)
    assert np.array_equal(np.load(out)["images"], to_uint8(want).numpy())


def test_load_model_gives_the_ema_weights_in_eval_mode(ckpt, tmp_path):
    """sample.py draws from the EMA weights when a checkpoint has them (else 'model'), with dropout off."""
    model, d, _ = sample.load_model(ckpt, "cpu")
    ema = _unet(1)
    assert not model.training and d.T == T
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert not torch.equal(ema["conv_out.weight"], _unet(0)["conv_out.weight"])
    only = tmp_path / "pretrained.pt"  # a pretrained file: the EMA weights saved as 'model'
    save_checkpoint({**provenance(train.STAGE, CFG, 0, 1, git="test"), "model": ema}, only)
    model = sample.load_model(only, "cpu")[0]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_sample_grid_shows_the_first_64_images(ckpt, tmp_path):
    """The PNG beside the npz is an 8 x 8 grid of the first 64 samples however many were drawn."""
    from PIL import Image

    out = tmp_path / "s.npz"
    sample.main(["--ckpt", str(ckpt), "--num-samples", "65", "--steps", "1", "--out", str(out)])
    assert np.load(out)["images"].shape[0] == 65
    assert Image.open(out.with_suffix(".png")).size == (8 * 30 + 2, 8 * 30 + 2)


# ---- figures.py --------------------------------------------------------------------------------------------


def test_fid_vs_steps_samples_each_run_with_its_eta_and_keeps_their_files_apart(tmp_path, monkeypatch):
    """Each (sampler, S, eta) is sampled with that eta and the FID batch size, and saved under its own name."""
    import shared.metrics

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    calls = []
    monkeypatch.setattr(figures, "generate", lambda *a, **k: calls.append((a[2:], k)) or torch.zeros(a[2], 1, 28, 28))
    monkeypatch.setattr(shared.metrics, "evaluate", lambda images, device: {"fid": 1.0})
    rows = figures.fid_vs_steps(None, Diffusion(T=T), [("ddim", 5, 0.0), ("ddim", 5, 1.0), ("ddpm", T, 0.0)], 4, 3)
    assert [(a, k["batch_size"], k["seed"]) for a, k in calls] == [
        ((4, "ddim", 5, 0.0), 3, 0), ((4, "ddim", 5, 1.0), 3, 0), ((4, "ddpm", T, 0.0), 3, 0)]
    assert [(r["sampler"], r["S"], r.get("eta"), r["num_samples"]) for r in rows] == [
        ("ddim", 5, 0.0, 4), ("ddim", 5, 1.0, 4), ("ddpm", T, None, 4)]
    assert sorted(p.name for p in (tmp_path / train.STAGE / "eval").iterdir()) == [
        "ddim5.npz", "ddim5_eta1.npz", f"ddpm{T}.npz"]


def test_figures_main_fid_flags_reach_the_runs_and_keep_old_points(ckpt, tmp_path, monkeypatch):
    """--fid-steps (up to T inclusive), --fid-eta, --fid-ddpm, --fid-samples and --batch-size set the FID runs;
    points already in fid_vs_steps.json for other runs are kept."""
    seen = []

    def fake(model, diffusion, runs, n, batch_size):
        seen.append((runs, n, batch_size))
        return [{"sampler": s, "S": S, **({"eta": e} if s == "ddim" else {}), "fid": 1.0} for s, S, e in runs]

    monkeypatch.setattr(figures, "fid_vs_steps", fake)
    monkeypatch.setattr(figures, "plot_fid", lambda rows, out: None)
    assets = tmp_path / "a"
    assets.mkdir()
    (assets / "fid_vs_steps.json").write_text(json.dumps([{"sampler": "ddim", "S": 3, "eta": 0.0, "fid": 9.0}]))
    figures.main(["--ckpt", str(ckpt), "--assets", str(assets), "--no-pictures", "--fid-steps", f"2,{T}",
                  "--fid-eta", "0.5", "--fid-ddpm", "--fid-samples", "7", "--batch-size", "3"])
    assert seen == [([("ddim", 2, 0.5), ("ddim", T, 0.5), ("ddpm", T, 0.0)], 7, 3)]
    rows = json.loads((assets / "fid_vs_steps.json").read_text())
    assert [(r["sampler"], r["S"], r.get("eta")) for r in rows] == [
        ("ddim", 3, 0.0), ("ddim", 2, 0.5), ("ddim", T, 0.5), ("ddpm", T, None)]


def test_figures_main_bits_per_dim_flags_and_row(ckpt, tmp_path, monkeypatch):
    """--bpd-images test images, --bpd-t draws of t, in batches of --batch-size from one generator seeded 0; the row
    is the mean and its standard error std/sqrt(n), and t_draws is T - 1 (the terms t = 2..T) for --bpd-t 0."""
    images = load_images("synthetic")[0][:9]
    monkeypatch.setattr(figures, "load_images", lambda name, train=True: (images, None))
    calls, real = [], Diffusion.bits_per_dim

    def spy(self, eps_theta, x0, **kwargs):
        calls.append((x0.shape[0], kwargs["num_t"]))
        return real(self, eps_theta, x0, **kwargs)

    monkeypatch.setattr(Diffusion, "bits_per_dim", spy)
    assets = tmp_path / "a"
    figures.main(["--ckpt", str(ckpt), "--assets", str(assets), "--no-pictures", "--bpd-images", "5", "--bpd-t", "3",
                  "--batch-size", "2"])
    assert calls == [(2, 3), (2, 3), (1, 3)]
    model, d, _ = sample.load_model(ckpt, "cpu")
    g = torch.Generator().manual_seed(0)
    x0 = images[:5].float() / 127.5 - 1
    bpd = torch.cat([real(d, model, x, num_t=3, generator=g) for x in x0.split(2)])
    (row,) = json.loads((assets / "bits_per_dim.json").read_text())
    assert row["test_images"] == 5 and row["t_draws"] == 3
    assert row["bpd"] == pytest.approx(bpd.mean().item(), rel=1e-6)
    assert row["bpd_se"] == pytest.approx(bpd.std().item() / math.sqrt(5), rel=1e-6)
    figures.main(["--ckpt", str(ckpt), "--assets", str(assets), "--no-pictures", "--bpd-images", "2"])
    assert [r["t_draws"] for r in json.loads((assets / "bits_per_dim.json").read_text())] == [T - 1, 3]


def test_figures_pictures_use_50_ddim_steps_once_T_allows(tmp_path, monkeypatch):
    """For T >= 50 the samples and the interpolation use S = 50 DDIM steps at eta = 0 (T = 10 in the main test)."""
    monkeypatch.setattr(figures, "load_images", lambda name, train=True: (torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
                                                                          None))
    for name in ("forward_process", "reverse_process", "save_grid"):
        monkeypatch.setattr(figures, name, lambda *a, **k: None)
    gen, interp = [], []
    monkeypatch.setattr(figures, "generate", lambda *a, **k: gen.append((a[2:], k)))
    monkeypatch.setattr(figures, "interpolation", lambda *a, **k: interp.append(k))
    path = tmp_path / "t60.pt"
    save_checkpoint({**provenance(train.STAGE, {**CFG, "timesteps": 60}, 0, 1, git="test"), "model": _unet(0)}, path)
    figures.main(["--ckpt", str(path), "--assets", str(tmp_path / "a")])
    assert gen == [((64, "ddim", 50, 0.0), {"seed": 0})] and interp == [{"S": 50}]


def test_forward_process_uses_one_noise_draw_for_every_t(tmp_path):
    """Every frame is sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps with the same eps: solving each frame for eps agrees."""
    d = Diffusion(T=50)
    x0 = torch.rand(1, 1, 28, 28) * 2 - 1
    frames = figures.forward_process(d, x0, tmp_path / "f.png")
    ts = figures.scaled_timesteps([0, 25, 50, 100, 200, 300, 500, 700, 1000], 50)
    ab = d.alpha_bar[ts[1:]].float().view(-1, 1, 1, 1)
    eps = (frames[1:] - ab.sqrt() * x0[0]) / (1 - ab).sqrt()
    torch.testing.assert_close(eps, eps[:1].expand_as(eps), atol=1e-3, rtol=0)


def test_interpolation_decodes_slerp_paths_from_end_to_end_with_deterministic_ddim(tmp_path, monkeypatch):
    """Each row is DDIM (eta = 0, the given S) from slerp(a, b, w), w = 0..1: from x_T^a exactly to x_T^b."""
    calls, real = [], Diffusion.sample_ddim

    def spy(self, eps_theta, shape, **kwargs):
        calls.append(kwargs)
        return real(self, eps_theta, shape, **kwargs)

    monkeypatch.setattr(Diffusion, "sample_ddim", spy)
    monkeypatch.setattr(figures, "save_grid", lambda *a, **k: None)
    figures.interpolation(_some_eps_theta(Diffusion(T=T)), Diffusion(T=T), tmp_path / "i.png", pairs=2, n=5, S=3)
    (kw,) = calls
    assert kw["S"] == 3 and kw["eta"] == 0.0
    x_T = kw["x_T"].view(2, 5, 1, 28, 28)
    g = torch.Generator().manual_seed(3)
    for row in x_T:
        a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
        torch.testing.assert_close(row[0], a[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(row[-1], b[0], atol=1e-5, rtol=0)


# ---- train.py ----------------------------------------------------------------------------------------------


def test_draw_samples_is_seeded_deterministic_ddim_on_sample_steps_capped_at_T():
    """The training grids: DDIM with eta = 0 on min(--sample-steps, T) steps, noise from a generator seeded --seed."""
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    for sample_steps, S in ((3, 3), (25, T)):
        cfg = SimpleNamespace(seed=5, sample_steps=sample_steps, timesteps=T)
        got = train.draw_samples(d, eps_theta, cfg, "cpu", n=2)
        want = d.sample_ddim(eps_theta, (2, 1, 28, 28), S=S, eta=0.0, generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want), sample_steps


def test_make_diffusion_takes_beta_1_and_beta_T_in_order():
    """--beta-1 sets beta_1 and --beta-T sets beta_T (both scaled by 1000/T)."""
    d = train.make_diffusion({**CFG, "timesteps": 100, "beta_1": 2e-4, "beta_T": 0.01})
    assert d.beta[1].item() == pytest.approx(2e-3) and d.beta[100].item() == pytest.approx(0.1)


def test_train_flags_reach_the_model_optimizer_clip_and_sample_grids(tmp_path, monkeypatch):
    """--dropout builds the U-Net, --warmup/--lr set the step's lr (lr * min(1, k / warmup)), --grad-clip the clip
    norm, --sample-every when grids are drawn; the grids come from the EMA network, in eval mode."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    built, lrs, clips, grids = [], [], [], []
    real_build, real_clip, real_draw = train.build_unet, torch.nn.utils.clip_grad_norm_, train.draw_samples

    def build(name, dropout):
        built.append(dropout)
        return real_build(name, dropout)

    def clip(params, max_norm):
        clips.append(max_norm)
        return real_clip(params, max_norm)

    def draw(diffusion, ema, cfg, device, n=64):
        grids.append((ema, ema.training))
        return real_draw(diffusion, ema, cfg, device, n=2)

    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"])
                        or real_step(self, *a, **k))
    monkeypatch.setattr(train, "build_unet", build)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(train, "draw_samples", draw)
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", dataset="synthetic", model="tiny",
                             timesteps=T, batch_size=2, steps=3, warmup=4, lr=0.02, grad_clip=0.3, dropout=0.25,
                             sample_every=2, ckpt_every=0, sample_steps=1, log_every=1, device="cpu", run_name="w")
    ema = train.main(cfg)
    assert built == [0.25] and clips == [0.3, 0.3, 0.3]
    assert lrs == pytest.approx([0.005, 0.01, 0.015])
    assert [(e is ema, training) for e, training in grids] == [(True, False), (True, False)]  # step 2 and final


# ---- diffusion.py: the samplers' and the bound's options ---------------------------------------------------


def test_clip_false_leaves_x0_hat_unclipped_in_both_samplers():
    """clip=False: each traced x_hat_0 is Eq. (4) solved for x_0, unclamped (and some leave [-1, 1]); DDPM steps to
    the Eq. (11) mean."""
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = 2 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for run in (lambda tr: d.sample_ddpm(eps_theta, x_T.shape, clip=False, x_T=x_T, trace=tr),
                lambda tr: d.sample_ddim(eps_theta, x_T.shape, S=4, eta=0.0, clip=False, x_T=x_T, trace=tr)):
        trace = []
        run(trace)
        for t, xt, x0_hat in trace[:-1]:
            tt = torch.full((2,), t)
            torch.testing.assert_close(x0_hat, d.predict_x0(xt, tt, eps_theta(xt, tt)))
        assert max(x0_hat.abs().max().item() for _, _, x0_hat in trace[:-1]) > 1.5
    trace = []
    d.sample_ddpm(eps_theta, x_T.shape, clip=False, x_T=x_T, trace=trace)
    torch.testing.assert_close(trace[-1][1], d.p_mean(eps_theta, trace[-2][1], torch.ones(2, dtype=torch.long),
                                                      clip=False)[0])


def test_bits_per_dim_with_random_t_is_reproducible_from_its_generator():
    """num_t > 0 draws its t's from the given generator, not the global RNG: one seed, one estimate."""
    d = Diffusion(T=T)
    eps_theta = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)  # noqa: E731
    x0 = torch.linspace(-1, 1, 4 * 16).reshape(4, 1, 4, 4)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(d.bits_per_dim(eps_theta, x0, num_t=1, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(runs[0], runs[1])
    other = d.bits_per_dim(eps_theta, x0, num_t=1, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(runs[0], other)


def test_bits_per_dim_with_random_t_scales_the_drawn_terms_by_T_minus_1():
    """num_t = 1 with a perfect predictor and sigma^2 = beta: the estimate swaps the sum of the T - 1 terms
    KL(N(0, beta_tilde_t) || N(0, beta_t)) for (T - 1) times the term of the t in 2..T its generator drew first."""
    d = Diffusion(T=T)
    x0 = torch.linspace(-1, 1, 8 * 16).reshape(8, 1, 4, 4)
    perfect = lambda xt, t: d.predict_eps(xt, t, x0)  # noqa: E731
    full = d.bits_per_dim(perfect, x0, generator=torch.Generator().manual_seed(0))
    est = d.bits_per_dim(perfect, x0, num_t=1, generator=torch.Generator().manual_seed(5))
    drawn = torch.randint(2, T + 1, (1, 8), generator=torch.Generator().manual_seed(5))[0]  # (8,)
    k = normal_kl(torch.zeros(T + 1), d.beta_tilde.log(), torch.zeros(T + 1), d.beta.log()) / math.log(2)  # bits
    want = full - k[2:].sum() + (T - 1) * k[drawn]
    torch.testing.assert_close(est.double(), want.double(), rtol=1e-5, atol=0)
    assert drawn.unique().numel() > 2 and k[2:].std() > 0.1 * k[2:].mean()  # the t's drawn matter


def test_bits_per_dim_decoder_uses_the_unclipped_mean_at_the_edges():
    """L_0 scores x_0 under N(mu_theta(x_1, 1), beta_1) with Eq. (11)'s mean, not the clipped one: with eps_theta = 0
    and x_0 = +-1, mu_theta = x_1 / sqrt(alpha_1) is outside [-1, 1] for about half the pixels."""
    d = Diffusion(T=2)  # one L_{t-1} term, weighed the same either way
    x0 = torch.ones(1, 1, 8, 8)
    x0[..., 4:] = -1
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    bpd = d.bits_per_dim(zero, x0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ab, alpha, beta = d.alpha_bar, d.alpha, d.beta
    x2 = ab[2].sqrt() * x0 + (1 - ab[2]).sqrt() * torch.randn(x0.shape, generator=g)
    mu_tilde = (ab[1].sqrt() * beta[2] * x0 + alpha[2].sqrt() * (1 - ab[1]) * x2) / (1 - ab[2])
    total = normal_kl(ab[2].sqrt() * x0, (1 - ab[2]).log(), torch.zeros_like(x0), 0.0).sum()
    total = total + normal_kl(mu_tilde, d.beta_tilde[2].log(), x2 / alpha[2].sqrt(), beta[2].log()).sum()
    x1 = ab[1].sqrt() * x0 + (1 - ab[1]).sqrt() * torch.randn(x0.shape, generator=g)
    L_0 = -discretized_gaussian_log_likelihood(x0, x1 / alpha[1].sqrt(), beta[1].log().item()).sum()
    torch.testing.assert_close(bpd.double(), ((total + L_0) / (64 * math.log(2))).double().view(1), rtol=1e-6, atol=0)
    assert ((x1 / alpha[1].sqrt()).abs() > 1 + 0.5 * beta[1].sqrt()).sum() > 8  # the clip would move these means
