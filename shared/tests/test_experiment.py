import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import toy_train

from shared import UserError
from shared.checkpoint import save_checkpoint
from shared.cli import (
    SEED_MAX,
    TrainingDiverged,
    arg,
    build_parser,
    check_seed,
    config_from_preset,
    output_dir,
    output_file,
    parse_config,
    run_entry,
    train_entry,
    validate,
)
from shared.experiment import Run, find_checkpoint, resolve_resume
from shared.images import read_metrics
from shared.testing import checkpoints_equal, run_interrupted_and_straight, run_script, same_training

TOY = Path(toy_train.__file__)


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    return config_from_preset(toy_train.TrainConfig, toy_train.PRESETS, "smoke", device="cpu")


def test_resume_is_bit_identical(smoke, tmp_path):
    straight, resumed = run_interrupted_and_straight(toy_train.main, smoke, stop_at=13, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 30
    assert checkpoints_equal(straight, resumed, keys=("model", "optimizer"))
    rows = [json.loads(line) for line in (tmp_path / "00_toy/resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))  # nothing logged twice across the resume


def test_resume_inside_a_logging_window_logs_the_rows_of_a_straight_run(smoke, tmp_path):
    """Stopped at step 13 with a row every 4 steps: the checkpoint carries the open window (step 13), so the
    resumed run's row at 16 averages steps 13-16 as the straight run's does, and no extra row at 13 remains."""
    cfg = dataclasses.replace(smoke, log_every=4)
    straight, resumed = run_interrupted_and_straight(toy_train.main, cfg, stop_at=13, experiments=tmp_path)
    assert same_training(straight, resumed) == []  # weights, RNG, the window and the row count
    rows = {name: [{k: v for k, v in json.loads(line).items() if k != "time"}
                   for line in (tmp_path / f"00_toy/{name}/metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    assert [r["step"] for r in rows["straight"]] == [4, 8, 12, 16, 20, 24, 28, 30]  # 29-30: written at the end
    assert rows["resumed"] == rows["straight"]  # bit for bit: the same steps summed in the same order


def test_resume_without_the_straight_run_differs(smoke, tmp_path):
    """The check above can fail: a resume that forgets the RNG state does not end bit-identical."""
    toy_train.main(dataclasses.replace(smoke, run_name="a"))
    toy_train.main(dataclasses.replace(smoke, run_name="b", stop_at=13))
    ckpt_path = tmp_path / "00_toy/b/ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["rng"]["torch"] = torch.manual_seed(123).get_state()
    torch.save(ckpt, ckpt_path)
    toy_train.main(dataclasses.replace(smoke, run_name="b", resume="auto"))
    load = lambda name: torch.load(tmp_path / f"00_toy/{name}/ckpt.pt", weights_only=True)  # noqa: E731
    assert not checkpoints_equal(load("a"), load("b"))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(smoke, tmp_path):
    cfg = dataclasses.replace(smoke, run_name="nan", ckpt_every=10, nan_at=15)
    with pytest.raises(TrainingDiverged, match="loss = nan at step 15"):
        toy_train.main(cfg)
    assert torch.load(tmp_path / "00_toy/nan/ckpt.pt", weights_only=True)["step"] == 10


def test_an_existing_run_is_not_overwritten(smoke):
    toy_train.main(dataclasses.replace(smoke, run_name="once", steps=2))
    with pytest.raises(UserError, match="already holds a run"):
        toy_train.main(dataclasses.replace(smoke, run_name="once", steps=2))


def test_run_and_resume_mistakes_are_refused_before_anything_is_written(smoke, tmp_path):
    for name in ("../escaped", str(tmp_path / "absolute")):
        with pytest.raises(UserError, match="not a path out of it"):
            toy_train.main(dataclasses.replace(smoke, run_name=name, steps=2))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()
    with pytest.raises(UserError, match="batch"):  # a mistake found inside the run, before its first checkpoint
        toy_train.main(dataclasses.replace(smoke, run_name="too_big", batch_size=10 ** 6))
    assert not (tmp_path / "00_toy" / "too_big").exists()  # leaves no folder that looks like a run
    toy_train.main(dataclasses.replace(smoke, run_name="done", steps=4))
    with pytest.raises(UserError, match="--steps 2 is below the step 4"):
        toy_train.main(dataclasses.replace(smoke, run_name="done", steps=2, resume="auto"))
    assert json.loads((tmp_path / "00_toy/done/config.json").read_text())["steps"] == 4  # not rewritten
    exported = tmp_path / "exported" / "weights.pt"  # weights only, as pretrained/mnist.pt: nothing to resume
    exported.parent.mkdir()
    ckpt = torch.load(tmp_path / "00_toy/done/ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, exported)
    with pytest.raises(UserError, match="holds no 'optimizer' state"):
        toy_train.main(dataclasses.replace(smoke, resume=str(exported)))
    assert sorted(p.name for p in exported.parent.iterdir()) == ["weights.pt"]  # no config.json beside it


def test_a_resumed_run_records_the_folder_it_continues_in(smoke, tmp_path, monkeypatch):
    toy_train.main(dataclasses.replace(smoke, run_name="here", stop_at=5))
    toy_train.main(dataclasses.replace(smoke, run_name="elsewhere", resume=str(tmp_path / "00_toy/here"), stop_at=8))
    assert json.loads((tmp_path / "00_toy/here/config.json").read_text())["run_name"] == "here"
    assert not (tmp_path / "00_toy/elsewhere").exists()
    monkeypatch.chdir(tmp_path)  # a path relative to the working directory names the same run
    toy_train.main(dataclasses.replace(smoke, resume="00_toy/here", stop_at=12))
    assert json.loads((tmp_path / "00_toy/here/config.json").read_text())["run_name"] == "here"
    assert toy_train.main(dataclasses.replace(smoke, run_name="here", resume="auto")).step == smoke.steps


def test_resume_takes_the_checkpoint_config_and_explicit_flags_win(smoke, tmp_path):
    toy_train.main(dataclasses.replace(smoke, run_name="r", width=24, stop_at=5, max_minutes=5.0,
                                       channels_last=True))
    cfg = parse_config(toy_train.TrainConfig, toy_train.PRESETS, "00_toy", ["--resume", "auto", "--run-name", "r",
                                                                          "--steps", "40"])
    assert cfg.width == 24 and cfg.steps == 40 and cfg.stop_at == 0 and cfg.dataset == "synthetic"
    # what one invocation asked for is not inherited (an inherited --max-minutes would stop every resume early)
    assert cfg.max_minutes == 0 and cfg.device == "auto" and not cfg.channels_last


def test_resuming_at_the_stop_at_step_trains_no_further(smoke, tmp_path, capsys):
    toy_train.main(dataclasses.replace(smoke, run_name="s", stop_at=5, channels_last=True))
    hint = capsys.readouterr().out.strip().splitlines()[-1]  # what to run next repeats this invocation's layout
    assert hint == f"continue with: python train.py --resume {tmp_path / '00_toy/s/ckpt.pt'} --channels-last " \
                   "--device cpu"
    run = toy_train.main(dataclasses.replace(smoke, run_name="s", resume="auto", stop_at=5))
    assert run.step == 5 and run.stop_reason == "--stop-at 5"
    assert torch.load(tmp_path / "00_toy/s/ckpt.pt", weights_only=True)["step"] == 5


def test_find_checkpoint(smoke, tmp_path):
    with pytest.raises(UserError, match="no checkpoint of 00_toy"):
        find_checkpoint("00_toy", tmp_path)
    toy_train.main(dataclasses.replace(smoke, run_name="x", steps=2))
    assert find_checkpoint("00_toy", tmp_path) == tmp_path / "00_toy/x/ckpt.pt"
    toy_train.main(dataclasses.replace(smoke, run_name="fig2/z20", steps=2))  # a run name may have folders
    assert find_checkpoint("00_toy", tmp_path) == tmp_path / "00_toy/fig2/z20/ckpt.pt"


@pytest.mark.parametrize("flags,message", [
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--resume", "no/such.pt"], "no checkpoint at no/such.pt"),
])
def test_cli_errors_are_one_line_and_exit_2(smoke, flags, message, capsys, monkeypatch):
    code, err = toy_cli(capsys, monkeypatch, "--preset", "smoke", *flags)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and message in err


def toy_cli(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    """The toy's ``python train.py argv...`` for a run that must exit, in this process and through the entry
    point every train.py ends with (a subprocess per case would cost seconds of imports; the test below keeps
    one): its exit code and what it wrote to stderr."""
    monkeypatch.setattr(sys, "argv", [str(TOY), *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_entry(toy_train.main, toy_train.TrainConfig, toy_train.PRESETS, "00_toy")
    return exit_.value.code, capsys.readouterr().err


def test_foreign_checkpoint_is_refused_from_the_cli(tmp_path):
    torch.save({"stage": "02_gan", "config": {}}, tmp_path / "gan.pt")
    proc = run_script(TOY, "--resume", str(tmp_path / "gan.pt"), experiments=tmp_path)
    assert proc.returncode == 2 and "stage 02_gan, not 00_toy" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_exits_with_128_plus_its_number(tmp_path, sig):
    """Ctrl-C or SIGTERM: the step ends, the checkpoint and samples are written, and the exit code is 130 or 143
    (not 0), so a shell's ``train.py && sample.py`` does not go on as if the training had finished."""
    cmd = [sys.executable, str(TOY), "--preset", "smoke", "--steps", "100000", "--sleep", "0.01",
           "--run-name", "sig", "--ckpt-every", "0"]
    proc = subprocess.Popen(cmd, cwd=TOY.parent, env={**__import__("os").environ,
                                                      "SCRATCHGEN_EXPERIMENTS": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "00_toy/sig/metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-1000:]
    ckpt = torch.load(tmp_path / "00_toy/sig/ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 100000 and f"stopped early ({sig.name})" in out and "Traceback" not in err
    assert (tmp_path / "00_toy/sig/samples/final.png").exists()


def test_scalars_logged_now_and_then_are_averaged_over_their_own_steps(smoke, tmp_path):
    from shared.experiment import Run

    cfg = dataclasses.replace(smoke, run_name="avg", log_every=4, steps=4)
    with Run("00_toy", cfg) as run:
        for step in run.steps():
            run.log(step, loss=float(step), **({"rare": 10.0} if step == 2 else {}))
    row = json.loads((tmp_path / "00_toy/avg/metrics.jsonl").read_text())
    assert row["loss"] == 2.5 and row["rare"] == 10.0
    with Run("00_toy", dataclasses.replace(smoke, run_name="avg8", log_every=4, steps=8)) as run:
        for step in run.steps():
            run.log(step, loss=float(step), **({"rare": 10.0} if step == 2 else {}))
    rows = [json.loads(r) for r in (tmp_path / "00_toy/avg8/metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] == 6.5 and "rare" not in rows[1]  # each window starts afresh


def test_non_finite_weights_are_never_saved(smoke, tmp_path):
    """A finite loss can precede a step that made the weights NaN: the checkpoint keeps the last good ones."""
    from shared.experiment import Run

    model = torch.nn.Linear(2, 2)
    with Run("00_toy", dataclasses.replace(smoke, run_name="nanw")) as run:
        run.step = 3
        run.save_checkpoint(model=model)
        with torch.no_grad():
            model.weight[0, 0] = float("inf")
        run.step = 4
        with pytest.raises(TrainingDiverged, match="model has non-finite weights at step 4; the last good"):
            run.save_checkpoint(model=model)
    assert torch.load(tmp_path / "00_toy/nanw/ckpt.pt", weights_only=True)["step"] == 3


def test_checkpoints_carry_the_git_hash_of_the_runs_start(smoke, tmp_path, monkeypatch):
    import shared.checkpoint
    from shared.experiment import Run

    with Run("00_toy", dataclasses.replace(smoke, run_name="git")) as run:
        monkeypatch.setattr(shared.checkpoint, "git_hash", lambda: "edited-since")  # the tree changes mid-run
        run.save_checkpoint(model=torch.nn.Linear(1, 1))
    saved = torch.load(tmp_path / "00_toy/git/ckpt.pt", weights_only=True)["git_hash"]
    assert saved == run.git_hash and saved != "edited-since"


def _log_on_rank(rank: int, store: str, experiments: str, out: str):
    import os

    from shared.experiment import Run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), SCRATCHGEN_EXPERIMENTS=experiments)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = config_from_preset(toy_train.TrainConfig, toy_train.PRESETS, "smoke", device="cpu", run_name="ddp")
    seen = {}
    with Run("00_toy", cfg) as run:
        seen["init"] = torch.randn(3)  # what building the models draws: the same on every rank
        run.restore()
        seen["noise"] = torch.randn(3)  # the training noise after restore: each rank its own
        run.log(1, loss=float(rank))  # log_every = 1: a row now, averaged over both ranks
        try:
            run.log(2, loss=float("nan") if rank == 1 else 0.0)  # one rank's NaN stops both
        except TrainingDiverged as err:
            seen["diverged"] = str(err)
    torch.save(seen, f"{out}.{rank}")


def test_under_ddp_rows_average_all_ranks_and_models_start_equal(tmp_path):
    torch.multiprocessing.spawn(_log_on_rank, args=(str(tmp_path / "store"), str(tmp_path), str(tmp_path / "seen")),
                                nprocs=2)
    seen = [torch.load(tmp_path / f"seen.{r}", weights_only=True) for r in (0, 1)]
    assert torch.equal(seen[0]["init"], seen[1]["init"]) and not torch.equal(seen[0]["noise"], seen[1]["noise"])
    assert not any(torch.equal(s["init"], s["noise"]) for s in seen)  # no rank replays the draws that built weights
    rows = [json.loads(line) for line in (tmp_path / "00_toy/ddp/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 0.5  # the mean of rank 0's 0 and rank 1's 1
    assert all("loss = nan at step 2" in s["diverged"] for s in seen)


def test_channels_last_reorders_conv_weights_in_place_and_computes_the_same(smoke):
    from shared.experiment import Run

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2))
    params, x = list(net.parameters()), torch.randn(2, 3, 16, 16)
    before = net(x)
    with Run("00_toy", dataclasses.replace(smoke, run_name="cl", channels_last=True, steps=1)) as run:
        wrapped = run.wrap(net)
    assert wrapped is net and list(net.parameters()) == params  # the optimizer's tensors, not copies
    convs = [m.weight for m in net if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert net[0](x).is_contiguous(memory_format=torch.channels_last)  # NCHW input, NHWC activations
    torch.testing.assert_close(net(x), before)


def test_a_stage_can_add_presets_of_its_own(capsys):
    presets = {**toy_train.PRESETS, "paper": dict(steps=7)}
    cfg = parse_config(toy_train.TrainConfig, presets, "00_toy", ["--preset", "paper"])
    assert (cfg.preset, cfg.steps) == ("paper", 7)
    with pytest.raises(SystemExit):  # a stage without it refuses it, as a bad choice
        parse_config(toy_train.TrainConfig, toy_train.PRESETS, "00_toy", ["--preset", "paper"])
    assert "invalid choice: 'paper'" in capsys.readouterr().err


def test_a_bad_choice_is_one_line(smoke, capsys, monkeypatch):
    code, err = toy_cli(capsys, monkeypatch, "--device", "tpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_resuming_a_snapshot_beside_the_runs_newer_checkpoint_is_refused(smoke, tmp_path):
    toy_train.main(dataclasses.replace(smoke, run_name="snap", steps=20, stop_at=10))
    run_dir = tmp_path / "00_toy/snap"
    shutil.copy(run_dir / "ckpt.pt", run_dir / "ckpt-10.pt")
    toy_train.main(dataclasses.replace(smoke, run_name="snap", steps=20, resume="auto"))
    with pytest.raises(UserError, match="would overwrite"):
        toy_train.main(dataclasses.replace(smoke, steps=15, resume=str(run_dir / "ckpt-10.pt")))
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 20


def test_a_new_run_does_not_inherit_the_metrics_of_one_that_died_before_its_first_checkpoint(smoke, tmp_path):
    with pytest.raises(TrainingDiverged):
        toy_train.main(dataclasses.replace(smoke, run_name="again", ckpt_every=0, nan_at=6))
    toy_train.main(dataclasses.replace(smoke, run_name="again", steps=3))
    rows = [json.loads(line) for line in (tmp_path / "00_toy/again/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@dataclass
class _Bounded:
    p: float = arg(0.5, "a probability", max=1.0)
    seed: int = arg(0, "a seed", max=SEED_MAX)


@pytest.mark.parametrize("values,message", [
    (dict(p=1.5), "--p must be at most 1.0"),
    (dict(p=-0.1), "--p must be at least 0"),
    (dict(p=float("nan")), "--p must be a finite number"),
    (dict(seed=2**63), "--seed must be at most"),
])
def test_validate_enforces_bounds_finiteness_and_the_seed_range(values, message):
    validate(_Bounded(p=1.0, seed=2**63 - 1))
    with pytest.raises(UserError, match=message):
        validate(_Bounded(**values))


def test_every_stage_and_script_refuses_a_seed_torch_cannot_take(smoke):
    with pytest.raises(UserError, match="--seed must be at most"):
        validate(dataclasses.replace(smoke, seed=SEED_MAX + 1))  # CommonConfig's --seed
    check_seed(SEED_MAX)
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(UserError, match="--seed must be in"):
            check_seed(bad)


def test_output_paths_are_checked_before_the_work(tmp_path):
    assert output_file(tmp_path / "new" / "deep" / "x.json", "--json") == tmp_path / "new" / "deep" / "x.json"
    assert (tmp_path / "new" / "deep").is_dir()  # made now, so the write at the end can't fail on it
    (tmp_path / "afile").write_text("")
    for bad, match in ((tmp_path, "a folder, not a file path"), (tmp_path / "afile" / "x.json", "can.t create")):
        with pytest.raises(UserError, match=match):
            output_file(bad, "--json")
    assert output_dir(tmp_path / "figs", "--out").is_dir()
    with pytest.raises(UserError, match="--out .*afile: can't create this folder"):
        output_dir(tmp_path / "afile", "--out")
    if Path("/proc/sys").is_dir():  # read-only even for root, whom os.access would let through
        with pytest.raises(UserError, match="not a writable folder"):
            output_dir("/proc/sys", "--out")
        with pytest.raises(UserError, match="not a writable file path"):
            output_file("/proc/x.npz", "--out")


def test_sample_outputs_and_sample_counts_are_checked_before_sampling(tmp_path):
    import argparse

    from shared.cli import MAX_SAMPLES, add_sample_args, check_sample_args, sample_outputs

    ckpt = tmp_path / "run" / "ckpt.pt"
    assert sample_outputs("", ckpt) == (tmp_path / "run" / "samples.npz", tmp_path / "run" / "samples.png")
    (tmp_path / "run" / "samples.png").mkdir(parents=True)  # the default grid's name is taken by a folder
    with pytest.raises(UserError, match="its .png grid"):
        sample_outputs("", ckpt)
    with pytest.raises(UserError, match="a folder"):
        sample_outputs(str(tmp_path / "run"), ckpt)
    parser = add_sample_args(argparse.ArgumentParser())
    for n in ("0", str(MAX_SAMPLES + 1), "99999999999999999999"):
        with pytest.raises(UserError, match="--num-samples must be between 1 and 10,000,000"):
            check_sample_args(parser.parse_args(["--num-samples", n]))
    check_sample_args(parser.parse_args(["--num-samples", str(MAX_SAMPLES)]))


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        run_entry(interrupted)
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_batches_come_in_the_order_the_runs_seed_fixes(smoke):
    """Run.batches shuffles with cfg.seed: two seeds, two orders; a seed, one order (epoch 0's permutation)."""
    images, labels = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1), torch.arange(64)

    def first_labels(seed: int, name: str) -> list[int]:
        with Run(toy_train.STAGE, dataclasses.replace(smoke, seed=seed, run_name=name)) as run:
            batches = run.batches(images, labels, 16)
            return [int(i) for _ in range(4) for i in next(batches)[1]]  # one epoch

    seed_3 = first_labels(3, "a")
    assert sorted(seed_3) == list(range(64))
    assert seed_3 == first_labels(3, "b") != first_labels(4, "c")
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist()  # DistributedSampler's
    assert seed_3 == permutation


def test_max_minutes_counts_minutes(smoke, monkeypatch):
    """--max-minutes 0.5 on a clock that advances 10 s per step stops after the step that passes 30 s."""
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with Run(toy_train.STAGE, dataclasses.replace(smoke, max_minutes=0.5, steps=100)) as run:
        clock[0] = 1000.0  # setting up (data, model) took long: the budget is for training, counted from here
        for step in run.steps():
            clock[0] = 1000.0 + 10.0 * step
    assert run.step == 4 and run.stop_reason == "--max-minutes 0.5"


def test_run_entry_exit_codes(capsys):
    def diverge():
        raise TrainingDiverged("loss is nan at step 3")

    def mistake():
        raise UserError("--steps must be at least 1")

    for fn, code, line in ((diverge, 1, "error: training diverged: loss is nan at step 3"),
                           (mistake, 2, "error: --steps must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            run_entry(fn)
        assert exit_.value.code == code and capsys.readouterr().err.strip() == line


def test_a_run_on_cuda_allows_tf32(smoke, monkeypatch):
    """No GPU here: the device is only named. Training on CUDA lets float32 matmuls use TF32 (runtime.allow_tf32)."""
    before = torch.get_float32_matmul_precision()
    monkeypatch.setattr("shared.experiment.choose_device", lambda name: torch.device("cuda"))
    try:
        Run(toy_train.STAGE, smoke)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_resuming_a_checkpoint_without_a_row_count_cuts_the_metrics_at_its_step(smoke, tmp_path):
    """A checkpoint from before ``metrics_rows`` was saved: rows logged after its step are dropped, the rest kept."""
    toy_train.main(dataclasses.replace(smoke, run_name="old", stop_at=13))
    run_dir = tmp_path / "00_toy/old"
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    del ckpt["metrics_rows"], ckpt["log_window"]
    torch.save(ckpt, run_dir / "ckpt.pt")
    with open(run_dir / "metrics.jsonl", "a") as f:  # what the run logged after this checkpoint, before it died
        f.writelines(json.dumps({"step": step, "loss": 99.0}) + "\n" for step in (14, 15))
    toy_train.main(dataclasses.replace(smoke, run_name="old", resume="auto"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31)) and all(r["loss"] != 99.0 for r in rows)
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["metrics_rows"] == 30


def test_a_resume_rewrites_config_json_with_the_config_it_continues_with(smoke, tmp_path):
    """After a resume, config.json (and the checkpoint) hold the new flags and the folder's name as run_name."""
    toy_train.main(dataclasses.replace(smoke, run_name="cfg", stop_at=5))
    toy_train.main(dataclasses.replace(smoke, run_name="other", resume=str(tmp_path / "00_toy/cfg"), steps=40,
                                       stop_at=8))
    saved = json.loads((tmp_path / "00_toy/cfg/config.json").read_text())
    assert (saved["steps"], saved["stop_at"], saved["run_name"]) == (40, 8, "cfg")
    assert torch.load(tmp_path / "00_toy/cfg/ckpt.pt", weights_only=True)["config"] == saved
    moved = tmp_path / "moved"  # a run copied out of experiments/: its run_name is the folder's path
    shutil.copytree(tmp_path / "00_toy/cfg", moved)
    toy_train.main(dataclasses.replace(smoke, resume=str(moved), steps=40, stop_at=10))
    assert json.loads((moved / "config.json").read_text())["run_name"] == str(moved)


def test_a_nan_in_the_open_logging_window_stops_the_save(smoke, tmp_path):
    """A NaN logged since the last row is checked at save time, not written: the last good checkpoint stays."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TrainingDiverged, match="loss = nan at step 4; the last good checkpoint is"):
        with Run("00_toy", dataclasses.replace(smoke, run_name="nanwin", log_every=10)) as run:
            run.step = 3
            run.log(3, loss=torch.tensor(1.5))
            run.save_checkpoint(model=model)
            run.step = 4
            run.log(4, loss=torch.tensor(float("nan")))
            run.save_checkpoint(model=model)
    ckpt = torch.load(tmp_path / "00_toy/nanwin/ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["log_window"]["counts"] == {"loss": 1} and ckpt["metrics_rows"] == 0
    assert not (tmp_path / "00_toy/nanwin/metrics.jsonl").exists()  # the open window was carried, not logged


def test_find_checkpoint_prefers_the_newest_run_over_the_pretrained_weights(smoke, tmp_path):
    """sample.py's checkpoint: --ckpt (a file or a run folder) if given, else the stage's newest run, else
    pretrained/mnist.pt."""
    stage_dir = tmp_path / "stage"
    pretrained = save_checkpoint({"stage": "00_toy"}, stage_dir / "pretrained" / "mnist.pt")
    assert find_checkpoint("00_toy", stage_dir) == pretrained
    run = save_checkpoint({"stage": "00_toy"}, tmp_path / "00_toy" / "x" / "ckpt.pt")
    assert find_checkpoint("00_toy", stage_dir) == run
    assert find_checkpoint("00_toy", stage_dir, str(pretrained)) == pretrained
    assert find_checkpoint("00_toy", stage_dir, str(run.parent)) == run
    with pytest.raises(UserError, match="--ckpt .*nope.pt: no such checkpoint"):
        find_checkpoint("00_toy", stage_dir, str(tmp_path / "nope.pt"))


def test_validate_refuses_a_value_outside_the_choices_in_one_line(smoke, capsys):
    """A choice that did not pass argparse (a preset's, a resumed config's) is refused by validate: exit code 2."""
    validate(smoke)
    with pytest.raises(UserError, match="--dataset must be one of mnist, fashion-mnist, synthetic, got 'svhn'"):
        validate(dataclasses.replace(smoke, dataset="svhn"))
    presets = {**toy_train.PRESETS, "odd": dict(dataset="svhn")}
    with pytest.raises(SystemExit) as exit_:
        run_entry(parse_config, toy_train.TrainConfig, presets, "00_toy", ["--preset", "odd"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --dataset must be one of mnist, fashion-mnist, synthetic, got 'svhn'"]


def test_resume_auto_takes_the_named_run_else_the_newest_and_none_when_there_is_none(smoke, tmp_path):
    """--resume auto: the run --run-name names (None if it has no checkpoint yet), else the stage's newest run."""
    newer = save_checkpoint({"stage": "00_toy"}, tmp_path / "00_toy/a/ckpt.pt")
    older = save_checkpoint({"stage": "00_toy"}, tmp_path / "00_toy/b/ckpt.pt")
    os.utime(older, (1, 1))  # by time, not by name
    assert resolve_resume("00_toy", "b", "auto") == older and resolve_resume("00_toy", "", "auto") == newer
    assert resolve_resume("00_toy", "c", "auto") is None and resolve_resume("00_toy", "b", "") is None
    cfg = parse_config(toy_train.TrainConfig, toy_train.PRESETS, "00_toy",
                       ["--preset", "smoke", "--resume", "auto", "--run-name", "c"])
    assert cfg.run_name == "c" and cfg.resume == "auto"  # nothing to resume yet: a new run of that name
    assert Run("00_toy", cfg).resume_from is None and (tmp_path / "00_toy/c/config.json").is_file()


def test_resume_leaves_out_per_invocation_flags_and_fields_the_stage_no_longer_has(smoke, tmp_path):
    """A resumed config takes the saved fields the config class still has, never --compile and the like."""
    saved = {**dataclasses.asdict(smoke), "width": 24, "compile": True, "dropped_flag": 3}
    save_checkpoint({"stage": "00_toy", "config": saved}, tmp_path / "00_toy/r/ckpt.pt")
    cfg = parse_config(toy_train.TrainConfig, toy_train.PRESETS, "00_toy", ["--resume", "auto", "--run-name", "r"])
    assert cfg.width == 24 and not cfg.compile and cfg.preset == "smoke"
    assert not hasattr(cfg, "dropped_flag")


def test_restore_returns_the_step_reached_and_refuses_weights_of_another_shape(smoke, tmp_path):
    """restore() gives the resumed step (0 for a new run); a checkpoint of another architecture is a UserError."""
    with Run("00_toy", dataclasses.replace(smoke, run_name="r", steps=3)) as run:
        assert run.restore(model=torch.nn.Linear(2, 2)) == 0
        for step in run.steps():
            run.log(step, loss=1.0)
        run.save_checkpoint(model=torch.nn.Linear(2, 2))
    resume = dataclasses.replace(smoke, run_name="r", resume="auto", steps=5)
    with Run("00_toy", resume) as run:
        assert run.restore(model=torch.nn.Linear(2, 2)) == 3 == run.step
    with pytest.raises(UserError, match="does not fit this configuration \\(size mismatch for weight"):
        with Run("00_toy", resume) as run:
            run.restore(model=torch.nn.Linear(2, 3))


def test_a_finished_run_can_be_resumed_with_the_same_steps_and_trains_no_further(smoke, tmp_path):
    """--steps equal to the step a checkpoint reached is allowed (only a lower one is refused): nothing to do."""
    toy_train.main(dataclasses.replace(smoke, run_name="f", steps=3))
    run = toy_train.main(dataclasses.replace(smoke, run_name="f", steps=3, resume="auto"))
    assert run.step == 3 and run.stop_reason == ""
    assert [r["step"] for r in read_metrics(tmp_path / "00_toy/f/metrics.jsonl")] == [1, 2, 3]


def test_a_checkpoint_of_another_world_size_resumes_with_fresh_noise_and_window(smoke, tmp_path, capsys):
    """A 2-process checkpoint resumed on one: the RNG is reseeded (said so) and the saved windows are dropped."""
    toy_train.main(dataclasses.replace(smoke, run_name="w", log_every=4, stop_at=13))
    path = tmp_path / "00_toy/w/ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    window = {"sums": {"loss": 1000.0}, "counts": {"loss": 1}}  # no loss of the toy comes near it
    ckpt.update(world_size=2, rng_ranks=[ckpt["rng"]] * 2, log_window=window, log_window_ranks=[window] * 2)
    torch.save(ckpt, path)
    capsys.readouterr()
    toy_train.main(dataclasses.replace(smoke, run_name="w", log_every=4, resume="auto"))
    assert "resuming a 2-process run on 1: training continues" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "00_toy/w/metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24, 28, 30] and all(r["loss"] < 100 for r in rows)
    saved = torch.load(path, weights_only=True)
    assert saved["world_size"] == 1 and "rng_ranks" not in saved and "log_window_ranks" not in saved


def test_the_resume_hint_comes_only_after_an_early_stop_and_repeats_compile(smoke, capsys):
    """A finished run prints no 'continue with'; a stopped one's hint repeats --compile and --device."""
    with Run("00_toy", dataclasses.replace(smoke, run_name="done", steps=2)) as run:
        for step in run.steps():
            run.log(step, loss=1.0)
    assert "continue with" not in capsys.readouterr().out
    with Run("00_toy", dataclasses.replace(smoke, run_name="stop", steps=5, stop_at=1, compile=True)) as run:
        for step in run.steps():
            run.log(step, loss=1.0)
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("/00_toy/stop/ckpt.pt --compile --device cpu")


def test_a_second_signal_aborts_and_the_handlers_are_put_back(smoke):
    """The first SIGTERM/SIGINT asks for a clean stop (keeping an earlier reason), the second raises
    KeyboardInterrupt; after the run the previous handlers are back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with Run("00_toy", dataclasses.replace(smoke, steps=5, stop_at=1)) as run:
            for _ in run.steps():
                pass
            os.kill(os.getpid(), signal.SIGTERM)  # a signal while the stopped run saves
            seen.append(run.stop_reason)
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("not aborted")
    assert seen == ["--stop-at 1"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_every_skips_the_last_step_which_the_end_of_training_handles(smoke):
    """run.every(n, step): every n-th step but the final one (saved and sampled anyway), never for n = 0."""
    run = Run("00_toy", dataclasses.replace(smoke, steps=10))
    assert [s for s in range(1, 11) if run.every(5, s)] == [5]
    assert [s for s in range(1, 11) if run.every(3, s)] == [3, 6, 9] and not any(run.every(0, s) for s in range(11))


def test_flush_writes_extra_values_and_an_infinite_loss_stops_the_run(smoke, tmp_path):
    """flush(step, **extra) adds values such as a test score to the row; inf diverges as NaN does."""
    with Run("00_toy", dataclasses.replace(smoke, run_name="fl", log_every=10)) as run:
        run.log(1, loss=1.0)
        run.log(2, loss=torch.tensor(2.0))
        run.flush(2, test_acc=torch.tensor(0.5))
        run.flush(3, fid=7)  # an evaluation between rows: a row of its own
    rows = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "00_toy/fl/metrics.jsonl")]
    assert rows == [{"step": 2, "loss": 1.5, "test_acc": 0.5}, {"step": 3, "fid": 7.0}]
    with pytest.raises(TrainingDiverged, match="^loss = inf at step 1; no checkpoint yet$"):
        with Run("00_toy", dataclasses.replace(smoke, run_name="inf")) as run:
            run.log(1, loss=float("inf"))


def test_a_run_folder_is_removed_only_after_an_early_user_error(smoke, tmp_path):
    """A UserError before anything but config/metrics exists leaves no run; a divergence keeps its metrics, and a
    UserError after a checkpoint keeps the run."""
    with pytest.raises(TrainingDiverged):
        toy_train.main(dataclasses.replace(smoke, run_name="div", ckpt_every=0, nan_at=3))
    assert [r["step"] for r in read_metrics(tmp_path / "00_toy/div/metrics.jsonl")] == [1, 2]  # what led up to the NaN
    with pytest.raises(UserError, match="late"):
        with Run("00_toy", dataclasses.replace(smoke, run_name="late")) as run:
            run.save_checkpoint(model=torch.nn.Linear(1, 1))
            raise UserError("late")
    assert (tmp_path / "00_toy/late/ckpt.pt").is_file()


def test_a_compiled_model_is_saved_under_the_plain_modules_keys(smoke, tmp_path, monkeypatch):
    """--compile wraps the model (torch.compile's OptimizedModule keeps it as _orig_mod); checkpoints hold the
    plain module's state_dict keys, so a compiled and an eager run load each other's checkpoints."""
    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper: importing dynamo takes seconds
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    monkeypatch.setattr(torch, "compile", Compiled)
    net = torch.nn.Linear(2, 2)
    with Run("00_toy", dataclasses.replace(smoke, run_name="c", compile=True)) as run:
        wrapped = run.wrap(net)
        run.save_checkpoint(model=wrapped)
    assert isinstance(wrapped, Compiled) and wrapped._orig_mod is net
    assert sorted(torch.load(tmp_path / "00_toy/c/ckpt.pt", weights_only=True)["model"]) == ["bias", "weight"]


def test_config_from_preset_refuses_an_unknown_preset():
    """Tests and scripts build configs with config_from_preset: a misspelt preset is a UserError naming the list."""
    with pytest.raises(UserError, match="unknown preset 'smok'; choose one of smoke, default, full"):
        config_from_preset(toy_train.TrainConfig, toy_train.PRESETS, "smok")


def test_boolean_flags_have_a_no_form_that_overrides_the_preset():
    """Every bool field is --flag / --no-flag, so a preset's True can be turned off on the command line."""
    presets = {**toy_train.PRESETS, "fast": dict(channels_last=True)}
    assert parse_config(toy_train.TrainConfig, presets, "00_toy", ["--preset", "fast"]).channels_last
    cfg = parse_config(toy_train.TrainConfig, presets, "00_toy", ["--preset", "fast", "--no-channels-last", "--amp"])
    assert not cfg.channels_last and cfg.amp


def test_output_file_leaves_no_file_behind_and_keeps_an_existing_one(tmp_path):
    """The write test of output_file creates nothing that was not there and truncates nothing that was."""
    output_file(tmp_path / "new.npz", "--out")
    assert not (tmp_path / "new.npz").exists()
    (tmp_path / "old.npz").write_bytes(b"kept")
    output_file(tmp_path / "old.npz", "--out")
    assert (tmp_path / "old.npz").read_bytes() == b"kept"


def test_sample_flags_are_checked_in_one_line(tmp_path, capsys):
    """sample.py's flags: a bad --device is one line and exit code 2; --batch-size 0 and a non-.npz --out are
    UserErrors."""
    import argparse

    from shared.cli import add_sample_args, check_sample_args

    parser = add_sample_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--device", "tpu"])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    check_sample_args(parser.parse_args(["--batch-size", "1", "--out", str(tmp_path / "s.npz")]))
    with pytest.raises(UserError, match="--batch-size must be positive, got 0"):
        check_sample_args(parser.parse_args(["--batch-size", "0"]))
    with pytest.raises(UserError, match="--out must name a .npz file, got 's.png'"):
        check_sample_args(parser.parse_args(["--out", "s.png"]))


def test_a_crash_inside_the_run_propagates_unchanged_and_logs_no_partial_row(smoke, tmp_path):
    """Only a clean exit flushes the open window: an error mid-window is raised as is, even with a NaN pending."""
    for loss in (1.0, float("nan")):
        with pytest.raises(RuntimeError) as crash:
            with Run("00_toy", dataclasses.replace(smoke, run_name=f"crash{loss}", log_every=10)) as run:
                run.log(1, loss=loss)
                raise RuntimeError("CUDA out of memory")
        assert type(crash.value) is RuntimeError and str(crash.value) == "CUDA out of memory"
        assert not (tmp_path / f"00_toy/crash{loss}/metrics.jsonl").exists()


def test_low_precision_losses_are_averaged_in_float32(smoke, tmp_path):
    """A bf16 loss (as --amp gives) is summed in float32: 300 ones average to 1, not to bf16's saturated 256/300."""
    with Run("00_toy", dataclasses.replace(smoke, run_name="bf16", log_every=300)) as run:
        for step in range(1, 301):
            run.log(step, loss=torch.tensor(1.0, dtype=torch.bfloat16))
    assert read_metrics(tmp_path / "00_toy/bf16/metrics.jsonl")[0]["loss"] == 1.0


def test_a_run_without_a_name_is_named_by_preset_date_and_time(smoke, tmp_path):
    """--run-name's default: <preset>-<date>-<time>, so that runs of a stage sort by when they started."""
    run = Run("00_toy", smoke)
    assert run.dir.parent == tmp_path / "00_toy" and re.fullmatch(r"smoke-\d{8}-\d{6}", run.dir.name)


def test_help_lists_the_presets_flags_in_one_column():
    """--help's epilog: one line per preset, its flags starting in the same column whatever the name's length."""
    epilog = build_parser(toy_train.TrainConfig, {"s": dict(steps=3), "longer": dict(lr=0.5)}, "").epilog
    assert epilog.splitlines() == ["presets:", "  s      --steps 3", "  longer --lr 0.5"]
