import ladder
import pytest

from shared import UserError


def test_rungs_accumulate_one_switch_at_a_time():
    configs = ladder.rung_configs("smoke")
    assert len(configs) == len(ladder.RUNGS)
    first, last = configs[0][1], configs[-1][1]
    assert first.objective == "ddpm" and not (first.swiglu or first.rope or first.logit_normal)
    assert last.objective == "flow" and last.logit_normal and last.cos_weight == 1.0 and last.swiglu
    assert last.rmsnorm and last.rope and last.qk_norm and last.beta2 == 0.95
    for (_, a), (_, b) in zip(configs, configs[1:]):  # each rung differs from the one above in one switch
        changed = [k for k in ("objective", "logit_normal", "cos_weight", "swiglu", "rmsnorm", "rope", "qk_norm",
                               "beta2") if getattr(a, k) != getattr(b, k)]
        assert len(changed) == 1, changed


def test_ladder_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    seen = []

    def fake_evaluate(images, labels=None):  # the real metric would take minutes
        seen.append(images.shape)
        return {"fid": float(images.float().mean()), "fid_floor": 1.0, "label_accuracy": 0.1}

    monkeypatch.setattr(ladder, "evaluate", fake_evaluate)
    rows = ladder.main(["--preset", "smoke", "--eval-at", "2", "4", "--num-samples", "10", "--sample-steps", "2",
                        "--rungs", "1", "--device", "cpu"])
    assert [(r["rung"], r["step"]) for r in rows] == [(ladder.RUNGS[0][0], 2), (ladder.RUNGS[0][0], 4)]
    assert seen == [(10, 1, 28, 28)] * 2
    assert (tmp_path / "04_dit" / "ladder" / "ladder_fid.png").is_file()


def test_ladder_refuses_bad_flags_with_one_line(capsys):
    for args in (["--sample-steps", "0"], ["--num-samples", "0"], ["--eval-at", "0", "5"], ["--rungs", "0"],
                 ["--rungs", str(len(ladder.RUNGS) + 1)], ["--cfg-scale", "-1"]):
        with pytest.raises(UserError):  # refused before any training
            ladder.main(args)
    with pytest.raises(SystemExit) as exit_:
        ladder.main(["--device", "tpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_stopped_ladder_keeps_its_rows_stops_and_resumes(tmp_path, monkeypatch, capsys):
    import dataclasses
    import json

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    monkeypatch.setattr(ladder, "evaluate", lambda images, labels=None: {
        "fid": float(images.float().mean()), "fid_floor": 1.0, "label_accuracy": 0.1})
    real = ladder.train_main
    # rung 0 stops at step 3 on its way to 4, as a Ctrl-C makes it: checkpoint saved, train_main returns
    monkeypatch.setattr(ladder, "train_main", lambda cfg: real(dataclasses.replace(cfg, stop_at=3)))
    args = ["--preset", "smoke", "--eval-at", "2", "4", "--num-samples", "10", "--sample-steps", "2", "--rungs", "2",
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        ladder.main(args)
    assert exit_.value.code == 130  # the whole ladder stops: rung 1 never starts
    said = capsys.readouterr()
    assert "python ladder.py" in said.err and "--resume" in said.err  # how to continue the ladder ...
    assert "train.py --resume" not in said.out + said.err  # ... not the one rung, which would go unscored
    out = tmp_path / "04_dit" / "ladder"
    rows = json.loads((out / "ladder.json").read_text())  # the row scored before the stop is kept ...
    assert [(r["rung"], r["step"]) for r in rows] == [(ladder.RUNGS[0][0], 2)]  # ... and step 3 is not scored as 4
    assert not (tmp_path / "04_dit" / "ladder-1").exists()
    with pytest.raises(UserError, match="--resume.*--name"):  # the same command again: told what to do, up front
        ladder.main(args)
    monkeypatch.setattr(ladder, "train_main", real)
    rows = ladder.main(args + ["--resume"])
    assert [(r["rung"], r["step"]) for r in rows] == [(name, s) for name, _ in ladder.RUNGS[:2] for s in (2, 4)]


@pytest.mark.parametrize("objective, sampler", [("flow", "heun"), ("ddpm", "ddim")])
def test_draw_hands_its_steps_scale_and_labels_to_the_sampler(monkeypatch, objective, sampler):
    """draw(): n samples in batches of 500, each drawn by the objective's deterministic sampler with the given steps,
    guidance scale and the labels 0..9, 0..9, ... that it returns; the images are the sampler's outputs, in order."""
    from types import SimpleNamespace

    import torch
    from train import TrainConfig

    from shared.images import to_uint8

    calls = []

    def spy(model, noise, y, objective, sampler, steps, cfg_scale, null_class, generator=None):
        calls.append(dict(noise=noise, y=y, args=(objective, sampler, steps, cfg_scale, null_class)))
        return noise.clamp(-1, 1)

    monkeypatch.setattr(ladder, "sample", spy)
    ema = torch.nn.Linear(1, 1)
    ema.cfg = SimpleNamespace(num_classes=10)
    images, labels = ladder.draw(ema, TrainConfig(objective=objective), 1005, steps=3, cfg_scale=1.7)
    assert [len(c["y"]) for c in calls] == [500, 500, 5]
    assert all(c["args"] == (objective, sampler, 3, 1.7, 10) for c in calls)
    assert labels.tolist() == [i % 10 for i in range(1005)]
    assert torch.equal(torch.cat([c["y"] for c in calls]), labels)
    assert torch.equal(images, to_uint8(torch.cat([c["noise"] for c in calls])))
