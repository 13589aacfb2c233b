import dataclasses
import json
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
from shared.cli import (
    SEED_MAX,
    TrainingDiverged,
    arg,
    check_seed,
    config_from_preset,
    output_dir,
    output_file,
    parse_config,
    run_entry,
    validate,
)
from shared.experiment import Run, find_checkpoint
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
def test_cli_errors_are_one_line_and_exit_2(tmp_path, flags, message):
    proc = run_script(TOY, "--preset", "smoke", *flags, experiments=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"] and message in proc.stderr


def test_foreign_checkpoint_is_refused_from_the_cli(tmp_path):
    torch.save({"stage": "02_gan", "config": {}}, tmp_path / "gan.pt")
    proc = run_script(TOY, "--resume", str(tmp_path / "gan.pt"), experiments=tmp_path)
    assert proc.returncode == 2 and "stage 02_gan, not 00_toy" in proc.stderr and "Traceback" not in proc.stderr


def test_sigint_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, str(TOY), "--preset", "smoke", "--steps", "100000", "--sleep", "0.01",
           "--run-name", "sig", "--ckpt-every", "0"]
    proc = subprocess.Popen(cmd, cwd=TOY.parent, env={**__import__("os").environ,
                                                      "SCRATCHGEN_EXPERIMENTS": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "00_toy/sig/metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-1000:]
    ckpt = torch.load(tmp_path / "00_toy/sig/ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 100000 and "stopped early (SIGINT)" in out
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


def test_a_bad_choice_is_one_line(tmp_path):
    proc = run_script(TOY, "--device", "tpu", experiments=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "invalid choice" in proc.stderr


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
