"""Algorithm 1 in train.py: who each step updates, learning, exact resume, and the command lines."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from gan import GENERATOR_LOSSES, discriminator_loss, generator_loss_nonsaturating
from model import GANConfig, build_gan, discriminator_arch, model_config, sample_noise
from train import (
    PRESETS,
    STAGE,
    TrainConfig,
    discriminator_step,
    gan_config_of,
    generator_step,
    main,
    make_optimizer,
    simultaneous_step,
    update_ema,
)

from shared import UserError
from shared.checkpoint import provenance, save_checkpoint
from shared.cli import config_from_preset, parse_config
from shared.testing import (
    checkpoints_equal,
    missing_readme_files,
    missing_readme_references,
    readme_commands_that_fail,
    run_interrupted_and_straight,
    run_script,
)

STAGE_DIR = __import__("pathlib").Path(__file__).parents[1]


def smoke(**overrides):
    return config_from_preset(TrainConfig, PRESETS, "smoke", device="cpu", **overrides)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHGEN_EXPERIMENTS", str(root))
    main(smoke(run_name="fixture", steps=20))
    yield root / STAGE / "fixture"
    mp.undo()


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_each_step_updates_only_its_player(arch):
    torch.manual_seed(0)
    gan_cfg = model_config(arch, "tiny")
    G, D = build_gan(gan_cfg)
    cfg = TrainConfig(arch=arch, size="tiny", lr=1e-3)
    opt_g, opt_d = make_optimizer(G.parameters(), cfg), make_optimizer(D.parameters(), cfg)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    g0, d0 = snapshot(G), snapshot(D)
    discriminator_step(G, D, opt_d, x, gan_cfg)
    assert not any(changed(g0, G)) and all(changed(d0, D))
    # each step is handed only its own optimizer, so the other player's weights cannot move; that the backward
    # pass does not even reach them (no_grad around G(z), D frozen; README section 7) shows in their .grad
    assert all(p.grad is None for p in G.parameters())
    opt_d.zero_grad(set_to_none=True)
    g0, d0 = snapshot(G), snapshot(D)
    generator_step(G, D, opt_g, 8, gan_cfg, "nonsaturating", "cpu", measure=True)
    assert all(changed(g0, G)) and not any(changed(d0, D))
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())  # D is handed back trainable


def _measure_on_rank(rank: int, store: str, out: str):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    gan_cfg = model_config("mlp", "tiny", d_keep_in=1.0, d_keep=1.0)
    G, D = build_gan(gan_cfg)
    G = torch.nn.parallel.DistributedDataParallel(G)
    torch.manual_seed(1 + rank)  # each rank its own noise, as under torchrun
    stats = generator_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), 8, gan_cfg, "nonsaturating", "cpu",
                           measure=True)
    torch.save({k: float(v) for k, v in stats.items()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_gradient_norms_under_ddp_are_of_the_gradient_averaged_over_ranks(tmp_path):
    """Both logged norms are of the step's real gradient, the mean over ranks -- not one rank's own."""
    torch.multiprocessing.spawn(_measure_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "stats")), nprocs=2)
    logged = [torch.load(tmp_path / f"stats.{r}", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    gan_cfg = model_config("mlp", "tiny", d_keep_in=1.0, d_keep=1.0)
    G, D = build_gan(gan_cfg)
    fakes = []
    for rank in (0, 1):
        torch.manual_seed(1 + rank)
        fakes.append(D(G(sample_noise(8, gan_cfg))))
    for name, loss in GENERATOR_LOSSES.items():
        mean_loss = (loss(fakes[0]) + loss(fakes[1])) / 2  # what DDP's averaged gradient is the gradient of
        grads = torch.autograd.grad(mean_loss, list(G.parameters()), retain_graph=True)
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        for stats in logged:
            assert math.isclose(stats[f"gnorm_{name}"], expected, rel_tol=1e-4), (name, stats, expected)


def test_simultaneous_step_moves_both_players_from_the_same_point():
    """--update simultaneous: D's and G's gradients are both taken at (G, D) before either moves."""
    torch.manual_seed(0)
    gan_cfg = model_config("mlp", "tiny", d_keep_in=1.0, d_keep=1.0)  # no dropout: D is a plain function
    G, D = build_gan(gan_cfg)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    cfg = TrainConfig(arch="mlp", size="tiny", optimizer="sgd", lr=0.1, momentum=0.0)
    opt_g, opt_d = make_optimizer(G.parameters(), cfg), make_optimizer(D.parameters(), cfg)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    simultaneous_step(G, D, opt_g, opt_d, x, gan_cfg, "nonsaturating", scale=0.5)
    torch.manual_seed(1)
    fake_logits = D0(G0(sample_noise(8, gan_cfg)))
    d_grads = torch.autograd.grad(0.5 * discriminator_loss(D0(x), fake_logits), list(D0.parameters()),
                                  retain_graph=True)
    g_grads = torch.autograd.grad(generator_loss_nonsaturating(fake_logits), list(G0.parameters()))
    for module, start, grads in ((D, D0, d_grads), (G, G0, g_grads)):
        for p, p0, g in zip(module.parameters(), start.parameters(), grads):
            assert g.abs().max() > 0
            torch.testing.assert_close(p, p0 - 0.1 * g, rtol=0, atol=1e-6)


def test_simultaneous_step_is_one_pass_of_d_and_generator_step_keeps_d_in_train_mode():
    """One forward of D over [x; G(z)] (one dropout mask for both players' losses); in the alternating G step
    D is frozen but stays in train mode (dropout on), as in the released code."""
    torch.manual_seed(0)
    gan_cfg = model_config("mlp", "tiny")  # dropout on
    G, D = build_gan(gan_cfg)
    cfg = TrainConfig(arch="mlp", size="tiny", optimizer="sgd", lr=0.1, momentum=0.0)
    opt_g, opt_d = make_optimizer(G.parameters(), cfg), make_optimizer(D.parameters(), cfg)
    passes = []
    D.register_forward_hook(lambda module, inputs, output: passes.append((len(inputs[0]), module.training)))
    simultaneous_step(G, D, opt_g, opt_d, torch.rand(8, 1, 28, 28), gan_cfg, "nonsaturating", scale=0.5)
    assert passes == [(16, True)]
    passes.clear()
    generator_step(G, D, opt_g, 8, gan_cfg, "nonsaturating", "cpu")
    assert passes == [(8, True)]


def test_paper_sgd_schedule_starts_at_the_configured_lr_and_momentum(tmp_path, monkeypatch):
    """The first D update uses lr 0.1 and momentum 0.5 themselves: the schedule is read at step - 1."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    main(smoke(run_name="sgd", optimizer="sgd", lr=0.1, momentum=0.5, steps=1, sample_every=0, ckpt_every=0))
    ckpt = torch.load(tmp_path / STAGE / "sgd" / "ckpt.pt", weights_only=True)
    for name in ("opt_d", "opt_g"):
        group = ckpt[name]["param_groups"][0]
        assert (group["lr"], group["momentum"]) == (0.1, 0.5), name


def test_simultaneous_update_refuses_k_above_one_and_batch_norm(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    with pytest.raises(UserError, match="--k 2 needs --update alternating"):
        main(smoke(update="simultaneous", k=2))
    with pytest.raises(UserError, match="batch norm would mix"):
        main(smoke(update="simultaneous", arch="dcgan"))
    with pytest.raises(UserError, match="batch norm would mix"):  # G's batch norm sees fakes alone: D's is the one
        main(smoke(update="simultaneous", d_arch="dcgan"))
    assert not any(tmp_path.rglob("*"))  # refused before a run folder exists


def test_d_loss_scale_scales_the_discriminator_step():
    """--d-loss-scale 0.5 (the released code's ½(-V)): with plain SGD, D moves exactly half as far."""
    gan_cfg = model_config("mlp", "tiny", d_keep_in=1.0, d_keep=1.0)
    torch.manual_seed(0)
    G, D = build_gan(gan_cfg)
    x = torch.rand(8, 1, 28, 28)
    moves = []
    for scale in (1.0, 0.5):
        D_s = copy.deepcopy(D)
        opt_d = torch.optim.SGD(D_s.parameters(), lr=0.1)
        torch.manual_seed(1)
        discriminator_step(G, D_s, opt_d, x, gan_cfg, scale=scale)
        moves.append([p - p0 for p, p0 in zip(D_s.parameters(), D.parameters())])
    for full, half in zip(*moves):
        assert full.abs().max() > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-4, atol=1e-7)


def test_discriminator_learns_to_separate_a_tiny_batch():
    torch.manual_seed(0)
    gan_cfg = model_config("mlp", "tiny")
    G, D = build_gan(gan_cfg)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    x = torch.rand(16, 1, 28, 28).round()  # a fixed batch of binary "images"; G stays at its init
    first = discriminator_step(G, D, opt_d, x, gan_cfg)
    for _ in range(150):
        last = discriminator_step(G, D, opt_d, x, gan_cfg)
    assert first["d_loss"] == pytest.approx(np.log(4), abs=0.01)  # D = 1/2 at init: V = -log 4
    assert last["d_loss"] < 0.2 and last["d_real"] > 0.9 and last["d_fake"] < 0.1


def test_generator_fits_a_1d_gaussian():
    """The game's fixed point is p_g = p_data: a linear G learns N(3, 0.5^2) from N(0, 1) noise."""
    torch.manual_seed(0)
    gan_cfg = GANConfig(z_dim=1)
    G = torch.nn.Linear(1, 1)
    D = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1),
                            torch.nn.Flatten(0))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for _ in range(1000):
        discriminator_step(G, D, opt_d, 3 + 0.5 * torch.randn(128, 1), gan_cfg)
        generator_step(G, D, opt_g, 128, gan_cfg, "nonsaturating", "cpu")
    with torch.no_grad():
        x = G(torch.randn(20000, 1))
    assert abs(x.mean().item() - 3) < 0.1 and abs(x.std().item() - 0.5) < 0.15, (x.mean(), x.std())


def optim_equal(a: dict, b: dict) -> bool:
    """Two optimizer state_dicts agree: the same hyper-parameters per group (the SGD schedule's lr and momentum
    live there) and, for the same parameters, the same state tensors (momentum buffers, Adam's moments)."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(a["state"][i].keys() == b["state"][i].keys()
               and all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i]) for i in a["state"])


@pytest.mark.parametrize("overrides", [dict(arch="mlp", optimizer="sgd", lr=0.1, k=2),
                                       dict(arch="mlp", optimizer="sgd", lr=0.1, update="simultaneous",
                                            d_loss_scale=0.5),
                                       dict(arch="dcgan", size="tiny", batch_size=16, ema_decay=0.9, d_width=6,
                                            g_upsample="resize", d_readout="conv"),
                                       dict(arch="dcgan", size="tiny", batch_size=16, d_arch="mlp", g_norm="none",
                                            d_units=8, d_keep_in=1.0, d_keep=0.7),
                                       dict(arch="mlp", size="tiny", batch_size=16, d_arch="dcgan", d_norm="none",
                                            d_readout="fc", update="simultaneous")])
def test_exact_resume(tmp_path, overrides):
    cfg = smoke(steps=10, sample_every=0, ckpt_every=0, **overrides)
    straight, resumed = run_interrupted_and_straight(main, cfg, stop_at=4, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 10
    weights = ("model", "discriminator", "ema") if cfg.ema_decay else ("model", "discriminator")
    assert ("ema" in straight) == bool(cfg.ema_decay)
    assert checkpoints_equal(straight, resumed, keys=weights)
    if "dcgan" in (cfg.arch, cfg.d_arch):  # the run built the flags' D and G; its saved config rebuilds exactly those
        flags = model_config(cfg.arch, cfg.size, d_arch=cfg.d_arch, d_width=cfg.d_width, g_upsample=cfg.g_upsample,
                             g_norm=cfg.g_norm, d_norm=cfg.d_norm, d_readout=cfg.d_readout, d_keep_in=cfg.d_keep_in,
                             d_keep=cfg.d_keep,
                             **({"d_units": cfg.d_units} if cfg.d_units else {}))
        if discriminator_arch(flags) == "dcgan":
            assert straight["discriminator"]["net.0.weight"].shape[0] == (cfg.d_width or flags.width)
        else:  # maxout: units x pieces outputs in each layer
            assert straight["discriminator"]["net.2.linear.weight"].shape[0] == flags.d_units * flags.d_pieces == 8 * 2
        assert gan_config_of(straight["config"]) == flags
        G, D = build_gan(flags)
        G.load_state_dict(straight["model"])  # strict: the same layers, or an error
        D.load_state_dict(straight["discriminator"])
    assert optim_equal(straight["opt_g"], resumed["opt_g"]) and optim_equal(straight["opt_d"], resumed["opt_d"])
    # the comparison can fail: an empty state, or another lr, is not the same optimizer
    full = straight["opt_d"]
    assert full["state"] and not optim_equal(full, {**full, "state": {}})
    groups = [{**group, "lr": group["lr"] * 2} for group in full["param_groups"]]
    assert not optim_equal(full, {**full, "param_groups": groups})


def test_logged_d_loss_is_minus_v_averaged_over_the_k_discriminator_steps(tmp_path, monkeypatch):
    import json

    import train

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    calls, scales = [], []

    def recorded(*args, **kwargs):
        scales.append(args[6] if len(args) > 6 else kwargs.get("scale", 1.0))
        calls.append({key: value.item() for key, value in discriminator_step(*args, **kwargs).items()})
        return dict(calls[-1])

    monkeypatch.setattr(train, "discriminator_step", recorded)
    main(smoke(run_name="k3", steps=1, k=3, d_loss_scale=0.5, log_every=1, sample_every=0, ckpt_every=0))
    row = json.loads((tmp_path / STAGE / "k3" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(calls) == 3 and len({c["d_loss"] for c in calls}) == 3
    assert scales == [0.5] * 3  # --d-loss-scale reaches every D step
    for key in ("d_loss", "d_real", "d_fake"):
        assert row[key] == pytest.approx(sum(c[key] for c in calls) / 3, rel=1e-6), key
    # the first D step sees the untrained pair, whose -V does not depend on the scale of D's step
    calls.clear()
    main(smoke(run_name="k1", steps=1, k=1, d_loss_scale=1.0, log_every=1, sample_every=0, ckpt_every=0))
    first_unscaled = calls[0]["d_loss"]
    calls.clear()
    main(smoke(run_name="k1-half", steps=1, k=1, d_loss_scale=0.5, log_every=1, sample_every=0, ckpt_every=0))
    assert calls[0]["d_loss"] == pytest.approx(first_unscaled, rel=1e-6)


def test_compile_refuses_two_gradients_of_one_forward_pass(tmp_path, monkeypatch):
    """A compiled backward refuses, or silently gets wrong, a second gradient through one graph (torch 2.14, seen
    by hand: with buffer donation off the diagnostic's retained-graph backward came out at half the eager norm)."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    for overrides in (dict(), dict(diag_every=0, update="simultaneous", arch="mlp")):
        with pytest.raises(UserError, match="--diag-every 0"):
            main(smoke(compile=True, **overrides))
    assert not any(tmp_path.rglob("*"))  # refused before a run folder exists


def test_checkpoint_and_outputs(smoke_run):
    ckpt = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    assert {"model", "discriminator", "opt_g", "opt_d", "rng", "config"} <= set(ckpt)
    assert ckpt["stage"] == STAGE and ckpt["step"] == 20
    assert (smoke_run / "loss.png").is_file() and (smoke_run / "samples" / "final.png").is_file()
    rows = [r for r in map(__import__("json").loads, (smoke_run / "metrics.jsonl").read_text().splitlines())]
    assert any("gnorm_minimax" in r and "gnorm_nonsaturating" in r for r in rows)


def test_sample_writes_valid_npz(smoke_run, tmp_path):
    import sample

    out = sample.main(["--ckpt", str(smoke_run / "ckpt.pt"), "--num-samples", "10", "--batch-size", "4",
                       "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28) and images.max() > 0
    assert (tmp_path / "s.png").is_file()
    again = np.load(sample.main(["--ckpt", str(smoke_run), "--num-samples", "10", "--out", str(tmp_path / "t.npz"),
                                 "--device", "cpu"]))["images"]
    assert np.array_equal(images, again)  # a seed fixes the samples, whatever the batch size


def test_figures(smoke_run, tmp_path):
    import figures

    figures.main(["--run", str(smoke_run), "--out", str(tmp_path)])
    for name in ("training.gif", "nearest.png", "interpolation.png", "d_outputs.png", "grad_norms.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "game_summary.json").read_text())["last_step"] == 20  # the fixture's run


def test_game_summary_reads_the_log():
    from figures import game_summary

    # D's outputs every 10 steps to 3,000; D(G(z)) dips to 0.05 at step 130; the norms in rows of their own
    records = [{"step": s, "d_real": 0.7, "d_fake": 0.05 if s == 130 else 0.1 if s <= 300 else 0.3}
               for s in range(10, 3001, 10)]
    records += [{"step": s, "gnorm_minimax": 1.0, "gnorm_nonsaturating": 10.0 if s <= 300 else 2.0 + (s % 100 == 0)}
                for s in range(50, 3001, 50)]
    summary = game_summary(records)
    assert summary["min_d_fake_first_1000"] == {"step": 130, "d_fake": 0.05}
    assert summary["last_500"] == pytest.approx({"d_real": 0.7, "d_fake": 0.3})
    early, late = summary["gnorm_ratio_early"], summary["gnorm_ratio_late"]
    assert early["steps"] == [100, 250] and early["min"] == early["max"] == 10.0
    assert early["d_fake_range"] == [0.1, 0.1] and early["at_last"]["nonsaturating"] == 10.0
    assert late["steps"] == [1050, 3000] and (late["min"], late["max"], late["median"]) == (2.0, 3.0, 2.5)
    assert late["mean"] == pytest.approx(2.5) and late["d_fake_mean"] == pytest.approx(0.3)


def test_update_ema_averages_weights_and_batch_norm_statistics():
    G, _ = build_gan(model_config("dcgan", "tiny"))
    ema = copy.deepcopy(G)
    with torch.no_grad():
        for t in G.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.fill_(7)  # new weights, BN statistics and step counter
    before = {k: t.clone() for k, t in ema.state_dict().items()}
    update_ema(ema, G, 0.9)
    after, new = ema.state_dict(), G.state_dict()
    assert any("running_var" in k for k in after) and any("num_batches_tracked" in k for k in after)
    for k, t in after.items():
        expected = 0.9 * before[k] + 0.1 * new[k] if t.is_floating_point() else new[k]
        assert torch.allclose(t, expected), k


def test_sample_uses_the_weight_average_when_the_run_kept_one(tmp_path, monkeypatch, smoke_run):
    import sample

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    main(smoke(arch="dcgan", size="tiny", batch_size=16, steps=6, ema_decay=0.5, run_name="ema"))
    path = tmp_path / STAGE / "ema" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    for weights, key in ((None, "ema"), ("ema", "ema"), ("model", "model")):
        G = sample.load_generator(path, weights=weights)
        assert all(torch.equal(t, ckpt[key][k]) for k, t in G.state_dict().items()), weights
    assert not torch.equal(ckpt["ema"]["net.0.weight"], ckpt["model"]["net.0.weight"])
    with pytest.raises(UserError, match="holds only the 'model' weights; use --weights model"):
        sample.main(["--ckpt", str(smoke_run / "ckpt.pt"), "--weights", "ema"])


def test_pretrained_weights_load():
    import sample

    path = STAGE_DIR / "pretrained" / "mnist.pt"
    if not path.exists():
        pytest.skip("no pretrained/mnist.pt yet")
    assert path.stat().st_size <= 8 * 2**20
    G = sample.load_generator(path)
    assert sample.generate(G, 4, 4, 0).shape == (4, 1, 28, 28)


def test_user_errors_in_process(tmp_path, smoke_run):
    import sample

    with pytest.raises(UserError, match="--batch-size"):
        parse_config(TrainConfig, PRESETS, STAGE, ["--batch-size", "-1"])
    with pytest.raises(UserError, match="no checkpoint"):
        parse_config(TrainConfig, PRESETS, STAGE, ["--resume", str(tmp_path / "none.pt")])
    with pytest.raises(UserError, match="num-samples"):
        sample.main(["--num-samples", "0"])
    foreign = tmp_path / "vae.pt"
    save_checkpoint({**provenance("01_vae", {}, 0, 1), "model": {}}, foreign)
    with pytest.raises(UserError, match="01_vae"):
        sample.main(["--ckpt", str(foreign)])
    with pytest.raises(UserError, match="no such checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "missing.pt")])
    for flags in (dict(g_upsample="resize"), dict(g_norm="none"), dict(d_arch="dcgan", g_upsample="resize")):
        with pytest.raises(UserError, match="--g-upsample and --g-norm shape the DCGAN generator; .* --arch mlp"):
            main(smoke(**flags))  # the smoke preset's G is the MLP
    for flags in (dict(d_width=8), dict(d_norm="none"), dict(arch="dcgan", d_arch="mlp", d_norm="none"),
                  dict(d_readout="fc"), dict(arch="dcgan", d_arch="mlp", d_readout="conv")):
        with pytest.raises(UserError, match="--d-width, --d-norm and --d-readout shape the DCGAN discriminator; .* a "
                           "mlp disc"):
            main(smoke(**flags))
    for flags in (dict(arch="dcgan", size="tiny", d_keep=1.0), dict(d_arch="dcgan", d_keep_in=0.5),
                  dict(d_arch="dcgan", d_units=4)):
        with pytest.raises(UserError, match="--d-units, --d-keep-in and --d-keep shape the maxout discriminator"):
            main(smoke(**flags))


def test_cli_errors_exit_2_with_one_line(tmp_path):
    for script, args in (("train.py", ["--k", "0"]), ("train.py", ["--beta1", "1.5"]),
                         ("sample.py", ["--ckpt", str(tmp_path / "none.pt")]),
                         ("figures.py", [])):
        proc = run_script(STAGE_DIR / script, *args, experiments=tmp_path)
        assert proc.returncode == 2, (script, args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not any(tmp_path.rglob("*"))  # refused before a run folder exists


@pytest.mark.parametrize("flag, value", [("--beta1", "1.0"), ("--beta1", "-0.1"), ("--momentum", "1.5"),
                                         ("--momentum", "nan"), ("--d-loss-scale", "0"), ("--lr", "inf")])
def test_out_of_range_hyperparameters_are_user_errors(flag, value):
    with pytest.raises(UserError, match=flag):
        parse_config(TrainConfig, PRESETS, STAGE, [flag, value])


def test_readme_references_exist():
    assert (STAGE_DIR / "README.md").is_file()
    assert missing_readme_references(STAGE_DIR) == []
    assert missing_readme_files(STAGE_DIR) == []  # pictures, links and the asset files the numbers cite


def test_readme_commands_parse():  # every command a reader may copy still takes its flags
    assert readme_commands_that_fail(STAGE_DIR) == []


def test_dataclass_defaults_are_the_default_preset():
    defaults = TrainConfig()
    assert all(getattr(defaults, key) == value for key, value in PRESETS["default"].items())


def test_paper_sgd_schedule():
    from train import paper_sgd_schedule

    cfg = config_from_preset(TrainConfig, PRESETS, "full")
    per_epoch = 500  # 50,000 images / 100
    assert paper_sgd_schedule(0, cfg, per_epoch) == (0.1, 0.5)
    lr, momentum = paper_sgd_schedule(250 * per_epoch, cfg, per_epoch)
    assert momentum == pytest.approx(0.7) and lr == pytest.approx(0.1 / 1.000004 ** (250 * per_epoch))
    assert paper_sgd_schedule(10**8, cfg, per_epoch)[0] == 1e-6  # the floor


def test_paper_sgd_schedule_inside_the_ramp_and_per_d_update():
    """Momentum is linear from 0.5 at epoch 1 to 0.7 at epoch 250 (epochs of D updates completed), and the lr is
    divided by 1.000004 per D update: with k D steps per G step, G step t has made k * t of them."""
    from train import paper_sgd_schedule

    cfg = config_from_preset(TrainConfig, PRESETS, "full")
    per_epoch = 500
    assert cfg.k == 1 and (cfg.lr, cfg.momentum) == (0.1, 0.5)
    for epochs, want in ((0.5, 0.5), (1, 0.5), (126, 0.5 + 0.2 * 125 / 249), (249, 0.5 + 0.2 * 248 / 249)):
        step = round(epochs * per_epoch)
        lr, momentum = paper_sgd_schedule(step, cfg, per_epoch)
        assert momentum == pytest.approx(want, abs=1e-12), epochs
        assert lr == pytest.approx(0.1 / 1.000004 ** step, rel=1e-12)
    k2 = dataclasses.replace(cfg, k=2)
    step = 63 * per_epoch  # 126 epochs of D updates
    lr, momentum = paper_sgd_schedule(step, k2, per_epoch)
    assert lr == pytest.approx(0.1 / 1.000004 ** (2 * step), rel=1e-12)
    assert lr < 0.1 / 1.000004 ** step * (1 - 0.1)  # not the k = 1 decay: 1.000004^-31500 is another 12 % down
    assert momentum == pytest.approx(0.5 + 0.2 * 125 / 249, abs=1e-12)


def test_dcgan_full_preset_is_radfords_recipe_at_the_paper_width():
    """The DCGAN headline run is Adam(2e-4, beta1 0.5) on Radford et al.'s w = 64 pair (README section 4)."""
    cfg = parse_config(TrainConfig, PRESETS, STAGE, ["--preset", "dcgan-full"])
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.beta1) == ("dcgan", "adam", 2e-4, 0.5)
    assert (cfg.steps, cfg.batch_size, cfg.loss, cfg.k) == (30_000, 128, "nonsaturating", 1)
    G, D = build_gan(model_config(cfg.arch, cfg.size))
    assert [sum(p.numel() for p in net.parameters()) for net in (G, D)] == [1_781_505, 138_689]
