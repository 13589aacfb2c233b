"""Where a stage's training step spends its time: the stage's own ``train.py`` run under ``torch.profiler``, the
operators ranked by self time per training step (time in the operator itself, not in the ones it calls).

    python benchmarks/profile_step.py 03_ddpm                  # default preset, CPU
    python benchmarks/profile_step.py 04_dit --steps 20 60 --device cuda --out experiments/bench/profile-04.txt
    python benchmarks/profile_step.py 05_multimodal -- --clip-steps 5   # flags after -- go to train.py

A run also loads data, builds the model and, after its last step, draws a sample grid; to leave all that out,
two runs of different lengths are profiled and the per-operator difference is divided by the difference in
steps (the same idea as ``time_sampling.py``). This is the evidence to read before any speed work: an operator
that is not near the top of the table is not worth making faster.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared import UserError  # noqa: E402
from shared.cli import one_line_error, output_file, run_entry  # noqa: E402


def profile_run(preset: str, steps: int, device: str, train_args: list[str]) -> dict[str, list[float]]:
    """Run ``train.py`` for ``steps`` steps in this process under the profiler: operator -> [self us, calls]."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        os.environ["SCRATCHGEN_EXPERIMENTS"] = tmp  # the run's checkpoint and logs are thrown away
        sys.argv = ["train.py", "--preset", preset, "--steps", str(steps), "--sample-every", "0",
                    "--ckpt-every", "0", "--device", device, "--run-name", "profile", "--seed", "0", *train_args]
        with profile(activities=activities) as prof:
            try:
                runpy.run_path("train.py", run_name="__main__")
            except SystemExit as stop:  # a clean exit is code 0 or None
                if stop.code not in (0, None):
                    raise
    totals = defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        totals[event.key][0] += self_us
        totals[event.key][1] += event.count
    return totals


def per_step_table(stage: str, preset: str, short: int, long: int, device: str, rows: int,
                   train_args: list[str]) -> str:
    stage_dir = ROOT / stage
    sys.path[:0] = [str(stage_dir), str(ROOT)]  # the stage's own modules first, as when run from its folder
    os.chdir(stage_dir)
    a = profile_run(preset, short, device, train_args)
    b = profile_run(preset, long, device, train_args)
    steps = long - short
    per_step = {key: ((b[key][0] - a.get(key, [0, 0])[0]) / steps / 1000, (b[key][1] - a.get(key, [0, 0])[1]) / steps)
                for key in b}  # operator -> (ms per step, calls per step)
    total = sum(ms for ms, _ in per_step.values() if ms > 0)
    where = "GPU" if device == "cuda" else "CPU"
    command = " ".join(["train.py --preset", preset, *train_args])
    lines = [f"{stage} ({command}) on {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}:",
             f"runs of {short} and {long} steps, their difference per step",
             f"self {where} time per training step: {total:.1f} ms (operators summed)",
             f"{'operator':60s} {'ms/step':>9s} {'share':>7s} {'calls/step':>11s}"]
    for key, (ms, calls) in sorted(per_step.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(f"{key[:60]:60s} {ms:9.2f} {100 * ms / total:6.1f}% {calls:11.1f}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("stage", help="stage folder, e.g. 03_ddpm")
    parser.add_argument("--preset", default="default", help="the stage's preset whose sizes are profiled")
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 40), metavar=("SHORT", "LONG"),
                        help="the two run lengths; the table covers the steps between them")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--out", default="", help="also write the table to this file")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows -- goes to train.py unread
    args, train_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    short, long = args.steps
    if not 1 <= short < long or args.rows < 1:
        parser.error("--steps needs 1 <= SHORT < LONG and --rows at least 1")
    if not (ROOT / args.stage / "train.py").is_file():
        known = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*") if (p / "train.py").is_file())
        raise UserError(f"{args.stage!r} is not a stage folder with a train.py; choose from {', '.join(known)}")
    # Checked before the profiling runs; resolved before train.py's folder becomes the working directory.
    out = output_file(args.out, "--out").resolve() if args.out else None
    table = per_step_table(args.stage, args.preset, short, long, args.device, args.rows, train_args)
    print(table)
    if out:
        out.write_text(table)


if __name__ == "__main__":
    run_entry(main)
