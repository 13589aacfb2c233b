"""gpu_full.py's guards for the device tool's limits: a 10-minute command, 8 files of 16 MiB back."""

import json
import os
import sys
import tarfile
import time
from pathlib import Path

import gpu_full
import pytest


def test_a_plan_over_the_budget_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_full.main(["--out", str(tmp_path), "--device", "cpu", "04_dit:4", "03_ddpm:3", "02_gan:3:dcgan-full"])
    assert exit_.value.code == 2
    assert "make 13, over --budget-minutes 9" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_late_stage_trains_for_what_is_left_of_the_budget(tmp_path, monkeypatch):
    clock, trained = [0.0], []

    def fake_run(cmd, cwd, log, env, deadline):  # each training takes 7.5 minutes of the clock, then "fails"
        trained.append(cmd[cmd.index("--max-minutes") + 1])
        clock[0] += 450
        raise RuntimeError("no training here")

    monkeypatch.setattr(gpu_full, "run", fake_run)
    monkeypatch.setattr(gpu_full.time, "monotonic", lambda: clock[0])
    code = gpu_full.main(["--out", str(tmp_path), "--device", "cpu", "02_gan:2", "03_ddpm:2", "01_vae:2"])
    # 9 - 7.5 elapsed - 2 reserves < 0 for the second stage: skipped; the third needs only its own reserve
    assert code == 1 and trained == ["2.0", "0.5"]
    assert (tmp_path / "summary.json").read_text().count("skipped: the budget is spent") == 1
    clock[0], trained[:] = 0.0, []
    gpu_full.main(["--out", str(tmp_path / "b"), "--device", "cpu", "--budget-minutes", "10", "02_gan:2", "03_ddpm:2"])
    assert trained == ["2.0", "1.5"]  # 10 - 7.5 elapsed - its reserve of 1


def test_a_failed_command_carries_the_end_of_its_log(tmp_path):
    with open(tmp_path / "log.txt", "w") as log, pytest.raises(RuntimeError, match="the real cause"):
        gpu_full.run([sys.executable, "-c", "print('starting'); raise SystemExit('the real cause')"], tmp_path, log)


def test_the_checkpoint_travels_unless_it_would_push_the_archive_over_the_limit(tmp_path):
    run = tmp_path / "04_dit" / "04_dit" / "gpu"
    run.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(os.urandom(20_000))  # random bytes: gzip cannot shrink them
    (run / "metrics.jsonl").write_text("{}\n")
    samples = tmp_path / "04_dit" / "samples.npz"
    samples.write_bytes(b"0" * 1000)
    archive = tmp_path / "04_dit.tar.gz"

    def names():
        with tarfile.open(archive) as tar:
            return tar.getnames()

    # under the limit: the checkpoint travels and reproduces the samples, which stay behind
    assert gpu_full.pack_stage(tmp_path / "04_dit", archive, run / "ckpt.pt", samples, limit=30_000)
    assert "04_dit/04_dit/gpu/ckpt.pt" in names() and "04_dit/samples.npz" not in names()
    # over it: the samples travel instead, beside the metrics
    assert not gpu_full.pack_stage(tmp_path / "04_dit", archive, run / "ckpt.pt", samples, limit=10_000)
    assert {"04_dit/samples.npz", "04_dit/04_dit/gpu/metrics.jsonl"} <= set(names())
    assert not any(n.endswith("ckpt.pt") for n in names())


def test_a_command_still_running_at_the_deadline_is_killed(tmp_path):
    t0 = time.monotonic()
    with open(tmp_path / "log.txt", "w") as log, pytest.raises(RuntimeError, match="killed at the end of"):
        gpu_full.run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, log, deadline=t0 + 2)
    assert time.monotonic() - t0 < 30


def test_parallel_runs_are_budgeted_by_the_longest_one_and_get_their_own_flags(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):  # 5 + 4.5 > 9: the longest training plus the one shared reserve
        gpu_full.main(["--out", str(tmp_path), "--device", "cpu", "--parallel", "--reserve-minutes", "4.5",
                       "02_gan:5", "03_ddpm:1"])
    assert "the longest training's 5 minutes plus 4.5 for sampling and scoring make 9.5" in capsys.readouterr().err
    calls = []

    def fake_run(cmd, cwd, log, env, deadline):
        calls.append((cwd.name, cmd, env))
        raise RuntimeError("no training here")

    monkeypatch.setattr(gpu_full, "run", fake_run)
    code = gpu_full.main(["--out", str(tmp_path), "--device", "cpu", "--parallel", "--reserve-minutes", "4",
                          "02_gan:5:dcgan-full", "05_multimodal:4:full:--clip-steps 2000 --lr 1e-4"])
    assert code == 1 and len(calls) == 2  # both started, each failed alone
    by_stage = {stage: (cmd, env) for stage, cmd, env in calls}
    cmd, env = by_stage["05_multimodal"]
    assert cmd[-4:] == ["--clip-steps", "2000", "--lr", "1e-4"] and cmd[cmd.index("--max-minutes") + 1] == "4.0"
    assert env["SCRATCHGEN_EXPERIMENTS"].endswith("05_multimodal") and int(env["OMP_NUM_THREADS"]) >= 1
    assert by_stage["02_gan"][1]["SCRATCHGEN_EXPERIMENTS"].endswith("02_gan-dcgan-full")
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(r["stage"] for r in rows) == ["02_gan", "05_multimodal"]
    assert {r["flags"] for r in rows} == {"", "--clip-steps 2000 --lr 1e-4"}


@pytest.mark.parametrize("flag, message", [(["--samples", "01_vae=0"], "expected STAGE=N"),
                                           (["--samples", "06_x=5"], "expected STAGE=N"),
                                           (["02_gan:1", "02_gan:2"], "02_gan runs twice")])
def test_bad_per_stage_settings_are_one_line_errors(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_:
        gpu_full.main(["--out", str(tmp_path / "o"), "--device", "cpu", *flag, *(["01_vae:1"] if "--samples" in flag
                                                                                  else [])])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_sampling_alone_gets_tf32_and_a_stage_gets_its_own_sample_count(tmp_path, monkeypatch):
    envs = {}

    def fake_run(cmd, cwd, log, env, deadline):
        if cmd[1] == "train.py":  # leave what a finished training leaves
            run_dir = Path(env["SCRATCHGEN_EXPERIMENTS"]) / cwd.name / "gpu"
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text('{"batch_size": 8}')
            (run_dir / "metrics.jsonl").write_text('{"step": 5, "time": 1.0}\n')
        else:
            envs[cmd[1]] = (cmd, env)
            Path(cmd[cmd.index("--json") + 1] if "--json" in cmd else "/dev/null").write_text("{}")
        return 1.0

    monkeypatch.setattr(gpu_full, "run", fake_run)
    assert gpu_full.main(["--out", str(tmp_path), "--device", "cpu", "--samples", "04_dit=123", "04_dit:1"]) == 0
    sample_cmd, sample_env = envs["sample.py"]
    assert sample_cmd[sample_cmd.index("--num-samples") + 1] == "123"
    assert sample_env.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1"
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" not in envs["-m"][1]  # shared.evaluate's features stay float32
    assert json.loads((tmp_path / "summary.json").read_text())[0]["eval_samples"] == 123
