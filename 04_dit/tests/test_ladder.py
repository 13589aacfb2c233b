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
    import shared.metrics

    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    seen = []

    def fake_evaluate(images, labels=None):  # the real metric needs the shared classifier's weights
        seen.append(images.shape)
        return {"fid": float(images.float().mean()), "fid_floor": 1.0, "label_accuracy": 0.1}

    monkeypatch.setattr(shared.metrics, "evaluate", fake_evaluate)
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
