"""Learning, exact resume, the command lines, figures.py and the README's references."""

import dataclasses
import json
from pathlib import Path

import figures
import numpy as np
import pytest
import sample
import torch
import train
from diffusion import Diffusion
from model import build_unet

from shared.checkpoint import provenance, save_checkpoint
from shared.cli import config_from_preset, parse_config, run_entry, validate
from shared.data import load_images, to_symmetric
from shared.testing import (
    missing_readme_files,
    missing_readme_references,
    readme_commands_that_fail,
    run_interrupted_and_straight,
    run_script,
    same_training,
)

STAGE_DIR = Path(__file__).parents[1]
TINY = dict(dataset="synthetic", model="tiny", timesteps=50, batch_size=8, warmup=2, sample_every=0,
            ckpt_every=0, sample_steps=2, log_every=1, device="cpu")


def test_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    d = Diffusion(T=100)
    net = build_unet("tiny", dropout=0.0)
    x0 = to_symmetric(load_images("synthetic")[0][:8])
    g = torch.Generator().manual_seed(1)
    t_eval, eps_eval = torch.randint(1, 101, (8,), generator=g), torch.randn(x0.shape, generator=g)
    before = d.loss_simple(net, x0, t_eval, eps_eval).item()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(50):
        loss = d.loss_simple(net, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = d.loss_simple(net, x0, t_eval, eps_eval).item()
    assert before == pytest.approx(1.0, abs=0.15) and after < 0.4 * before


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_resume_is_bit_identical(tmp_path, schedule):
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **{**TINY, "steps": 6}, schedule=schedule)
    straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at=3, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 6 and straight["config"]["schedule"] == schedule
    assert same_training(straight, resumed) == []  # weights, EMA, optimizer, RNG, the logging window
    assert not torch.equal(straight["model"]["conv_out.weight"], straight["ema"]["conv_out.weight"])


def test_update_ema_is_theta_ema_decay_plus_theta_one_minus_decay():
    """theta_ema <- decay theta_ema + (1 - decay) theta, on every tensor of the state: from 0 towards a model of
    all 1s with decay 0.9, one update gives 0.1 and a second 0.1 + 0.9 * 0.1 = 0.19 (0.9 and 0.99 if reversed)."""
    model, ema = build_unet("tiny", dropout=0.0), build_unet("tiny", dropout=0.0)
    assert not list(model.buffers())  # the parameters are the whole state, so averaging them is enough
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.zero_()
            p.fill_(1.0)
    for want in (0.1, 0.19):
        train.update_ema(ema, model, 0.9)
        for (name, p_ema), p in zip(ema.named_parameters(), model.parameters()):
            torch.testing.assert_close(p_ema, torch.full_like(p_ema, want), msg=name)
            assert (p == 1).all()  # the model itself is left alone


def test_training_loop_feeds_data_in_minus_1_1_and_updates_the_ema_after_each_step(tmp_path, monkeypatch):
    """The loop around the tested pieces: x_0 scaled to [-1, 1] (the range of Eq. 13's bins and of the clip),
    the EMA decay min(--ema-decay, (1 + k)/(10 + k)) at step k, and the EMA fed the weights after that step."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    calls, batches = [], []
    real_update, real_loss = train.update_ema, Diffusion.loss_simple

    def update(ema, model, decay):
        calls.append((decay, [p.detach().clone() for p in model.parameters()]))
        real_update(ema, model, decay)

    def loss(self, eps_theta, x0, *args, **kwargs):
        batches.append(x0.clone())
        return real_loss(self, eps_theta, x0, *args, **kwargs)

    monkeypatch.setattr(train, "update_ema", update)
    monkeypatch.setattr(Diffusion, "loss_simple", loss)
    train.main(config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **{**TINY, "steps": 6}, ema_decay=0.3,
                                  run_name="spy"))
    assert [decay for decay, _ in calls] == [min(0.3, (1 + k) / (10 + k)) for k in range(1, 7)]
    final = torch.load(tmp_path / "03_ddpm" / "spy" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a, b) for a, b in zip(calls[-1][1], final.values()))  # after the last step, not before
    x0 = torch.stack(batches)
    assert x0.dtype == torch.float32 and x0.min() == -1 and x0.max() == 1


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp))
    train.main(config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **{**TINY, "steps": 3},
                                  run_name="tiny"))
    mp.undo()
    return tmp / "03_ddpm" / "tiny" / "ckpt.pt"


@pytest.mark.parametrize("flags", [["--sampler", "ddim", "--steps", "3", "--eta", "0.5"], ["--sampler", "ddpm"]])
def test_sample_writes_a_valid_npz(tiny_ckpt, tmp_path, flags):
    out = tmp_path / "s.npz"
    sample.main(["--ckpt", str(tiny_ckpt), "--num-samples", "5", "--batch-size", "3", "--out", str(out), *flags])
    x = np.load(out)["images"]
    assert x.dtype == np.uint8 and x.shape == (5, 1, 28, 28)
    assert out.with_suffix(".png").is_file()


def _exit_line(capsys, fn):
    with pytest.raises(SystemExit) as exc:
        run_entry(fn)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_cli_errors_are_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys):
    train_argv = lambda *a: lambda: train.main(parse_config(train.TrainConfig, train.PRESETS, train.STAGE,  # noqa: E731
                                                            [*a]))
    assert "--steps" in _exit_line(capsys, train_argv("--steps", "-1"))
    assert "--beta-1" in _exit_line(capsys, train_argv("--beta-1", "0.5", "--beta-T", "0.1"))
    assert "cosine has none" in _exit_line(capsys, train_argv("--schedule", "cosine", "--beta-T", "0.01"))
    for flag in ("--dropout", "--ema-decay", "--beta-T"):  # bounded by 1 in the dataclass
        assert f"{flag} must be at most 1" in _exit_line(capsys, train_argv(flag, "1.5"))
    assert "--dropout" in _exit_line(capsys, train_argv("--dropout", "-0.1"))
    assert "--dataset" in _exit_line(capsys, train_argv("--dataset", "cifar10"))
    assert "no such checkpoint" in _exit_line(capsys, lambda: sample.main(["--ckpt", str(tmp_path / "no.pt")]))
    assert "--steps" in _exit_line(capsys, lambda: sample.main(["--ckpt", str(tiny_ckpt), "--steps", "999"]))
    foreign = tmp_path / "vae.pt"
    save_checkpoint({**provenance("01_vae", {}, 0, 0), "model": {}}, foreign)
    assert "01_vae" in _exit_line(capsys, lambda: sample.main(["--ckpt", str(foreign)]))
    assert "--eta" in _exit_line(capsys, lambda: sample.main(["--ckpt", str(tiny_ckpt), "--eta", "1.5"]))
    assert "--fid-eta" in _exit_line(capsys, lambda: figures.main(["--ckpt", str(tiny_ckpt), "--fid-eta", "2"]))
    for steps in ("0", "10,-5", "51"):  # the tiny checkpoint has T = 50
        argv = ["--ckpt", str(tiny_ckpt), "--fid-steps", steps]
        assert "--fid-steps" in _exit_line(capsys, lambda argv=argv: figures.main(argv))
    assert "--fid-samples" in _exit_line(capsys, lambda: figures.main(["--fid-samples", "many"]))
    assert "above 3" in _exit_line(capsys, lambda: figures.main(["--ckpt", str(tiny_ckpt), "--fid-samples", "3"]))
    # --steps is DDIM's; the ancestral sampler takes all T steps and ignores it
    assert "--steps" in _exit_line(capsys, lambda: sample.main(["--ckpt", str(tiny_ckpt), "--steps", "0"]))
    sample.main(["--ckpt", str(tiny_ckpt), "--sampler", "ddpm", "--steps", "0", "--num-samples", "2",
                 "--out", str(tmp_path / "ddpm.npz")])
    assert np.load(tmp_path / "ddpm.npz")["images"].shape == (2, 1, 28, 28)
    proc = run_script(STAGE_DIR / "sample.py", "--ckpt", str(tmp_path / "missing.pt"), experiments=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


FORWARD_T = [0, 25, 50, 100, 200, 300, 500, 700, 1000]  # the t's of assets/forward.png (README section 6)
FIG6_T = [1000, 800, 600, 400, 300, 200, 100, 50, 0]  # the t's of assets/reverse_x0.png


def test_figure_timesteps_scale_with_T():
    assert figures.scaled_timesteps(FORWARD_T, 1000) == FORWARD_T  # the committed pictures stay valid
    assert figures.scaled_timesteps(FIG6_T, 1000) == FIG6_T
    for T in (2, 10, 50, 100, 250):
        for ts_1000 in (FORWARD_T, FIG6_T):
            ts = figures.scaled_timesteps(ts_1000, T)
            assert 0 in ts and T in ts and all(1 <= t <= T for t in ts if t), (T, ts)  # from x_0 to x_T
            step = 1 if ts_1000[0] < ts_1000[-1] else -1
            assert all(step * (b - a) > 0 for a, b in zip(ts, ts[1:])), (T, ts)  # distinct, in the given order
            assert (len(ts) == 9) if T >= 50 else (len(ts) >= min(T + 1, 3)), (T, ts)


def test_forward_process_frames_have_the_marginals_of_eq_4(tmp_path):
    d = Diffusion(T=50)
    x0 = torch.full((1, 1, 200, 200), 0.5)  # 40,000 pixels of one grey level: per-frame moments are precise
    frames = figures.forward_process(d, x0, tmp_path / "forward.png")
    ts = figures.scaled_timesteps(FORWARD_T, 50)
    assert frames.shape == (len(ts), 1, 200, 200) and (tmp_path / "forward.png").is_file()
    assert torch.equal(frames[0], x0[0])
    ab = d.alpha_bar[ts[1:]].float()
    torch.testing.assert_close(frames[1:].mean((1, 2, 3)), 0.5 * ab.sqrt(), atol=0.02, rtol=0)
    torch.testing.assert_close(frames[1:].var((1, 2, 3)), 1 - ab, atol=1e-4, rtol=0.05)


def test_reverse_process_shows_fig_6_columns_for_any_T(tmp_path, monkeypatch):
    """Odd rows x_t, even rows x_hat_0 from that x_t, one column per shown t from x_T to x_0 (Fig. 6)."""
    d, n = Diffusion(T=20), 2
    eps_theta = lambda x, t: 0.5 * x  # noqa: E731, any network
    grids = []
    monkeypatch.setattr(figures, "save_grid", lambda images, out, nrow: grids.append((images, nrow)))
    shown = figures.reverse_process(eps_theta, d, tmp_path / "r.png", n=n)
    assert shown == figures.scaled_timesteps(FIG6_T, 20) and len(shown) == 9
    trace = []
    d.sample_ddpm(eps_theta, (n, 1, 28, 28), generator=torch.Generator().manual_seed(1), trace=trace)
    (grid, nrow), = grids
    assert nrow == len(shown) and grid.shape == (2 * n * len(shown), 1, 28, 28)
    rows = grid.view(2 * n, len(shown), 1, 28, 28)
    for j, t in enumerate(shown):
        t_trace, x_t, x0_hat = trace[d.T - t]
        assert t_trace == t
        for i in range(n):
            assert torch.equal(rows[2 * i, j], x_t[i]) and torch.equal(rows[2 * i + 1, j], x0_hat[i])
    assert 0.8 < rows[0::2, 0].std() < 1.2  # the first column is x_T ~ N(0, I)


def test_slerp_keeps_the_norm_and_hits_the_endpoints():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
    b = b * a.norm() / b.norm()
    torch.testing.assert_close(figures.slerp(a, b, 0.0), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(figures.slerp(a, b, 1.0), b, atol=1e-5, rtol=0)
    for w in torch.linspace(0, 1, 9).tolist():
        assert figures.slerp(a, b, w).norm().item() == pytest.approx(a.norm().item(), rel=1e-4), w
    assert (a + b).norm() / 2 < 0.8 * a.norm()  # the straight line between them would not keep it


def test_figures_main_writes_the_pictures(tmp_path, monkeypatch):
    """The pictures of a T = 10 checkpoint (T < 50, so DDIM runs on all T steps), into --assets, not assets/."""
    from PIL import Image

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    train.main(config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **{**TINY, "steps": 1, "timesteps": 10},
                                  run_name="t10"))
    assets = STAGE_DIR / "assets"
    before = {p.name: p.stat().st_mtime_ns for p in assets.iterdir()}
    figures.main(["--ckpt", str(tmp_path / "03_ddpm" / "t10" / "ckpt.pt"), "--assets", str(tmp_path / "figs")])
    written = {p.name: Image.open(p).size for p in (tmp_path / "figs").iterdir()}
    side = lambda k: k * (28 + 2) + 2  # noqa: E731, save_grid's 2-pixel padding around 28-pixel images
    cols = lambda ts: len(figures.scaled_timesteps(ts, 10))  # noqa: E731, 7 and 8 distinct t's for T = 10
    assert written == {"forward.png": (side(cols(FORWARD_T)), side(1)),
                       "reverse_x0.png": (side(cols(FIG6_T)), side(8)),  # 4 samples: x_t and x_hat_0 rows
                       "samples.png": (side(8), side(8)), "interpolation.png": (side(9), side(4))}
    assert {p.name: p.stat().st_mtime_ns for p in assets.iterdir()} == before  # assets/ untouched


def test_fid_table_keeps_each_sampler_and_eta_apart():
    old = [{"sampler": "ddim", "S": 50, "eta": 0.0, "fid": 86.0}, {"sampler": "ddpm", "S": 1000, "var": "beta",
                                                                   "fid": 50.0}]
    new = [{"sampler": "ddim", "S": 50, "eta": 1.0, "fid": 56.0}, {"sampler": "ddim", "S": 10, "eta": 1.0, "fid": 70.0}]
    merged = figures.merge_rows(old, new)
    assert [(r["sampler"], r.get("eta"), r["S"], r["fid"]) for r in merged] == [
        ("ddim", 0.0, 50, 86.0), ("ddim", 1.0, 10, 70.0), ("ddim", 1.0, 50, 56.0), ("ddpm", None, 1000, 50.0)]
    rerun = figures.merge_rows(merged, [{"sampler": "ddim", "S": 50, "eta": 0.0, "fid": 80.0}])
    assert [r["fid"] for r in rerun] == [80.0, 70.0, 56.0, 50.0]  # a rerun replaces its own point only


def test_presets_are_valid_and_give_the_readme_recipes():
    for name in train.PRESETS:
        cfg = config_from_preset(train.TrainConfig, train.PRESETS, name)
        validate(cfg)
        train.make_diffusion(dataclasses.asdict(cfg))
    recipe = lambda name: {k: getattr(config_from_preset(train.TrainConfig, train.PRESETS, name), k)  # noqa: E731
                           for k in ("dataset", "model", "steps", "batch_size", "lr", "warmup", "ema_decay")}
    # README section 5: "small U-Net, 2000 steps of 64, lr 1e-3 (200 warm-up), EMA 0.995" and the full preset's
    # "base U-Net, 100k steps of 128, lr 2e-4 (5k warm-up), EMA 0.9999"
    assert recipe("default") == dict(dataset="mnist", model="small", steps=2000, batch_size=64, lr=1e-3, warmup=200,
                                     ema_decay=0.995)
    assert recipe("full") == dict(dataset="mnist", model="base", steps=100_000, batch_size=128, lr=2e-4,
                                  warmup=5000, ema_decay=0.9999)
    assert recipe("smoke")["dataset"] == "synthetic" and recipe("smoke")["model"] == "tiny"


def test_asset_tables_are_json_documents():
    """Every assets/*.json parses as one document (bits_per_dim.json was once appended to line by line)."""
    for path in sorted((STAGE_DIR / "assets").glob("*.json")):
        json.loads(path.read_text())
    rows = json.loads((STAGE_DIR / "assets" / "bits_per_dim.json").read_text())
    merged = figures.merge_bpd_rows(rows, {**rows[0], "bpd": 0.0})
    assert len(merged) == len(rows) and sum(r["bpd"] == 0.0 for r in merged) == 1  # a rerun replaces its row


def test_readme_references_exist():
    assert missing_readme_references(STAGE_DIR) == []
    assert missing_readme_files(STAGE_DIR) == []  # pictures, links and the asset files the numbers cite


def test_readme_commands_parse():  # every command a reader may copy still takes its flags
    assert readme_commands_that_fail(STAGE_DIR) == []
