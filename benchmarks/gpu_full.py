"""One device-tool call's worth of GPU work: train named stages' `full` preset for a fixed number of minutes
each, evaluate what they reached with the stage's own evaluation command, and put everything a session needs
for the results table into one folder (the device tool brings back at most 8 files, so each stage's outputs
travel as one .tar.gz).

    python3 benchmarks/gpu_full.py --out $OUT 04_dit:2.5 03_ddpm:2 02_gan:1.5:dcgan-full   # on the GPU machine
    python3 benchmarks/gpu_full.py --out $OUT --parallel --reserve-minutes 4 01_vae:5 02_gan:5:dcgan-full ...
    python benchmarks/gpu_full.py --out /tmp/g --preset smoke --device cpu --num-samples 100 01_vae:0.2

`STAGE:MINUTES[:PRESET[:FLAGS]]` trains STAGE (under PRESET instead of `--preset`, with FLAGS added to its
train.py command) with `--max-minutes MINUTES` (the run stops cleanly, checkpoints and samples, as at a normal
end); the summary records the step reached, the wall time, images/s and the evaluation's JSON.

One after another, each stage has the GPU to itself. With `--parallel` all stages train at once and share it:
five stages get five minutes each inside one command, and each row's speed is a lower bound on that stage's
speed alone. On an H200 (2026-11-30) the five kept the GPU busy throughout, and sharing made 04_dit 4.8 times
slower (898 images/s beside the other four, 4,292 alone): `--parallel` fits five stages into one command;
whether it gets more done than one stage after another was not measured.

The device tool stops a command after 10 minutes and returns at most 8 files of 16 MiB each, so the whole
command keeps to `--budget-minutes` (training minutes plus `--reserve-minutes` per stage, or once with
`--parallel`, for start-up, sampling and scoring; one after another, a stage that would overrun trains for
what is left; a command still running at the end of the budget is killed), and a checkpoint travels without its
optimizer states when over 12 MiB, and stays out of its stage's archive when that would still pass 16 MiB (the
row says so; its metrics, logs, sample grids and the evaluated samples come back instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

# This folder is on sys.path when a script here runs, and importing bench puts the repository root there too.
from bench import first_row_per_step

from shared.checkpoint import save_checkpoint
from shared.cli import one_line_error, output_dir, run_entry
from shared.runtime import DEVICES, choose_device

ROOT = Path(__file__).resolve().parents[1]
RESERVE_MINUTES = 1.0  # per stage, beside its training: start-up, final checkpoint, 10k samples, scoring
FILE_LIMIT = 16 * 2**20  # the largest file the device tool brings back
CKPT_LIMIT = 12 * 2**20  # a larger checkpoint travels without its optimizer states

# Each stage's evaluation as its README gives it; {ckpt}, {n}, {dev} and {json} are filled in per run.
EVAL = {
    "01_vae": [["likelihood.py", "--ckpt", "{ckpt}", "--k", "5000", "--num-test", "{n}", "--device", "{dev}",
                "--json", "{json}"]],
    "02_gan": [["sample.py", "--ckpt", "{ckpt}", "--num-samples", "{n}", "--out", "{npz}", "--device", "{dev}"],
               ["-m", "shared.evaluate", "{npz}", "--parzen", "--json", "{json}", "--device", "{dev}"]],
    "03_ddpm": [["sample.py", "--ckpt", "{ckpt}", "--num-samples", "{n}", "--sampler", "ddim", "--steps", "50",
                 "--out", "{npz}", "--device", "{dev}"],
                ["-m", "shared.evaluate", "{npz}", "--json", "{json}", "--device", "{dev}"]],
    "04_dit": [["sample.py", "--ckpt", "{ckpt}", "--num-samples", "{n}", "--cfg-scale", "1.275", "--steps", "25",
                "--sampler", "heun", "--out", "{npz}", "--device", "{dev}"],
               ["-m", "shared.evaluate", "{npz}", "--json", "{json}", "--device", "{dev}"]],
    "05_multimodal": [["evaluate.py", "--ckpt", "{ckpt}", "--num-samples", "{n}", "--json", "{json}",
                       "--device", "{dev}"]],
}


def run(cmd: list[str], cwd: Path, log, env: dict | None = None, deadline: float | None = None) -> float:
    """Run one command from ``cwd`` with the repo importable and ``env`` added; its output goes to ``log``;
    returns seconds. A command still running at ``deadline`` (a ``time.monotonic()``) is killed."""
    t0 = time.monotonic()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    timeout = None if deadline is None else max(1.0, deadline - t0)
    try:
        result = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} was killed at the end of --budget-minutes") from None
    if result.returncode != 0:  # the log travels in an archive that may not come back: its end goes in the row
        log.flush()
        tail = Path(log.name).read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {result.returncode}; the log ends:\n" + "\n".join(tail))
    return time.monotonic() - t0


def images_per_second(metrics: Path, batch_size: int) -> float | None:
    """Training throughput from the logged timestamps, the first logged interval (start-up) left out; the
    periodic checkpoints and sample grids are counted in, an evaluation logged after the last step is not."""
    rows = first_row_per_step(metrics)
    if len(rows) < 3:
        return None
    (s0, t0), (s1, t1) = (rows[1]["step"], rows[1]["time"]), (rows[-1]["step"], rows[-1]["time"])
    return (s1 - s0) * batch_size / (t1 - t0) if s1 > s0 and t1 > t0 else None


def shrink_checkpoint(path: Path, limit: int = CKPT_LIMIT) -> bool:
    """Drop the optimizer states from a checkpoint over ``limit`` bytes so that it can travel back (the
    weights, EMA, config and provenance stay; sampling and evaluation need nothing else)."""
    if path.stat().st_size <= limit:
        return False
    import torch

    ckpt = torch.load(path, weights_only=True)
    optimizers = [k for k, v in ckpt.items() if isinstance(v, dict) and {"state", "param_groups"} <= v.keys()]
    # Atomic: a crash mid-write must not cost the checkpoint that the GPU minutes paid for.
    save_checkpoint({k: v for k, v in ckpt.items() if k not in optimizers}, path)
    return True


def pack(folder: Path, archive: Path, leave_out: tuple[Path, ...] = ()) -> Path:
    """``folder`` as a .tar.gz named after it, without the files ``leave_out``."""
    skip = {str(p.relative_to(folder.parent)) for p in leave_out}
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, filter=lambda info: None if info.name in skip else info)
    return archive


def pack_stage(exp: Path, archive: Path, ckpt: Path, samples: Path, limit: int = FILE_LIMIT) -> bool:
    """Pack a stage's folder with its checkpoint, which reproduces the evaluated samples; where that archive
    would be over ``limit``, with the samples instead. Returns whether the checkpoint travels."""
    pack(exp, archive, leave_out=(samples,))
    if not ckpt.is_file() or archive.stat().st_size <= limit:
        return True
    pack(exp, archive, leave_out=(ckpt,))
    return False


def parse_run(spec: str) -> tuple[str, float, str, list[str]]:
    """``STAGE:MINUTES[:PRESET[:FLAGS]]`` -> (stage, minutes, preset or "", train.py flags); a ValueError says
    what is wrong."""
    stage, minutes, preset, flags = (spec.split(":", 3) + ["", ""])[:4]
    try:
        minutes = float(minutes)
    except ValueError:
        minutes = math.nan
    # train.py reads --max-minutes 0 as "no limit": a full preset's whole recipe, not a fixed budget
    if stage not in EVAL or not 0 < minutes < math.inf:
        raise ValueError(f"{spec!r}: expected STAGE:MINUTES[:PRESET[:FLAGS]] with STAGE one of {', '.join(EVAL)} "
                         "and MINUTES a positive number")
    return stage, minutes, preset, shlex.split(flags)


def train_and_evaluate(stage: str, minutes: float, preset: str, flags: list[str], exp: Path, args,
                       num_samples: int, deadline: float, env: dict) -> dict:
    """One stage: train for ``minutes``, evaluate with ``num_samples``, pack ``exp`` into ``args.out``; the
    summary row. Any failure is recorded in the row (the other stages' minutes are already paid for)."""
    row = {"stage": stage, "preset": preset, "flags": " ".join(flags), "max_minutes": minutes, "amp": args.amp}
    env = {**env, "SCRATCHGEN_EXPERIMENTS": str(exp)}
    stage_dir, ckpt = ROOT / stage, exp / stage / "gpu" / "ckpt.pt"
    exp.mkdir(parents=True, exist_ok=True)
    with open(exp / "log.txt", "w") as log:
        try:
            train = [sys.executable, "train.py", "--preset", preset, "--run-name", "gpu", "--device", args.device,
                     "--max-minutes", str(minutes), *(["--amp"] if args.amp else []), *flags]
            row["train_seconds"] = round(run(train, stage_dir, log, env, deadline), 1)
            config = json.loads((ckpt.parent / "config.json").read_text())
            row["step"] = max(json.loads(line)["step"] for line in (ckpt.parent / "metrics.jsonl").open())
            row["images_per_s"] = images_per_second(ckpt.parent / "metrics.jsonl", config["batch_size"])
            fill = dict(ckpt=str(ckpt), n=str(num_samples), dev=args.device, json=str(exp / "eval.json"),
                        npz=str(exp / "samples.npz"))
            t_eval = 0.0
            for cmd in EVAL[stage]:
                # TF32 matrix products for drawing samples only; the metrics keep their full float32 features
                tf32 = args.tf32_sampling and cmd[0] == "sample.py"
                extra = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"} if tf32 else {}
                t_eval += run([sys.executable, *(a.format(**fill) for a in cmd)], stage_dir, log, {**env, **extra},
                              deadline)
            row["eval_seconds"] = round(t_eval, 1)
            row["eval_samples"] = num_samples
            row["eval"] = json.loads((exp / "eval.json").read_text())
        except Exception as err:
            row["error"] = str(err)
    try:  # a failure here must not cost the other stages' rows
        if ckpt.is_file() and shrink_checkpoint(ckpt):
            row["optimizer_states_dropped"] = True
        if not pack_stage(exp, args.out / f"{exp.name}.tar.gz", ckpt, exp / "samples.npz"):
            row["ckpt_left_out_mib"] = round(ckpt.stat().st_size / 2**20, 1)
    except Exception as err:
        row["pack_error"] = str(err)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("runs", nargs="+", help="STAGE:MINUTES[:PRESET[:FLAGS]], e.g. 04_dit:4, 02_gan:3:dcgan-full "
                        "or '05_multimodal:5:full:--clip-steps 2000' (FLAGS go to train.py)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the summary and one .tar.gz per stage")
    parser.add_argument("--preset", default="full", help="the preset of runs that name none")
    parser.add_argument("--device", default="cuda", choices=DEVICES)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--num-samples", type=int, default=10_000, help="samples (01: test images) to evaluate")
    parser.add_argument("--samples", action="append", default=[], metavar="STAGE=N",
                        help="another --num-samples for one stage, e.g. 01_vae=1000 (the k = 5000 bound costs 5000 "
                        "decoder passes per test image)")
    parser.add_argument("--parallel", action="store_true",
                        help="train every stage at once on the one GPU (each its own minutes), then evaluate each")
    parser.add_argument("--budget-minutes", type=float, default=9.0,
                        help="wall-clock minutes for the whole command (the device tool stops one after 10); "
                        "a command still running then is killed")
    parser.add_argument("--reserve-minutes", type=float, default=RESERVE_MINUTES,
                        help="minutes per stage (with --parallel: in all) for start-up, sampling and scoring")
    parser.add_argument("--tf32-sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="let sample.py's float32 matrix products use TF32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE)")
    args = parser.parse_args(argv)
    t_start = time.monotonic()
    # Everything checkable is checked here, before the first stage's training minutes are spent.
    if args.num_samples <= 0:
        parser.error(f"--num-samples must be positive, got {args.num_samples}")
    per_stage = {}
    for item in args.samples:
        stage, _, n = item.partition("=")
        if stage not in EVAL or not n.isdigit() or int(n) <= 0:
            parser.error(f"--samples {item!r}: expected STAGE=N with STAGE one of {', '.join(EVAL)} and N positive")
        per_stage[stage] = int(n)
    plans = []
    for spec in args.runs:
        try:
            stage, minutes, preset, flags = parse_run(spec)
        except ValueError as err:
            parser.error(str(err))
        preset = preset or args.preset
        name = stage if preset == args.preset else f"{stage}-{preset}"  # one stage may run under two presets
        if name in [p[4] for p in plans]:
            parser.error(f"{spec!r}: {name} runs twice; give the second run another preset")
        plans.append((stage, minutes, preset, flags, name))
    training = [m for _, m, _, _, _ in plans]
    needed = max(training) + args.reserve_minutes if args.parallel else \
        sum(training) + args.reserve_minutes * len(plans)
    if needed > args.budget_minutes:
        what = (f"the longest training's {max(training):g} minutes plus {args.reserve_minutes:g} for sampling and "
                f"scoring" if args.parallel else f"{sum(training):g} training minutes plus about "
                f"{args.reserve_minutes:g} per stage for sampling and scoring")
        parser.error(f"{what} make {needed:g}, over --budget-minutes {args.budget_minutes:g}; train for less, or "
                     "raise the budget where no 10-minute limit applies")
    choose_device(args.device)  # a missing GPU is one line now, not the same failure logged for every stage
    output_dir(args.out, "--out")
    # outside --out: a command the device tool stops brings back what is in --out, at most 8 files
    work, deadline = Path(tempfile.mkdtemp(prefix="gpu_full-")), t_start + 60 * args.budget_minutes
    summary = []

    def record(row):
        summary.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    if args.parallel:  # the stages share the GPU and the CPU cores
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(plans)))}
        with ThreadPoolExecutor(len(plans)) as pool:
            jobs = [pool.submit(train_and_evaluate, stage, minutes, preset, flags, work / name, args,
                                per_stage.get(stage, args.num_samples), deadline, env)
                    for stage, minutes, preset, flags, name in plans]
            for job in as_completed(jobs):
                record(job.result())
    else:
        for i, (stage, minutes, preset, flags, name) in enumerate(plans):
            # what is left of the budget, less this stage's and the later stages' reserves
            left = args.budget_minutes - (time.monotonic() - t_start) / 60 - args.reserve_minutes * (len(plans) - i)
            planned, minutes = minutes, round(max(0.0, min(minutes, left)), 2)
            if minutes < min(planned, 0.25):  # too little left to be worth training (a short plan is fine)
                record({"stage": stage, "preset": preset, "max_minutes": minutes,
                        "error": "skipped: the budget is spent (the stages before took longer than planned)"})
                continue
            record(train_and_evaluate(stage, minutes, preset, flags, work / name, args,
                                      per_stage.get(stage, args.num_samples), deadline, {}))
    shutil.rmtree(work)
    return 0 if all("error" not in r for r in summary) else 1


if __name__ == "__main__":
    sys.exit(run_entry(main))
