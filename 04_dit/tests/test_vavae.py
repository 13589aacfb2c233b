import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sample
import torch
import torch.nn.functional as F
import train
import train_vavae
from diffusion import rf_loss
from model import DiT, dit_config
from vavae import (
    AE_STAGE,
    AEConfig,
    Autoencoder,
    adaptive_weight,
    ae_losses,
    decode_latents,
    encode_images,
    foundation_features,
    kl_divergence,
    marginal_cosine_loss,
    marginal_distance_matrix_loss,
    normalize,
    prepare_latents,
    reparameterize,
    vf_loss,
)

from shared import REPO_ROOT, UserError
from shared.checkpoint import save_checkpoint
from shared.classifier import load_classifier
from shared.cli import config_from_preset, parse_config
from shared.data import load_images
from shared.testing import autocast_requests, run_interrupted_and_straight, same_training


def test_autoencoder_shapes_28_to_7x7x4_and_back():
    ae = Autoencoder(AEConfig(width=4))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    out = ae(x)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 4, 7, 7)
    assert out["x_hat"].shape == (3, 1, 28, 28)
    assert not torch.equal(out["z"], out["mu"])  # a sample, not the mean
    assert ae.proj(out["z"]).shape == (3, 64, 7, 7)
    clf = load_classifier()
    assert foundation_features(clf, x).shape == (3, 64, 7, 7)


def test_foundation_features_read_the_image_in_the_classifiers_range():
    """F of Eq. (17): the classifier's third block on x in [0, 1], though the autoencoder's x is in [-1, 1]."""
    clf = load_classifier()
    u = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(foundation_features(clf, 2 * u - 1), clf.body[:3](u), atol=1e-6)


def test_reparameterize_draws_from_n_mu_sigma_squared_with_sigma_from_logvar():
    """Eq. (14): z = mu + exp(logvar / 2) eps. With mu = 0.3 and logvar = log 0.25 (sigma = 0.5), 200,000 draws
    have mean 0.3 and std 0.5 (standard errors ~0.001 and ~0.0008); the variance used as the std (0.25) or the
    inverse std (2) fail. The draw is differentiable: dz/dmu = 1, dz/dlogvar = sigma eps / 2 = (z - mu) / 2."""
    torch.manual_seed(0)
    mu = torch.full((200_000,), 0.3, requires_grad=True)
    logvar = torch.full((200_000,), math.log(0.25), requires_grad=True)
    z = reparameterize(mu, logvar)
    assert abs(z.mean().item() - 0.3) < 0.01, z.mean().item()
    assert abs(z.std().item() - 0.5) < 0.01, z.std().item()
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, (z.detach() - 0.3) / 2, rtol=1e-5, atol=1e-6)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.7, -1.2, 0.0]]), torch.tensor([[-1.0, 0.5, 0.0]])
    sigma = (0.5 * logvar).exp()
    z = mu + sigma * torch.randn(400_000, 3)  # samples of q
    log_q = torch.distributions.Normal(mu, sigma).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    mc = (log_q - log_p).mean()
    assert math.isclose(kl_divergence(mu, logvar).item(), mc.item(), abs_tol=0.01)
    assert kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0  # q = p


def test_ae_loss_is_per_pixel_mse_plus_beta_times_kl_per_image_over_784():
    """Eq. (16): L_rec the squared error per pixel; L_KL the closed-form KL (15) summed over the 7x7x4 latent of
    each image, averaged over images and divided by P = 784 pixels (not by the 196 latent elements)."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    mu, logvar = torch.randn(3, 4, 7, 7), 0.8 * torch.randn(3, 4, 7, 7) - 0.5
    out = {"x_hat": x + 0.2 * torch.randn_like(x), "mu": mu, "logvar": logvar, "z": mu}
    losses = ae_losses(out, x, beta=0.25)
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    kl_per_image = [torch.distributions.kl_divergence(q, p)[i].sum().item() for i in range(3)]  # over 196 elements
    kl = sum(kl_per_image) / 3 / 784
    rec = sum(((a - b) ** 2).sum().item() for a, b in zip(out["x_hat"], x)) / (3 * 784)
    assert math.isclose(losses["kl"].item(), kl, rel_tol=1e-5)
    assert math.isclose(losses["rec"].item(), rec, rel_tol=1e-5)
    assert math.isclose(losses["ae"].item(), rec + 0.25 * kl, rel_tol=1e-5)


def test_marginal_cosine_loss_is_zero_inside_the_margin_and_positive_outside():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 3, 3)
    close = 2.0 * f + 0.3 * torch.randn_like(f)  # cos > 1 - m1 everywhere (and a different scale)
    cos = F.cosine_similarity(close, f, dim=1)
    m1 = 0.5
    assert (cos > 1 - m1).all()
    assert marginal_cosine_loss(close, f, m1).item() == 0.0
    flipped = close.clone()
    flipped[0, :, 1, 1] = -f[0, :, 1, 1]  # one opposite pair out of 18: cos = -1
    expected = (1 - m1 + 1) / 18
    assert math.isclose(marginal_cosine_loss(flipped, f, m1).item(), expected, rel_tol=1e-5)


def test_distance_matrix_loss_zero_for_same_structure_and_matches_brute_force():
    torch.manual_seed(0)
    f = torch.randn(1, 6, 2, 3)
    scale = torch.rand(1, 1, 2, 3) + 0.5
    assert marginal_distance_matrix_loss(f * scale, f, 0.0).item() < 1e-6  # same cosines at every pair
    z = torch.randn(1, 6, 2, 3)
    zf, ff = z.flatten(2)[0].T, f.flatten(2)[0].T  # (N, C) rows = positions
    n, m2 = zf.shape[0], 0.1
    brute = sum(max(abs(F.cosine_similarity(zf[i], zf[j], 0) - F.cosine_similarity(ff[i], ff[j], 0)).item() - m2, 0)
                for i in range(n) for j in range(n)) / n ** 2
    assert brute > 0
    assert math.isclose(marginal_distance_matrix_loss(z, f, m2).item(), brute, rel_tol=1e-4)
    assert marginal_distance_matrix_loss(z, f, 2.0).item() == 0.0  # |difference| <= 2 < any margin above it


def tiny_ae_batch():
    """A width-4 autoencoder, four random images, their foundation features, its output and L_rec."""
    torch.manual_seed(0)
    ae = Autoencoder(AEConfig(width=4))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    out = ae(x)
    return ae, foundation_features(load_classifier(), x), out, ae_losses(out, x, 1e-3)["rec"]


def test_adaptive_weight_balances_the_gradients_at_the_last_encoder_layer():
    ae, f, out, rec = tiny_ae_batch()
    vf = vf_loss(ae, out["z"], f, rec, m1=0.0, m2=0.0, w_hyper=1.0)
    w, W = vf["w_adaptive"], ae.conv_out.weight
    g_rec = torch.autograd.grad(rec, W, retain_graph=True)[0].norm()
    g_vf = torch.autograd.grad(vf["vf"], W, retain_graph=True)[0].norm()  # grad of w (mcos + mdms), w constant
    assert w.item() > 0 and not w.requires_grad
    assert math.isclose(g_vf.item(), g_rec.item(), rel_tol=1e-3)  # the weighted VF gradient is as large as L_rec's
    w10 = adaptive_weight(rec, 10 * (vf["mcos"] + vf["mdms"]), W)
    assert math.isclose(w10.item(), w.item() / 10, rel_tol=1e-3)


def test_vf_loss_is_w_hyper_times_w_adaptive_times_both_terms():
    """Eq. (21) at w_hyper = 0.5 and the README's margins (m1 = 0.5, m2 = 0.25): L_vf = w_hyper w (L_mcos + L_mdms),
    with Z' = W Z written out (Eq. 17), both terms recomputed from it, and w (Eq. 20) the ratio of the gradient norms
    of L_rec and L_mcos + L_mdms at the encoder's output conv. The weighted VF gradient there is then w_hyper times
    the reconstruction gradient's norm, and halving w_hyper halves L_vf (w_hyper = 1 alone cannot see it dropped)."""
    ae, f, out, rec = tiny_ae_batch()
    m1, m2, w_hyper = 0.5, 0.25, 0.5
    vf = vf_loss(ae, out["z"], f, rec, m1=m1, m2=m2, w_hyper=w_hyper)
    z_proj = torch.einsum("oc,bchw->bohw", ae.proj.weight[:, :, 0, 0], out["z"])  # Eq. (17), per latent pixel
    mcos, mdms = marginal_cosine_loss(z_proj, f, m1), marginal_distance_matrix_loss(z_proj, f, m2)
    assert mcos.item() > 0.01 and mdms.item() > 0.01  # both terms outside their margins, so both count
    assert math.isclose(vf["mcos"].item(), mcos.item(), rel_tol=1e-5)
    assert math.isclose(vf["mdms"].item(), mdms.item(), rel_tol=1e-5)
    W = ae.conv_out.weight  # the encoder's last layer
    g_rec = torch.autograd.grad(rec, W, retain_graph=True)[0].norm()
    g_sum = torch.autograd.grad(mcos + mdms, W, retain_graph=True)[0].norm()
    w = (g_rec / g_sum).item()  # Eq. (20)
    assert math.isclose(vf["w_adaptive"].item(), w, rel_tol=1e-4), (vf["w_adaptive"].item(), w)
    assert math.isclose(vf["vf"].item(), w_hyper * w * (mcos + mdms).item(), rel_tol=1e-4)  # Eq. (21)
    g_vf = torch.autograd.grad(vf["vf"], W, retain_graph=True)[0].norm()
    assert math.isclose(g_vf.item(), w_hyper * g_rec.item(), rel_tol=1e-3), (g_vf.item(), g_rec.item())
    full = vf_loss(ae, out["z"], f, rec, m1=m1, m2=m2, w_hyper=1.0)["vf"]
    assert math.isclose(vf["vf"].item(), 0.5 * full.item(), rel_tol=1e-5)
    first = [torch.autograd.grad(loss, ae.encoder[0].weight, retain_graph=True)[0].norm()
             for loss in (rec, mcos + mdms)]
    assert (first[0] / first[1]).item() > 2 * w  # the layer matters: at the first conv the ratio is 4.4 times w


def test_latents_normalised_and_decoded_back(tmp_path):
    torch.manual_seed(0)
    ae = Autoencoder(AEConfig(width=4))
    images, _ = load_images("synthetic")
    path = save_checkpoint({"stage": AE_STAGE, "config": {}, "model": ae.state_dict()}, tmp_path / "ae.pt")
    frozen, latents = prepare_latents(str(path), images)
    assert latents.shape == (len(images), 4, 7, 7)
    assert torch.allclose(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)  # Eq. (22): ~N(0, 1) per channel
    assert torch.allclose(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert not torch.allclose(frozen.latent_std, torch.ones(4))  # the scale was measured and is kept
    mu = encode_images(frozen, images[:8])
    assert torch.allclose(normalize(frozen, mu), latents[:8], atol=1e-6)
    assert torch.allclose(decode_latents(frozen, latents[:8]), frozen.decode(mu).clamp(-1, 1), atol=1e-5)
    with pytest.raises(UserError):  # a DiT checkpoint is not an autoencoder
        prepare_latents(str(save_checkpoint({"stage": "04_dit", "config": {}}, tmp_path / "dit.pt")), images)


def ae_cfg(**overrides):
    return config_from_preset(train_vavae.TrainConfig, train_vavae.PRESETS, "smoke", device="cpu", **overrides)


def test_exact_resume_of_the_autoencoder_trainer(tmp_path):
    import shared.classifier

    def as_a_new_process(cfg):  # the classifier is built (drawing from the RNG) anew, not taken from the cache
        shared.classifier._load.cache_clear()
        return train_vavae.main(cfg)

    cfg = ae_cfg(steps=6, ckpt_every=0, align=True)
    straight, resumed = run_interrupted_and_straight(as_a_new_process, cfg, stop_at=3, experiments=tmp_path)
    assert straight["stage"] == AE_STAGE and straight["step"] == resumed["step"] == 6
    assert same_training(straight, resumed) == []  # weights, optimizer, RNG and the logging window
    assert straight["config"]["align"] and straight["seed"] == 0


def test_autoencoder_step_runs_under_the_amp_flag(tmp_path, monkeypatch):
    """--amp is bf16 autocast on CUDA, a no-op here: a spy checks that every training step asks for it."""
    asked = autocast_requests(monkeypatch, train_vavae)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train_vavae.main(ae_cfg(steps=3, amp=True))
    assert asked == [True] * 3


def test_alignment_loss_falls_while_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train_vavae.main(ae_cfg(steps=60, width=8, lr=3e-3, run_name="a", log_every=10))
    rows = [r for r in map(__import__("json").loads, (tmp_path / AE_STAGE / "a" / "metrics.jsonl").read_text()
                                                           .splitlines()) if "mcos" in r]
    assert rows[-1]["mcos"] < 0.8 * rows[0]["mcos"], rows
    assert rows[-1]["rec"] < rows[0]["rec"]


def test_dit_learns_on_latents():
    torch.manual_seed(0)
    latents = torch.randn(16, 4, 7, 7) * 0.5 + torch.linspace(-1, 1, 4)[None, :, None, None]
    y = torch.arange(16) % 10
    model = DiT(dit_config("micro", image_size=7, in_channels=4, patch_size=1, swiglu=True, rope=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = rf_loss(model, latents, y, True, 1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["mse"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_latent_dit_end_to_end_train_and_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train_vavae.main(ae_cfg(steps=3, run_name="ae", align=False))
    ae_ckpt = tmp_path / AE_STAGE / "ae" / "ckpt.pt"
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", device="cpu", steps=4, sample_steps=2,
                             run_name="lat", latents=str(ae_ckpt))
    train.main(cfg)
    ckpt = torch.load(tmp_path / "04_dit" / "lat" / "ckpt.pt", weights_only=True)
    assert ckpt["ema"]["x_embedder.weight"].shape[1] == 4  # patch 1 x 1 x 4 channels
    assert "latent_std" in ckpt["autoencoder"]
    out = tmp_path / "s.npz"
    sample.main(["--ckpt", str(tmp_path / "04_dit" / "lat" / "ckpt.pt"), "--num-samples", "10", "--steps", "2",
                 "--out", str(out), "--device", "cpu"])
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (10, 1, 28, 28)
    with pytest.raises(UserError):  # --latents must name an autoencoder checkpoint
        train.main(config_from_preset(train.TrainConfig, train.PRESETS, "smoke", device="cpu", steps=2,
                                      run_name="bad", latents=str(tmp_path / "04_dit" / "lat" / "ckpt.pt")))


def test_ddim_leaves_latents_unclipped():
    """Latents are not confined to [-1, 1]: with clip=False the DDIM sampler reaches a point outside it."""
    from diffusion import ddim_sample, linear_alpha_bar

    alpha_bar = linear_alpha_bar()
    x_star = torch.full((1, 4, 7, 7), 2.5)

    def eps_oracle(x, t, y):  # the exact eps-prediction for data = the single point x_star
        ab = alpha_bar[t.long()].float()[:, None, None, None]
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()

    noise, y = torch.randn(2, 4, 7, 7), torch.zeros(2, dtype=torch.long)
    free = ddim_sample(eps_oracle, noise, y, 10, 1.0, 10, alpha_bar=alpha_bar, clip=False)
    assert torch.allclose(free, x_star.expand(2, -1, -1, -1), atol=1e-3)
    assert ddim_sample(eps_oracle, noise, y, 10, 1.0, 10, alpha_bar=alpha_bar).max() <= 1.0 + 1e-5


def test_vavae_cli_defaults_and_errors(tmp_path):
    import dataclasses

    from shared.testing import run_script

    assert dataclasses.asdict(train_vavae.TrainConfig()) == dataclasses.asdict(
        config_from_preset(train_vavae.TrainConfig, train_vavae.PRESETS, "default"))
    proc = run_script(Path(train_vavae.__file__), "--width", "-2", experiments=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for args in (["--m1", "2.5"], ["--m2", "3"], ["--beta", "nan"]):
        with pytest.raises(UserError):
            parse_config(train_vavae.TrainConfig, train_vavae.PRESETS, AE_STAGE, args)
    with pytest.raises(UserError, match="--no-align"):  # two gradients of one compiled graph: refused
        train_vavae.main(parse_config(train_vavae.TrainConfig, train_vavae.PRESETS, AE_STAGE, ["--compile"]))


def test_torchrun_without_alignment(tmp_path):
    """Two gloo ranks with --no-align: the VF projection W then gets no gradient, which DDP must be told (it
    used to stop at step 2 waiting for that gradient)."""
    env = {**os.environ, "SCRATCHGEN_EXPERIMENTS": str(tmp_path), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_vavae.py", "--preset", "smoke", "--no-align", "--steps", "4", "--run-name", "ddp",
                           "--device", "cpu"], cwd=Path(train_vavae.__file__).parent, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / AE_STAGE / "ddp" / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and not ckpt["config"]["align"]


def test_encode_images_gives_the_posterior_means_of_the_images_mapped_to_minus_one_one():
    """encode_images: uint8 digits -> x / 127.5 - 1 -> the encoder's mu (the mean, not a sample), batch by batch."""
    torch.manual_seed(0)
    ae = Autoencoder(AEConfig(width=4)).eval()
    images = load_images("synthetic")[0][:5]
    with torch.no_grad():
        want = ae.encode(images.float() / 127.5 - 1)[0]
    torch.testing.assert_close(encode_images(ae, images, batch_size=2), want, rtol=0, atol=1e-6)


def test_reconstruct_decodes_the_posterior_mean_of_the_images_mapped_to_minus_one_one():
    """train_vavae.reconstruct (the test PSNR's and figures.py's): decode(mu(x / 127.5 - 1)) as uint8, batch by batch;
    deterministic, so not decode(z) of a posterior sample z, nor of images read in [0, 1] (both would show here)."""
    from shared.images import to_uint8

    torch.manual_seed(0)
    ae = Autoencoder(AEConfig(width=4)).eval()
    images = load_images("synthetic")[0][:6]
    with torch.no_grad():
        for p in ae.parameters():  # untrained, the decoder's output is ~0 for any input; x3 spreads it over [-1, 1]
            p.mul_(3)
        ae.conv_out.bias[4:] = 0.0  # log sigma^2 ~ 0: samples a full standard deviation from the mean
        want = to_uint8(ae.decode(ae.encode(images.float() / 127.5 - 1)[0]))
        assert want.unique().numel() > 100
        assert not torch.equal(to_uint8(ae(images.float() / 127.5 - 1)["x_hat"]), want)  # a sample
        assert not torch.equal(to_uint8(ae.decode(ae.encode(images.float() / 255)[0])), want)  # pixels in [0, 1]
    assert torch.equal(train_vavae.reconstruct(ae, images, batch_size=4), want)


def test_vavae_trainer_hands_its_flags_and_symmetric_images_to_the_losses(tmp_path, monkeypatch):
    """Each step: L_AE (Eq. 16) of the batch mapped to [-1, 1] with --beta, and the VF loss (Eq. 21) with --m1, --m2
    and --vf-weight (all set off their defaults here), on the sampled latent z of that forward pass."""
    from test_train import rows_found_in

    from shared.data import to_symmetric

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    calls, real_ae, real_vf = [], train_vavae.ae_losses, train_vavae.vf_loss

    def ae_spy(out, x, beta):
        calls.append(("ae", beta, x.detach().clone(), out["z"]))
        return real_ae(out, x, beta)

    def vf_spy(ae, z, f, rec_loss, m1, m2, w_hyper):
        calls.append(("vf", (m1, m2, w_hyper), z))
        return real_vf(ae, z, f, rec_loss, m1, m2, w_hyper)

    monkeypatch.setattr(train_vavae, "ae_losses", ae_spy)
    monkeypatch.setattr(train_vavae, "vf_loss", vf_spy)
    train_vavae.main(ae_cfg(steps=2, beta=0.02, m1=0.3, m2=0.1, vf_weight=0.7))
    assert [c[:2] for c in calls] == [("ae", 0.02), ("vf", (0.3, 0.1, 0.7))] * 2
    pool = to_symmetric(load_images("synthetic")[0])
    assert all(rows_found_in(x, pool) for _, _, x, _ in calls[::2])
    assert all(vf[2] is ae_[3] for ae_, vf in zip(calls[::2], calls[1::2]))


def test_vavae_trainer_reports_mse_and_psnr_of_the_test_split_in_the_unit_range(tmp_path, monkeypatch):
    """test_mse is the mean squared error over the whole test split of pixels in [0, 1], test_psnr 10 log10(1 / mse):
    four white test digits reconstructed at 255, 204, 153, 102 (errors 0, 0.2, 0.4, 0.6) give mse 0.56 / 4 = 0.14
    and 8.539 dB (20 log10: 17.08; peak 255: 56.7; pixels in [-1, 1]: 2.52)."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train_set, white = load_images("synthetic"), torch.full((4, 1, 28, 28), 255, dtype=torch.uint8)
    monkeypatch.setattr(train_vavae, "load_images", lambda name, train=True: train_set if train else
                        (white, torch.arange(4)))
    monkeypatch.setattr(train_vavae, "reconstruct", lambda ae, images: (
        images.int() - 51 * (torch.arange(len(images)) % 4)[:, None, None, None]).clamp(0, 255).to(torch.uint8))
    result = train_vavae.main(ae_cfg(steps=1, align=False))
    assert math.isclose(result["test_mse"], 0.14, rel_tol=1e-5)
    assert math.isclose(result["test_psnr"], 10 * math.log10(1 / 0.14), rel_tol=1e-5)
    assert math.isclose(result["test_psnr"], 8.539, abs_tol=1e-3)
