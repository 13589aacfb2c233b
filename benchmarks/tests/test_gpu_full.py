"""gpu_full.py's guards for the device tool's limits: a 10-minute command, 8 files of 16 MiB back."""

import sys
import tarfile

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

    def fake_run(cmd, cwd, log):  # each training takes 7.5 minutes of the clock, then "fails" (no outputs)
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


def test_pack_leaves_out_the_checkpoint_it_is_told_to(tmp_path):
    run = tmp_path / "04_dit" / "04_dit" / "gpu"
    run.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(b"0" * 100)
    (run / "metrics.jsonl").write_text("{}\n")
    archive = gpu_full.pack(tmp_path / "04_dit", tmp_path / "04_dit.tar.gz", leave_out=run / "ckpt.pt")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "04_dit/04_dit/gpu/metrics.jsonl" in names and not any(n.endswith("ckpt.pt") for n in names)
