import dataclasses
from pathlib import Path
from types import SimpleNamespace

import evaluate as evaluate_script
import numpy as np
import pytest
import sample as sample_script
import torch
import train
from captions import Tokenizer, attribute_levels, parse_prompt
from model import info_nce

from shared import UserError
from shared.checkpoint import export_weights, load_checkpoint, save_checkpoint
from shared.cli import config_from_preset, parse_config, run_entry
from shared.data import load_images
from shared.testing import (
    missing_readme_files,
    missing_readme_references,
    readme_commands_that_fail,
    run_interrupted_and_straight,
    run_script,
    same_training,
)

STAGE_DIR = Path(__file__).parents[1]
TINY = dict(steps=8, clip_steps=4, batch_size=16, sample_steps=2, log_every=2)


def test_resume_is_bit_identical_in_both_phases(tmp_path):
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **TINY, device="cpu")
    for stop_at in (2, 4, 6):  # inside the CLIP phase, at the switch (clip_steps = 4), inside the MMDiT phase
        straight, resumed = run_interrupted_and_straight(train.main, cfg, stop_at, tmp_path / f"stop{stop_at}")
        assert straight["step"] == resumed["step"] == cfg.steps
        assert same_training(straight, resumed) == []  # weights, EMA, both optimizers, RNG, the logging window
    assert straight["model"]["dit.final.weight"].abs().sum() > 0  # the MMDiT phase did train


def test_caption_dropout_swaps_a_p_uncond_fraction_of_captions_for_the_empty_prompt():
    """README Eq. (8): with probability p_uncond a caption becomes the empty prompt that the samplers use for the
    unconditional branch (sample.py::generate: tok.batch([""])); every other caption is left as it was."""
    tok = Tokenizer()
    null = tok.batch([""])  # (1, L): <eos>, then padding
    ids = tok.batch(["a thick 7", "three, slanted left", "the digit 0, drawn small", "an 8"] * 5000)  # (20000, L)
    n = len(ids)
    for p in (0.1, 0.5):
        out = train.drop_captions(ids.clone(), p, null, torch.Generator().manual_seed(0))
        dropped = (out == null).all(1)  # (n,): no caption above is the empty prompt
        assert torch.equal(out[~dropped], ids[~dropped])  # kept rows untouched
        assert torch.equal(out[dropped], null.expand(int(dropped.sum()), -1))
        sd = (p * (1 - p) / n) ** 0.5  # binomial standard error of the fraction: 0.0021 at p = 0.1
        assert abs(dropped.float().mean().item() - p) < 4 * sd, (p, dropped.float().mean().item())
        assert torch.equal(train.drop_captions(ids.clone(), p, null, torch.Generator().manual_seed(0)), out)  # seeded
    assert torch.equal(train.drop_captions(ids.clone(), 0.0, null), ids)
    assert (train.drop_captions(ids.clone(), 1.0, null) == null).all()
    # Without a generator: one uniform per row from the global RNG, as the training loop drew them before this
    # became a function, so trained runs (and resumed ones) see the same numbers
    torch.manual_seed(1)
    dropped = (train.drop_captions(ids[:64].clone(), 0.3, null) == null).all(1)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(dropped, torch.rand(64) < 0.3) and torch.equal(after, torch.get_rng_state())


def test_training_drops_captions_on_every_mmdit_step(tmp_path, monkeypatch):
    """The loop calls drop_captions once per MMDiT step with --p-uncond, on the whole batch, and not in the CLIP
    phase (the CLIP learns from real captions only)."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    calls, dropped, conditioned = [], [], []
    drop_captions, condition = train.drop_captions, train.TextToImage.condition

    def spy(ids, p_uncond, null_ids, generator=None):
        calls.append((len(ids), p_uncond))
        dropped.append(drop_captions(ids, p_uncond, null_ids, generator))
        return dropped[-1]

    def condition_spy(self, ids):
        conditioned.append(ids)
        return condition(self, ids)

    monkeypatch.setattr(train, "drop_captions", spy)
    monkeypatch.setattr(train.TextToImage, "condition", condition_spy)
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **TINY, device="cpu", p_uncond=0.25,
                             sample_every=0)
    train.main(cfg)
    assert calls == [(cfg.batch_size, 0.25)] * (cfg.steps - cfg.clip_steps)
    # the MMDiT is conditioned on the captions with the dropped ones replaced, not on the originals
    training = [ids for ids in conditioned if len(ids) == cfg.batch_size][:len(dropped)]
    assert len(training) == len(dropped) and all(a is b for a, b in zip(training, dropped))


def test_mmdit_learning_rate_warms_up_then_stays_or_decays_to_zero():
    constant = train.TrainConfig(steps=1400, clip_steps=400, lr=1e-3)
    cosine = dataclasses.replace(constant, lr_decay="cosine")
    assert train.mmdit_lr(constant, 401) == pytest.approx(1e-3 / 200)  # first MMDiT step
    assert train.mmdit_lr(constant, 500) == pytest.approx(0.5e-3)  # half-way through the warm-up
    assert train.mmdit_lr(constant, 600) == train.mmdit_lr(constant, 1400) == pytest.approx(1e-3)
    assert train.mmdit_lr(cosine, 900) == pytest.approx(0.5e-3)  # half-way through the MMDiT phase
    assert train.mmdit_lr(cosine, 1400) == pytest.approx(0.0, abs=1e-12)
    lrs = [train.mmdit_lr(cosine, s) for s in range(600, 1401)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # falls at every step after the warm-up


def test_mmdit_learning_rate_with_decay_steps_holds_then_falls_linearly_over_the_last_steps():
    """--decay-steps 4 of 1,000 MMDiT steps: the peak up to step 1,396, then 1, 3/4, 1/2, 1/4 of it (the step after
    the last would be 0); the warm-up is untouched, and the decay cannot be stacked on the cosine."""
    cfg = train.TrainConfig(steps=1400, clip_steps=400, lr=1e-3, decay_steps=4)
    assert train.mmdit_lr(cfg, 500) == pytest.approx(0.5e-3)
    assert [train.mmdit_lr(cfg, s) for s in range(1396, 1401)] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.5e-3,
                                                                                 0.25e-3])
    with pytest.raises(UserError, match="cannot be combined"):
        train.main(dataclasses.replace(cfg, lr_decay="cosine"))
    with pytest.raises(UserError, match="must not exceed the MMDiT's 1000 steps"):
        train.main(dataclasses.replace(cfg, decay_steps=1001))


def test_miss_distance_is_zero_inside_the_asked_band_and_grows_outside_it():
    v = torch.tensor([-0.5, -0.1, 0.0, 0.29, 0.45])
    assert torch.allclose(evaluate_script.miss_distance(v, (-0.1, 0.3), 1), torch.tensor([0.4, 0, 0, 0, 0.15]))
    assert torch.allclose(evaluate_script.miss_distance(v, (-0.1, 0.3), 0), torch.tensor([0, 0, 0.1, 0.39, 0.55]))
    assert torch.allclose(evaluate_script.miss_distance(v, (-0.1, 0.3), 2), torch.tensor([0.8, 0.4, 0.3, 0.01, 0]))
    # every real digit lies inside the band of the level that captions.py::attribute_levels gives it
    x, _ = load_images("mnist", train=False)
    x = x[:300].float() / 255
    for name, level in attribute_levels(x).items():
        measure, edges = evaluate_script.LEVEL_EDGES[name]
        values = measure(x)
        assert all(evaluate_script.miss_distance(values[level == k], edges, k).max() == 0 for k in level.unique())
        assert evaluate_script.miss_distance(values[level != 0], edges, 0).min() > 0  # and outside the others


def test_clip_loss_falls_and_zero_shot_beats_chance():
    torch.manual_seed(0)
    tok = Tokenizer()
    cfg = train.TrainConfig(clip_size="tiny", dit_size="tiny")
    model = train.build(cfg, tok)
    images, labels = load_images("synthetic")
    x, ids = train.make_batch(images[:64], labels[:64], tok, p_small=0.0)
    opt = torch.optim.AdamW(model.clip.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = info_nce(model.clip(x, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    test_x, test_y = load_images("synthetic", train=False)
    assert train.zero_shot_accuracy(model, tok, test_x, test_y, "cpu") > 0.3  # chance is 0.1


@pytest.mark.parametrize("two_digit, width, steps", [(False, 28, 150), (True, 56, 100)])
def test_flow_loss_falls(two_digit, width, steps):
    torch.manual_seed(0)
    tok = Tokenizer()
    model = train.build(train.TrainConfig(clip_size="tiny", dit_size="tiny", two_digit=two_digit), tok)
    images, labels = load_images("synthetic")
    x, ids = train.make_batch(images[:32], labels[:32], tok, p_small=0.0, two_digit=two_digit)
    assert x.shape == (32, 1, 28, width)
    cond = model.condition(ids)
    opt = torch.optim.AdamW(model.dit.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        t, eps = torch.rand(32, generator=g), torch.randn(x.shape, generator=g)
        loss = train.rectified_flow_loss(model.velocity, x, cond, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_training_zeroes_nothing_it_should_not(tmp_path, monkeypatch):
    """The CLIP is frozen in phase 2: its weights at the end equal those at the end of phase 1."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **TINY, device="cpu")
    train.main(dataclasses.replace(cfg, run_name="a", steps=cfg.clip_steps + 1))
    train.main(dataclasses.replace(cfg, run_name="b"))
    a = load_checkpoint(tmp_path / train.STAGE / "a" / "ckpt.pt")
    b = load_checkpoint(tmp_path / train.STAGE / "b" / "ckpt.pt")
    clip = [k for k in a["model"] if k.startswith("clip.")]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in clip)
    assert all(torch.equal(b["ema"][k], b["model"][k]) for k in clip)
    assert not torch.equal(a["model"]["dit.final.weight"], b["model"]["dit.final.weight"])


def test_ema_forgets_the_fresh_mmdit_within_its_warm_up():
    """The ramped decay leaves < 1e-6 of the EMA's starting point after 300 MMDiT steps (0.999^300 = 74 % without)
    and is the configured decay once the ramp passes it (at k ~ 9,000)."""
    cfg = train.TrainConfig(steps=6000, clip_steps=2000, ema_decay=0.999)
    ema, model = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    for p in ema.parameters():
        p.data.zero_()
    for p in model.parameters():
        p.data.fill_(1.0)
    for step in range(cfg.clip_steps + 1, cfg.clip_steps + 301):
        train.ema_update(ema, model, train.ema_decay(cfg, step))
    assert all((1 - p).abs().max() < 1e-6 for p in ema.parameters())
    assert train.ema_decay(cfg, cfg.clip_steps + 1) == 2 / 11  # (1 + k) / (10 + k) on the first MMDiT step, k = 1
    assert train.ema_decay(cfg, cfg.clip_steps + 90) == 91 / 100
    assert train.ema_decay(cfg, cfg.clip_steps + 10_000) == 0.999


def test_ema_update_keeps_decay_of_the_average_and_takes_one_minus_decay_of_the_model():
    """README "EMA of the weights": ema <- decay * ema + (1 - decay) * model, so from 0 towards 1 at decay 0.9 the
    EMA reads 0.1, then 0.19, then 0.271 (= 1 - 0.9^n), and the model is left as it was."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for p in ema.parameters():
        p.data.zero_()
    for p in model.parameters():
        p.data.fill_(1.0)
    for want in (0.1, 0.19, 0.271):
        train.ema_update(ema, model, 0.9)
        assert all(torch.allclose(p, torch.full_like(p, want), rtol=0, atol=1e-6) for p in ema.parameters()), want
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters())
    for p in model.parameters():  # a second point: the update is linear in both, from any starting EMA
        p.data.fill_(-2.0)
    train.ema_update(ema, model, 0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.75 * 0.271 + 0.25 * -2.0), rtol=0, atol=1e-6)
               for p in ema.parameters())


def one_line_exit(capsys, fn, *args) -> str:
    """Run an entry point as its script does; it must exit with code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_entry(fn, *args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    parse = lambda *argv: train.main(parse_config(train.TrainConfig, train.PRESETS, train.STAGE, list(argv)))  # noqa: E731
    assert "--clip-steps" in one_line_exit(capsys, parse, "--preset", "smoke", "--clip-steps", "50", "--steps", "20")
    assert "--patch" in one_line_exit(capsys, parse, "--preset", "smoke", "--patch", "5")
    assert "invalid choice" in one_line_exit(capsys, parse, "--dataset", "fashion-mnist")  # --help offers two
    smoke = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", device="cpu")
    assert "digits" in one_line_exit(capsys, train.main, dataclasses.replace(smoke, dataset="fashion-mnist"))
    assert "at least" in one_line_exit(capsys, parse, "--batch-size", "-3")
    foreign = tmp_path / "foreign.pt"
    torch.save({"stage": "01_vae", "model": {}}, foreign)
    assert "01_vae" in one_line_exit(capsys, sample_script.main, ["--ckpt", str(foreign)])
    assert "no such" in one_line_exit(capsys, sample_script.main, ["--ckpt", str(tmp_path / "missing.pt")])
    assert ".npz" in one_line_exit(capsys, sample_script.main, ["--out", "x.png"])
    walk = ["--interpolate", "a 1", "a 7"]
    assert "drop --prompt" in one_line_exit(capsys, sample_script.main, [*walk, "--prompt", "a 2"])
    assert "at least 2" in one_line_exit(capsys, sample_script.main, [*walk, "--num-samples", "1"])
    pretrained = str(STAGE_DIR / "pretrained" / "mnist.pt")  # EMA weights only: --weights model must not fall back
    for script in (sample_script, evaluate_script):
        bad = lambda *flags, main=script.main: one_line_exit(capsys, main, ["--ckpt", pretrained, *flags])  # noqa: E731
        assert "holds only the 'ema' weights" in bad("--weights", "model")
        assert all("--sample-steps" in bad("--sample-steps", steps) for steps in ("0", "-1"))
        for lo, hi in (("1", "0"), ("0.5", "0.5"), ("-0.1", "1"), ("0", "1.5"), ("0", "nan")):
            assert "--cfg-interval" in bad("--cfg-interval", lo, hi)
        assert "--cfg-scale" in bad("--cfg-scale", "inf")
        assert "invalid choice" in one_line_exit(capsys, script.main, ["--device", "tpu"])  # argparse, one line too
    result = run_script(STAGE_DIR / "train.py", "--dataset", "imagenet", experiments=tmp_path)  # as a user runs it
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_sample_writes_npz_with_prompted_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **TINY, device="cpu", run_name="s")
    train.main(cfg)
    ckpt = str(tmp_path / train.STAGE / "s" / "ckpt.pt")
    out = tmp_path / "out.npz"
    sample_script.main(["--ckpt", ckpt, "--num-samples", "6", "--out", str(out), "--device", "cpu",
                        "--prompt", "a thick slanted seven", "--prompt", "an 8, drawn small", "--cfg-scale", "3"])
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (6, 1, 28, 28)
    assert data["labels"].tolist() == [7, 8, 7, 8, 7, 8]
    assert out.with_suffix(".png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 1\n\nthe digit two\n")
    sample_script.main(["--ckpt", ckpt, "--num-samples", "3", "--out", str(out), "--prompts-file", str(prompts)])
    assert np.load(out)["labels"].tolist() == [1, 2, 1]
    sample_script.main(["--ckpt", ckpt, "--num-samples", "4", "--out", str(out), "--interpolate", "a 1", "a 7"])
    assert np.load(out)["images"].shape == (4, 1, 28, 28)
    assert np.load(out)["labels"].tolist() == [1, 1, 7, 7]  # w = 0, 1/3: A's digit; w = 2/3, 1: B's
    # the sampler gets the flags asked for, and --seed fixes the noise
    seen = []

    def spy(model, tok, prompts, noise, scale, steps, batch_size, interval):
        seen.append((scale, steps, batch_size, interval, noise.clone()))
        return noise.clamp(-1, 1)

    monkeypatch.setattr(sample_script, "generate", spy)
    for seed in ("0", "1"):
        sample_script.main(["--ckpt", ckpt, "--num-samples", "4", "--out", str(out), "--cfg-scale", "4",
                            "--sample-steps", "3", "--cfg-interval", "0.2", "0.8", "--batch-size", "2", "--seed", seed])
    assert [s[:4] for s in seen] == [(4.0, 3, 2, (0.2, 0.8))] * 2 and not torch.equal(seen[0][4], seen[1][4])
    assert len(seen[0][4].flatten(1).unique(dim=0)) == 4  # one noise image per sample, not one for all
    with pytest.raises(UserError, match="unknown word 'purple'"):
        sample_script.main(["--ckpt", ckpt, "--prompt", "a purple 7", "--out", str(out)])
    # mistakes in the prompts are found before any sampling, wherever they stand
    monkeypatch.setattr(sample_script, "generate", lambda *args: pytest.fail("sampled before the mistake showed"))
    prompts.write_text("a 1\n" * 9 + "a purple 7\n")
    with pytest.raises(UserError, match="unknown word 'purple'"):
        sample_script.main(["--ckpt", ckpt, "--num-samples", "10", "--batch-size", "2", "--out", str(out),
                            "--prompts-file", str(prompts)])
    with pytest.raises(UserError, match="not both"):
        sample_script.main(["--ckpt", ckpt, "--prompts-file", str(prompts), "--prompt", "a 2", "--out", str(out)])
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match="not a readable text file"):
        sample_script.main(["--ckpt", ckpt, "--prompts-file", str(tmp_path / "binary.txt"), "--out", str(out)])
    (tmp_path / "grid_taken.png").mkdir()  # the .npz's grid picture can't be written: found before sampling too
    with pytest.raises(UserError, match="--out"):
        sample_script.main(["--ckpt", ckpt, "--out", str(tmp_path / "grid_taken.npz")])
    # Attribute adherence asks each attribute of 10 prompts in turn: fewer samples would leave one unasked.
    capsys.readouterr()  # forget the training's progress bar
    assert "at least 60" in one_line_exit(capsys, evaluate_script.main, ["--ckpt", ckpt, "--num-samples", "20"])


def test_readme_references_exist():
    assert missing_readme_references(STAGE_DIR) == []
    assert missing_readme_files(STAGE_DIR) == []  # pictures, links and the asset files the numbers cite


def test_readme_commands_parse():  # every command a reader may copy still takes its flags
    assert readme_commands_that_fail(STAGE_DIR) == []


@pytest.mark.parametrize("two_digit, image_pos", [(True, "learned"), (True, "auto"), (False, "auto")])
def test_checkpoints_from_before_the_position_flags_still_load(tmp_path, two_digit, image_pos):
    # Such a config has no text_pos / image_pos (learned positions then), or the old image_pos "auto".
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", two_digit=two_digit, text_pos="learned",
                             image_pos="sincos" if image_pos == "auto" and two_digit else "learned")
    model = train.build(cfg, Tokenizer())
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("text_pos", "image_pos")}
    if image_pos == "auto":
        old["image_pos"] = "auto"
    path = tmp_path / "old.pt"
    torch.save({"stage": train.STAGE, "config": old, "step": 0, "model": model.state_dict()}, path)
    loaded, _, loaded_cfg = sample_script.load_model(path, "cpu", weights="model")  # raw: no "weights" field then
    assert loaded_cfg.image_pos == cfg.image_pos
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_the_weights_asked_for_are_the_weights_loaded(tmp_path):
    """A training checkpoint gives either set; an exported file only the set it names (EMA for pretrained/), and
    one exported before files named their set only its raw weights; asking for the other set is an error."""
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke")
    raw = train.build(cfg, Tokenizer()).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    head = {"stage": train.STAGE, "config": dataclasses.asdict(cfg), "step": cfg.steps}
    run = save_checkpoint({**head, "model": raw, "ema": ema}, tmp_path / "ckpt.pt")
    exported = export_weights(load_checkpoint(run), tmp_path / "mnist.pt")
    old = save_checkpoint({**head, "model": raw}, tmp_path / "old.pt")
    param = "dit.final.weight"
    cases = ((run, "ema", ema), (run, "model", raw), (exported, "ema", ema), (old, "model", raw))
    for path, weights, expected in cases:
        assert torch.equal(sample_script.load_model(path, "cpu", weights)[0].state_dict()[param], expected[param])
    for path, weights, held in ((exported, "model", "ema"), (old, "ema", "model")):
        with pytest.raises(UserError, match=f"holds only the '{held}' weights"):
            sample_script.load_model(path, "cpu", weights)


def test_pretrained_weights_load_and_are_small():
    path = STAGE_DIR / "pretrained" / "mnist.pt"
    assert path.stat().st_size <= 8 * 2**20
    model, tok, cfg = sample_script.load_model(path, "cpu")
    assert load_checkpoint(path, train.STAGE)["step"] == cfg.steps
    assert sorted(model.state_dict()) == sorted(load_checkpoint(path)["model"])


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at each step, the learning rates it steps with, the total norm of the gradients it
    applies, and its parameters before and after the step."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen = []  # one dict per step

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        before = [p.detach().clone() for p in params]
        lrs = [group["lr"] for group in self.param_groups]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        out = super().step(closure)
        self.seen.append({"lr": lrs, "grad_norm": norm, "before": before,
                          "after": [p.detach().clone() for p in params]})
        return out


LOOP = dict(TINY, clip_lr=2.5e-3, lr=7e-4, t_mean=3.0, t_std=0.02, sample_every=0, run_name="loop")
LOSS_SCALE = 1e4  # the flow loss the loop backpropagates, scaled up so that every gradient norm exceeds the clip


@pytest.fixture(scope="module")
def recorded_training(tmp_path_factory):
    """One smoke run (4 CLIP steps, then 4 MMDiT steps) with both optimizers and the flow loss recorded."""
    tmp_path = tmp_path_factory.mktemp("loop")
    optimizers, times = [], []
    flow_loss = train.rectified_flow_loss

    def make_optimizer(params, **kwargs):
        optimizers.append(RecordingAdamW(params, **kwargs))
        return optimizers[-1]

    def scaled_flow_loss(velocity, x0, cond, t, eps):
        times.append(t.clone())
        return LOSS_SCALE * flow_loss(velocity, x0, cond, t, eps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
        patch.setattr(torch.optim, "AdamW", make_optimizer)
        patch.setattr(train, "rectified_flow_loss", scaled_flow_loss)
        cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **LOOP, device="cpu")
        model = train.main(cfg)
    clip_params = {id(p) for p in model.clip.parameters()}
    clip_opt, = [o for o in optimizers if {id(p) for g in o.param_groups for p in g["params"]} <= clip_params]
    dit_opt, = [o for o in optimizers if o is not clip_opt]
    ckpt = load_checkpoint(tmp_path / train.STAGE / "loop" / "ckpt.pt")
    return SimpleNamespace(cfg=cfg, model=model, clip=clip_opt.seen, dit=dit_opt.seen, times=times, ckpt=ckpt)


def test_clip_phase_steps_with_clip_lr_warmed_up_over_100_steps(recorded_training):
    """Each of the --clip-steps CLIP steps uses --clip-lr times the warm-up factor step / 100 (not --lr)."""
    run = recorded_training
    assert [lr for s in run.clip for lr in s["lr"]] == pytest.approx([2.5e-3 * step / 100 for step in range(1, 5)])


def test_mmdit_phase_steps_with_the_lr_of_its_own_step(recorded_training):
    """Each MMDiT step k = step - clip_steps (1..4) uses --lr * k / 200: the warm-up value is set before the step
    it belongs to, not after it (one step late)."""
    run = recorded_training
    assert [lr for s in run.dit for lr in s["lr"]] == pytest.approx([7e-4 * k / 200 for k in range(1, 5)])


def test_mmdit_steps_apply_gradients_clipped_to_norm_one(recorded_training):
    """Every MMDiT step applies gradients of total norm 1 when the raw gradient is larger (here ~1e4 x)."""
    norms = [s["grad_norm"] for s in recorded_training.dit]
    assert len(norms) == 4 and norms == [pytest.approx(1.0, abs=1e-4)] * 4


def test_flow_loss_timesteps_follow_t_mean_and_t_std(recorded_training):
    """The t of every MMDiT step is logit-normal with --t-mean 3 and --t-std 0.02: all within sigmoid(3 +- 0.1)."""
    t = torch.cat(recorded_training.times)
    assert len(t) == 4 * TINY["batch_size"]
    lo, hi = torch.sigmoid(torch.tensor([2.9, 3.1]))
    assert lo < t.min() and t.max() < hi, (t.min(), t.max())


def test_ema_averages_the_weights_after_every_mmdit_step_with_the_ramped_decay(recorded_training):
    """The saved EMA is the fresh MMDiT averaged, after each MMDiT step k, towards that step's weights with decay
    (1 + k) / (10 + k); it is a copy, not the live weights."""
    run = recorded_training
    names = [f"dit.{name}" for name, _ in run.model.dit.named_parameters()]
    ema = run.dit[0]["before"]  # the EMA starts at the fresh MMDiT
    for k, step in enumerate(run.dit, start=1):
        decay = min(run.cfg.ema_decay, (1 + k) / (10 + k))
        ema = [e + (1 - decay) * (w - e) for e, w in zip(ema, step["after"])]
    for name, want in zip(names, ema):
        assert torch.allclose(run.ckpt["ema"][name], want, rtol=0, atol=1e-6), name
    assert not torch.equal(run.ckpt["ema"]["dit.final.weight"], run.ckpt["model"]["dit.final.weight"])
    assert all(torch.equal(run.ckpt["model"][name], w) for name, w in zip(names, run.dit[-1]["after"]))


def test_make_batch_scales_images_to_symmetric_range():
    """With no digit shrunk the batch is the uint8 images mapped to [-1, 1]: 0 -> -1, 255 -> 1."""
    images, labels = load_images("mnist", train=False)
    x, ids = train.make_batch(images[:32], labels[:32], Tokenizer(), p_small=0.0)
    assert torch.allclose(x, images[:32].float() / 127.5 - 1, atol=1e-6)
    assert x.min() == -1 and x.max() == 1 and ids.shape == (32, Tokenizer().max_len)


@pytest.mark.parametrize("two_digit", [False, True])
def test_make_batch_captions_describe_the_images_it_returns(two_digit):
    """Captions are measured on the returned (some shrunk) digits: a caption says "small" (or "tiny") once for
    each returned digit that measures small, and names the levels the returned image measures."""
    torch.manual_seed(0)
    tok = Tokenizer()
    images, labels = load_images("mnist", train=False)
    x, ids = train.make_batch(images[:200], labels[:200], tok, p_small=0.5, two_digit=two_digit)
    x01 = (x + 1) / 2
    halves = [x01[..., :28], x01[..., 28:]] if two_digit else [x01]
    small = sum((attribute_levels(h)["size"] == 0).long() for h in halves)  # (200,) small digits per image
    said = torch.tensor([sum(w in ("small", "tiny") for w in tok.decode(row).split()) for row in ids])
    assert torch.equal(said, small)
    assert 0.3 < (small > 0).float().mean() < 0.9  # a part of the batch was shrunk (half, or either of two)
    if not two_digit:  # every named level is the measured one
        levels = attribute_levels(x01)
        for i, row in enumerate(ids):
            digit, named = parse_prompt(tok.decode(row))
            assert digit == labels[i] and all(levels[k][i] == v for k, v in named.items()), tok.decode(row)


def test_sample_grid_guides_with_cfg_scale():
    """The training grid is sampled at --cfg-scale: at 0 the prompts do not matter (unconditional), at 3 they do,
    and the result differs from scale 1."""
    torch.manual_seed(0)
    tok = Tokenizer()
    cfg = train.TrainConfig(clip_size="tiny", dit_size="tiny", sample_steps=2)
    model = train.build(cfg, tok).eval()
    for p in model.dit.parameters():  # away from adaLN-Zero's zero output, so that the text matters
        p.data.add_(0.05 * torch.randn_like(p))
    prompts = train.grid_prompts()
    grids = {}
    with pytest.MonkeyPatch.context() as patch:
        for order, ordered in (("forward", prompts), ("reversed", prompts[::-1])):
            patch.setattr(train, "grid_prompts", lambda ordered=ordered: ordered)
            for scale in (0.0, 1.0, 3.0):
                grids[order, scale] = train.sample_grid(model, tok, dataclasses.replace(cfg, cfg_scale=scale), "cpu")
    assert torch.allclose(grids["forward", 0.0], grids["reversed", 0.0], atol=1e-5)  # the same noise, no text
    assert not torch.allclose(grids["forward", 3.0], grids["reversed", 3.0], atol=1e-3)
    assert not torch.allclose(grids["forward", 3.0], grids["forward", 1.0], atol=1e-3)
