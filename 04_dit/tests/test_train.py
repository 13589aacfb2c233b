import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sample
import torch
import torch.nn.functional as F
import train

from shared import UserError
from shared.checkpoint import save_checkpoint
from shared.cli import config_from_preset, parse_config
from shared.data import load_images, to_symmetric
from shared.testing import (
    checkpoints_equal,
    missing_readme_files,
    missing_readme_references,
    readme_commands_that_fail,
    run_interrupted_and_straight,
    run_script,
)

STAGE_DIR = Path(__file__).parents[1]


def smoke_cfg(**overrides):
    return config_from_preset(train.TrainConfig, train.PRESETS, "smoke", device="cpu", **overrides)


@pytest.mark.parametrize("flags", [{}, dict(objective="ddpm", logit_normal=False, cos_weight=0.0, swiglu=False,
                                            rmsnorm=False, rope=False, qk_norm=False, beta2=0.999)])
def test_exact_resume(tmp_path, flags):
    cfg = smoke_cfg(steps=8, ckpt_every=0, sample_steps=2, **flags)
    straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at=4, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 8
    assert checkpoints_equal(straight, resumed, keys=("model", "ema"))
    assert not torch.equal(straight["model"]["x_embedder.weight"], straight["ema"]["x_embedder.weight"])


def test_ema_update_moves_a_fraction_one_minus_decay_toward_the_model():
    """e <- decay e + (1 - decay) p, on every parameter: from e = 0 toward p = 1 with decay 0.9, one update gives
    0.1 and a second 0.19 (1 - 0.9^2); the model is left as it was. A swapped weight (e <- 0.1 e + 0.9 p) gives 0.9."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.zero_()
            p.fill_(1.0)
    for expected in (0.1, 0.19, 0.271):
        train.update_ema(ema, model, 0.9)
        for e, p in zip(ema.parameters(), model.parameters()):
            torch.testing.assert_close(e, torch.full_like(e, expected), rtol=0, atol=1e-6)
            assert torch.equal(p, torch.ones_like(p))
    train.update_ema(ema, model, 1.0)  # decay 1 (allowed by --ema-decay): the EMA is frozen
    train.update_ema(ema, model, 0.0)  # decay 0: the EMA is a copy of the model
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_learning_rate_warms_up_holds_then_decays_linearly_over_the_last_decay_steps():
    """--warmup 2, --decay-steps 4 of --steps 10: 1/2, then the peak, then 4 steps down to 1/4 of it (the step after
    the last would be 0); without --decay-steps the rate stays at the peak to the end."""
    cfg = dataclasses.replace(train.TrainConfig(), lr=0.4, warmup=2, steps=10, decay_steps=4)
    assert [train.learning_rate(cfg, s) for s in range(1, 11)] == pytest.approx(
        [0.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.3, 0.2, 0.1], abs=1e-12)
    cfg = dataclasses.replace(cfg, decay_steps=0)
    assert [train.learning_rate(cfg, s) for s in range(1, 11)] == pytest.approx([0.2] + [0.4] * 9, abs=1e-12)
    with pytest.raises(UserError, match=r"--decay-steps \(11\) must not exceed --steps \(10\)"):
        train.main(dataclasses.replace(cfg, decay_steps=11))  # would start the run below the peak rate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    import os

    os.environ["SCRATCHGEN_EXPERIMENTS"] = str(tmp)
    train.main(smoke_cfg(run_name="fixture", steps=4, sample_steps=2))
    return tmp / "04_dit" / "fixture" / "ckpt.pt"


def test_sample_writes_valid_npz_with_labels(trained, tmp_path):
    out = tmp_path / "s.npz"
    sample.main(["--ckpt", str(trained), "--num-samples", "20", "--steps", "2", "--out", str(out), "--device", "cpu"])
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (20, 1, 28, 28)
    assert data["labels"].tolist() == [i * 10 // 20 for i in range(20)]
    assert out.with_suffix(".png").is_file()
    sample.main(["--ckpt", str(trained), "--num-samples", "3", "--steps", "2", "--class-label", "7", "--out",
                 str(out), "--sampler", "euler", "--cfg-scale", "3", "--device", "cpu"])
    assert np.load(out)["labels"].tolist() == [7, 7, 7]


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_training_step_order_warmup_clip_ema_and_the_loss_it_calls(tmp_path, monkeypatch, objective):
    """The loop around the tested pieces, step by step: lr = lr min(1, step / warmup) min(1, (steps + 1 - step) /
    decay_steps), the gradient clipped to --grad-clip, then the optimizer step, then the EMA at min(decay, (1 + step)
    / (10 + step)); the loss of the chosen objective with its flags; and the run returns the EMA."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    events = []
    real_step, real_clip, real_ema = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_, train.update_ema
    real_rf, real_ddpm = train.rf_loss, train.ddpm_loss

    def opt_step(self, *args, **kwargs):
        events.append(("step", self.param_groups[0]["lr"]))
        return real_step(self, *args, **kwargs)

    def clip(params, max_norm, *args, **kwargs):
        events.append(("clip", max_norm))
        return real_clip(params, max_norm, *args, **kwargs)

    def ema(ema_model, model, decay):
        events.append(("ema", decay))
        return real_ema(ema_model, model, decay)

    def rf(net, x0, y, logit_normal=True, cos_weight=0.0):
        events.append(("rf", logit_normal, cos_weight))
        return real_rf(net, x0, y, logit_normal, cos_weight)

    def ddpm(net, x0, y, alpha_bar):
        events.append(("ddpm",))
        return real_ddpm(net, x0, y, alpha_bar)

    monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(train, "update_ema", ema)
    monkeypatch.setattr(train, "rf_loss", rf)
    monkeypatch.setattr(train, "ddpm_loss", ddpm)
    cfg = smoke_cfg(run_name=objective, steps=6, warmup=4, decay_steps=3, grad_clip=0.5, ema_decay=0.3, lr=1e-3,
                    sample_every=0, ckpt_every=0, objective=objective, logit_normal=False, cos_weight=0.0)
    returned = train.main(cfg)
    loss = ("rf", False, 0.0) if objective == "flow" else ("ddpm",)
    lr = [1e-3 * min(1.0, s / 4) * min(1.0, (7 - s) / 3) for s in range(1, 7)]
    want = [e for s in range(1, 7) for e in (loss, ("clip", 0.5), ("step", lr[s - 1]),
                                              ("ema", min(0.3, (1 + s) / (10 + s))))]
    assert events == want
    ckpt = torch.load(tmp_path / "04_dit" / objective / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in returned.state_dict().items())
    assert tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, cfg.beta2)


def test_sample_passes_its_flags_to_the_sampler_and_loads_the_ema(trained, tmp_path, monkeypatch):
    """What sample.py hands the sampler (the spy returns the noise): the EMA weights, --sampler, --steps,
    --cfg-scale, --cfg-interval, the labels it writes to the .npz, and noise fixed by --seed."""
    ckpt = torch.load(trained, weights_only=True)
    model = sample.load_model(trained, "cpu")[0]
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"])  # so this tells them apart
    calls = []

    def spy(model, noise, y, objective, sampler, steps, cfg_scale, null_class, interval, generator=None, clip=True):
        calls.append(dict(noise=noise, y=y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, interval=interval))
        return noise.clamp(-1, 1)

    monkeypatch.setattr(sample, "sample", spy)
    flags = ["--ckpt", str(trained), "--num-samples", "20", "--batch-size", "7", "--steps", "3", "--cfg-scale",
             "3.5", "--sampler", "euler", "--cfg-interval", "0.2", "0.8", "--device", "cpu"]
    sample.main([*flags, "--out", str(tmp_path / "a.npz")])
    assert [len(c["y"]) for c in calls] == [7, 7, 6]
    assert all((c["sampler"], c["steps"], c["cfg_scale"], c["interval"]) == ("euler", 3, 3.5, (0.2, 0.8))
               for c in calls)
    assert torch.cat([c["y"] for c in calls]).tolist() == np.load(tmp_path / "a.npz")["labels"].tolist()
    first = torch.cat([c["noise"] for c in calls])
    calls.clear()
    sample.main([*flags, "--out", str(tmp_path / "b.npz"), "--seed", "1"])
    assert not torch.equal(torch.cat([c["noise"] for c in calls]), first)


def test_cli_errors_exit_2_with_one_line(trained, tmp_path):
    foreign = save_checkpoint({"stage": "01_vae", "config": {}}, tmp_path / "vae.pt")
    for script, *args in [(STAGE_DIR / "train.py", "--batch-size", "-3"),
                          (STAGE_DIR / "sample.py", "--ckpt", str(foreign))]:
        proc = run_script(script, *args, experiments=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    for args in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(trained), "--sampler", "ddim"],
                 ["--ckpt", str(trained), "--class-label", "12"], ["--ckpt", str(trained), "--steps", "0"],
                 ["--ckpt", str(trained), "--cfg-interval", "0.7", "0.3"],
                 ["--ckpt", str(trained), "--cfg-interval", "0.5", "0.5"],
                 ["--ckpt", str(trained), "--cfg-interval", "-0.1", "1"],
                 ["--ckpt", str(trained), "--cfg-interval", "0", "1.5"],
                 ["--ckpt", str(trained), "--cfg-scale", "nan"]):
        with pytest.raises(UserError):  # run_entry turns these into one line and exit code 2
            sample.main(args + ["--device", "cpu"])
    for args in (["--beta2", "1"], ["--beta2", "1.5"], ["--class-dropout", "3"], ["--ema-decay", "5"],
                 ["--ema-decay", "-0.1"], ["--cos-weight", "inf"]):
        with pytest.raises(UserError):
            parse_config(train.TrainConfig, train.PRESETS, train.STAGE, args)
    assert parse_config(train.TrainConfig, train.PRESETS, train.STAGE, ["--beta2", "0.999", "--ema-decay", "1",
                                                                        "--class-dropout", "1"]).beta2 == 0.999


def test_figures_refuses_bad_flags_with_one_line(capsys):
    import figures

    for args in (["--steps", "0"], ["--scales", "2", "-1"], ["--scales", "nan"]):
        with pytest.raises(UserError):
            figures.main(args)
    with pytest.raises(SystemExit) as exit_:
        figures.main(["--steps", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_figures_noises_as_the_model_was_trained():
    import figures
    from diffusion import linear_alpha_bar

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 28, 28, generator=gen), torch.randn(2, 1, 28, 28, generator=gen)
    # float32 against float64 coefficients: an absolute tolerance, or entries near zero fail on rounding alone
    x_t, t = figures.noised(x0, eps, 0.3, "flow")
    torch.testing.assert_close(x_t, 0.7 * x0 + 0.3 * eps, rtol=1e-5, atol=1e-6)  # Eq. (7)
    assert t.tolist() == [300.0, 300.0]
    ab = float(linear_alpha_bar()[300])
    x_t, t = figures.noised(x0, eps, 0.3, "ddpm")
    torch.testing.assert_close(x_t, ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps, rtol=1e-5, atol=1e-6)  # Eq. (2)
    assert t.tolist() == [300.0, 300.0]


def test_defaults_equal_default_preset():
    assert dataclasses.asdict(train.TrainConfig()) == dataclasses.asdict(
        config_from_preset(train.TrainConfig, train.PRESETS, "default"))


@pytest.mark.parametrize("name", ["mnist.pt", "full.pt"])
def test_pretrained_weights_load_and_are_small(name):
    """pretrained/mnist.pt (the default preset) and full.pt (the full preset): at most 8 MB, load with
    weights_only=True into today's DiT through sample.py's loader (strict load_state_dict), and hold trained
    weights: they denoise real test digits at half noise."""
    path = STAGE_DIR / "pretrained" / name
    assert path.stat().st_size <= 8 * 2**20
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["stage"] == train.STAGE and raw["step"] == raw["config"]["steps"]
    model, cfg, ae = sample.load_model(path, "cpu")
    assert ae is None and cfg == raw["config"]
    assert sorted(model.state_dict()) == sorted(raw["model"])
    images, labels = load_images("mnist", train=False)
    x0, y = to_symmetric(images[:64]), labels[:64]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert cfg["objective"] == "flow"  # the default preset's recipe
    with torch.no_grad():
        x_t = 0.5 * x0 + 0.5 * eps  # Eq. (7) at t = 0.5
        x0_hat = x_t - 0.5 * model(x_t, torch.full((64,), 500.0), y)  # Eq. (8): x_0 = x_t - t v
    # an untrained DiT predicts v = 0 (zero-initialised output layer), which leaves x0_hat = x_t
    err, err_untrained = F.mse_loss(x0_hat, x0).item(), F.mse_loss(x_t, x0).item()
    assert err < 0.3 * err_untrained, (err, err_untrained)  # measured: 0.036 (full.pt: 0.029) against 0.48


def test_readme_references_exist():
    assert missing_readme_references(STAGE_DIR) == []
    assert missing_readme_files(STAGE_DIR) == []  # pictures, links and the asset files the numbers cite


def test_readme_commands_parse():  # every command a reader may copy still takes its flags
    assert readme_commands_that_fail(STAGE_DIR) == []


# --------------------------------------------------------------------------------------------------------
# Wiring: what the loss, the samplers and the decoder are handed (each test kills a mutant that ran clean before)
# --------------------------------------------------------------------------------------------------------

def rows_found_in(x: torch.Tensor, pool: torch.Tensor, atol: float = 1e-5) -> bool:
    """Whether every sample of x (B, ...) equals, up to atol, some sample of pool (N, ...)."""
    gap = (x.flatten(1)[:, None] - pool.flatten(1)[None]).abs().amax(-1)  # (B, N)
    return bool((gap.min(1).values <= atol).all())


@pytest.mark.parametrize("space", ["pixels", "latents"])
def test_the_loss_sees_symmetric_pixels_or_the_normalised_latents_as_they_are(tmp_path, monkeypatch, space):
    """The batches rf_loss trains on: dataset images mapped to [-1, 1] by to_symmetric, or with --latents the
    autoencoder's normalised posterior means (Eq. 22) unchanged (not mapped again as if they were pixels)."""
    from vavae import AE_STAGE, AEConfig, Autoencoder, prepare_latents

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    images, _ = load_images("synthetic")
    flags, pool = {}, to_symmetric(images)
    if space == "latents":
        torch.manual_seed(0)
        path = save_checkpoint({"stage": AE_STAGE, "config": {}, "model": Autoencoder(AEConfig(width=4)).state_dict()},
                               tmp_path / "ae.pt")
        flags, pool = dict(latents=str(path)), prepare_latents(str(path), images)[1]
    seen, real = [], train.rf_loss

    def spy(net, x0, y, logit_normal=True, cos_weight=0.0):
        seen.append(x0.detach().clone())
        return real(net, x0, y, logit_normal, cos_weight)

    monkeypatch.setattr(train, "rf_loss", spy)
    train.main(smoke_cfg(run_name=space, steps=2, sample_steps=1, **flags))
    assert len(seen) == 2 and seen[0].shape == (16, *pool.shape[1:])
    assert all(rows_found_in(x0, pool) for x0 in seen)


class PointOracle(torch.nn.Module):
    """The exact eps-prediction (DDPM chain, Eq. 2) when the data of class y is the single point x* = 1.5 + 0.1 y
    (every entry; the null class 10 gives 2.5): outside [-1, 1], so a sample lands there only if x_0 is unclipped."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.cfg = SimpleNamespace(in_channels=channels, image_size=size, num_classes=10)

    def forward(self, x, t, y):
        from diffusion import linear_alpha_bar

        ab = linear_alpha_bar()[t.long()].float()[:, None, None, None]
        x_star = (1.5 + 0.1 * y.float())[:, None, None, None]
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()


def test_sample_grid_clips_pixels_but_not_latents(monkeypatch):
    """sample_grid clips x_0 to [-1, 1] for pixels only: the DDIM latents it decodes land on the data point
    x* = 1.5 + 0.1 y outside that range; a pixel-space grid of the same model stops at 1."""
    cfg = smoke_cfg(objective="ddpm", cfg_scale=1.0, sample_steps=10)
    decoded, sentinel = [], object()
    monkeypatch.setattr(train, "decode_latents", lambda ae, z: decoded.append((ae, z)) or z[:, :1].repeat(1, 1, 4, 4))
    train.sample_grid(PointOracle(4, 7), cfg, "cpu", per_class=2, ae=sentinel)
    (ae, z), = decoded
    x_star = (1.5 + 0.1 * torch.arange(10).repeat_interleave(2).float())[:, None, None, None].expand(-1, 4, 7, 7)
    assert ae is sentinel and torch.allclose(z, x_star, atol=1e-3)
    pixels = train.sample_grid(PointOracle(1, 28), cfg, "cpu", per_class=2)
    assert pixels.shape == (20, 1, 28, 28) and torch.allclose(pixels, torch.ones_like(pixels), atol=1e-5)


@pytest.mark.parametrize("objective, sampler", [("flow", "heun"), ("ddpm", "ddim")])
def test_sample_grid_draws_with_the_deterministic_sampler_and_the_configured_steps_and_guidance(monkeypatch, objective,
                                                                                              sampler):
    """The grids written while training: the objective's deterministic sampler (Heun, resp. DDIM), --sample-steps,
    --cfg-scale and the null class, one row of per_class samples per digit."""
    calls = []

    def spy(model, noise, y, objective, sampler, steps, cfg_scale, null_class, generator=None, clip=True):
        calls.append((objective, sampler, steps, cfg_scale, null_class, clip, y.tolist()))
        return noise.clamp(-1, 1)

    monkeypatch.setattr(train, "sample", spy)
    cfg = smoke_cfg(objective=objective, sample_steps=3, cfg_scale=2.5)
    out = train.sample_grid(PointOracle(1, 28), cfg, "cpu", per_class=2)
    assert out.shape == (20, 1, 28, 28)
    assert calls == [(objective, sampler, 3, 2.5, 10, True, [d for d in range(10) for _ in range(2)])]


def test_sample_decodes_each_batch_of_latents_unclipped_into_its_own_images(tmp_path, monkeypatch):
    """sample.py on a latent DiT: each batch's latents, sampled without clipping (they land on x* = 1.5 + 0.1 y),
    go through the checkpoint's autoencoder, and every sample's image in the .npz is the decoding of its own latent."""
    from shared.images import to_uint8

    sentinel, shapes = object(), []
    monkeypatch.setattr(sample, "load_model", lambda path, device: (PointOracle(4, 7), {"objective": "ddpm"}, sentinel))

    def decode(ae, z):  # a stand-in decoder that shows which latent it was given: image value = mean(z) - 2
        assert ae is sentinel
        shapes.append(tuple(z.shape))
        return (z.mean(dim=(1, 2, 3)) - 2.0)[:, None, None, None].expand(-1, 1, 28, 28)

    monkeypatch.setattr(sample, "decode_latents", decode)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "s.npz"
    ckpt.touch()
    sample.main(["--ckpt", str(ckpt), "--num-samples", "20", "--batch-size", "7", "--steps", "10", "--cfg-scale", "1",
                 "--out", str(out), "--device", "cpu"])
    assert shapes == [(7, 4, 7, 7), (7, 4, 7, 7), (6, 4, 7, 7)]
    data = np.load(out)
    labels = torch.from_numpy(data["labels"])
    want = to_uint8((0.1 * labels.float() - 0.5)[:, None, None, None].expand(-1, 1, 28, 28))
    assert (torch.from_numpy(data["images"]).int() - want.int()).abs().max() <= 1


def grid_tiles(path: Path, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols, 28, 28) uint8 tiles of a save_grid PNG (28x28 images, padding 2), after checking its size."""
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("L")))
    assert grid.shape == (30 * rows + 2, 30 * cols + 2), grid.shape
    return grid[2:, 2:].unflatten(0, (rows, 30)).unflatten(2, (cols, 30))[:, :28, :, :28].permute(0, 2, 1, 3)


def test_figures_draws_the_sweep_trajectory_and_attention_from_one_noise(trained, tmp_path):
    """figures.py's three pictures: the sweep has one row per --scales value (which the sampler is given), the
    trajectory starts at the --seed noise and ends at the scale-2 sample, and the attention figure puts each of the
    first four samples beside its heads' maps, each scaled to a maximum of 1."""
    import figures

    from shared.images import to_uint8

    figures.main(["--ckpt", str(trained), "--steps", "2", "--scales", "0", "2", "--out", str(tmp_path), "--seed", "3"])
    sweep = grid_tiles(tmp_path / "cfg_sweep.png", 2, 10)
    path = grid_tiles(tmp_path / "trajectory.png", 10, 9)
    heads = sample.load_model(trained, "cpu")[0].cfg.num_heads
    attention = grid_tiles(tmp_path / "attention.png", 4, 1 + heads)
    noise = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(path[:, 0], to_uint8(noise)[:, 0])
    assert torch.equal(path[:, -1], sweep[1]) and not torch.equal(sweep[0], sweep[1])
    assert torch.equal(attention[:, 0], path[:4, -1])
    assert (attention[:, 1:].amax(dim=(-2, -1)) == 255).all()


def test_figures_vavae_puts_test_digits_above_each_autoencoders_mean_reconstructions(tmp_path):
    """figures.py --vavae: row 1 the first 12 test digits, then one row per checkpoint of reconstruct()'s
    posterior-mean reconstructions by that autoencoder, in the order given."""
    import figures
    from train_vavae import reconstruct
    from vavae import AE_STAGE, AEConfig, Autoencoder

    aes, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        aes.append(Autoencoder(AEConfig(width=4)).eval())
        paths.append(str(save_checkpoint({"stage": AE_STAGE, "config": {}, "model": aes[-1].state_dict()},
                                         tmp_path / f"ae{seed}.pt")))
    figures.main(["--vavae", *paths, "--out", str(tmp_path)])
    tiles = grid_tiles(tmp_path / "vavae_recon.png", 3, 12)
    digits = load_images("mnist", train=False)[0][:12]
    assert torch.equal(tiles[0], digits[:, 0])
    for row, ae in zip(tiles[1:], aes):
        assert torch.equal(row, reconstruct(ae, digits)[:, 0])
