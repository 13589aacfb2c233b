"""Training and sampling throughput of every stage, measured through the stages' own code.

    python benchmarks/bench.py                         # every stage, default preset sizes, CPU
    python benchmarks/bench.py --device cuda --amp --compile --preset full
    python benchmarks/bench.py --stages 02_gan 03_ddpm --channels-last   # conv stages, NHWC memory order
    nox -s bench                                       # the same, CPU and (when present) CUDA variants

Training: ``train.py --steps N`` with logging every step; images/s comes from the timestamps in
``metrics.jsonl`` after the first ``--warmup`` steps (so start-up, data loading and compilation are not
counted). Sampling: ``benchmarks/time_sampling.py`` runs the stage's ``sample.py`` inside one process at two
sample counts and times only "checkpoint loaded -> samples ready"; the difference divided by the difference
in counts is the time per image. Diffusion stages are also timed at several sampler step counts (each step
is one network evaluation, two with classifier-free guidance, and Heun's steps two). Prints a table and
writes JSON. ``--amp``, ``--compile`` and ``--channels-last`` apply to training only: ``sample.py`` has no such
flags, so sampling is always timed in float32, eager (each row says so). On CUDA the defaults time more steps
and log every 10th, since a GPU step takes milliseconds and logging every step would sync the host each time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared import UserError  # noqa: E402
from shared.checkpoint import git_hash  # noqa: E402
from shared.cli import one_line_error, output_file, run_entry  # noqa: E402
from shared.runtime import choose_device  # noqa: E402


def machine(device: str) -> str:
    """The hardware a row ran on, in words: CPU cores, and the GPU's name for CUDA rows."""
    import torch

    where = f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}; {where}"
    return where


# 05_multimodal trains its CLIP first; put the few timed steps in the MMDiT phase, the expensive one. 02_gan's
# saturation diagnostic is an extra backward pass now and then (and --compile refuses it): time the training alone.
STAGE_TRAIN_FLAGS = {"05_multimodal": ["--clip-steps", "5"], "02_gan": ["--diag-every", "0"]}


def first_row_per_step(metrics: Path) -> list[dict]:
    """The timestamped rows of a run's metrics.jsonl, one per step: a stage may log a second row at the same step
    after an evaluation (01_vae's test ELBO at the end, 02_gan's gradient norms), whose time includes that work."""
    first = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "time" in row:
            first.setdefault(row["step"], row)
    return [first[step] for step in sorted(first)]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # A result row holds one line: the script's own one-line error, or a traceback's last line, says why.
        cause = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no message on stderr")
        raise RuntimeError(f"{Path(cmd[1]).name} exited with code {proc.returncode}: {cause.strip()}")
    return proc.stdout


def bench_stage(stage: str, args, tmp: Path) -> dict:
    cwd, env = ROOT / stage, {**os.environ, "SCRATCHGEN_EXPERIMENTS": str(tmp), "PYTHONPATH": str(ROOT)}
    name = f"bench-{args.device}{'-amp' if args.amp else ''}{'-compile' if args.compile else ''}" \
        f"{'-cl' if args.channels_last else ''}"
    flags = ["--preset", args.preset, "--steps", str(args.steps), "--log-every", str(args.log_every),
             "--sample-every", "0", "--ckpt-every", "0", "--device", args.device, "--run-name", name]
    flags += STAGE_TRAIN_FLAGS.get(stage, [])
    flags += ["--amp"] if args.amp else []
    flags += ["--compile"] if args.compile else []
    flags += ["--channels-last"] if args.channels_last else []
    run([sys.executable, "train.py", *flags], cwd, env)
    run_dir = tmp / stage / name
    rows = [r for r in first_row_per_step(run_dir / "metrics.jsonl") if r["step"] >= args.warmup]
    batch = json.loads((run_dir / "config.json").read_text())["batch_size"]
    steps_per_s = (rows[-1]["step"] - rows[0]["step"]) / max(rows[-1]["time"] - rows[0]["time"], 1e-9)
    result = {"stage": stage, "device": args.device, "amp": args.amp, "compile": args.compile,
              "channels_last": args.channels_last, "preset": args.preset, "batch_size": batch,
              "train_images_per_s": round(steps_per_s * batch, 1), "sampling": "float32, eager"}

    ckpt = str(run_dir / "ckpt.pt")
    help_text = run([sys.executable, "sample.py", "--help"], cwd, env)
    steps_flag = next((f for f in ("--steps", "--sample-steps") if f"{f} " in help_text), None)

    def per_image_ms(extra: list[str]) -> float:
        small, large = args.samples // 4, args.samples
        cmd = [sys.executable, str(ROOT / "benchmarks" / "time_sampling.py"), "--counts", str(small), str(large),
               "--repeats", str(args.repeats), "--", "--ckpt", ckpt, "--device", args.device,
               "--batch-size", str(args.samples), *extra]
        seconds = json.loads(run(cmd, cwd, env).strip().splitlines()[-1])["seconds"]
        ms = 1000 * (seconds[1] - seconds[0]) / (large - small)
        return round(ms, 3) if ms > 0 else None  # lost in timing noise at these counts: raise --samples

    result["sample_ms_per_image"] = per_image_ms([])
    if steps_flag:
        result["sample_ms_per_image_by_steps"] = {s: per_image_ms([steps_flag, str(s)]) for s in args.sampler_steps}
    return result


def ms_text(ms: float | None) -> str:
    return "noise" if ms is None else f"{ms:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--stages", nargs="*", default=None, help="stage folders (default: all)")
    parser.add_argument("--preset", default="default", choices=("smoke", "default", "full"),
                        help="model sizes to measure")
    parser.add_argument("--steps", type=int, default=None, help="training steps to time (default: 30 on CPU, 300 "
                        "on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default: 10 on "
                        "CPU, 50 on CUDA)")
    parser.add_argument("--log-every", type=int, default=None, help="steps between timestamps (default: 1 on "
                        "CPU, 10 on CUDA)")
    parser.add_argument("--samples", type=int, default=256, help="samples timed (and a quarter as many)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling calls per count (the fastest kept)")
    parser.add_argument("--sampler-steps", "--nfe", type=int, nargs="*", default=[10, 50], dest="sampler_steps",
                        help="sampler step counts to time (diffusion; none: skip). Network evaluations per image "
                        "are these times two under guidance or Heun (--nfe: the older, misleading name)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory order (training)")
    parser.add_argument("--json", default="", help="where to write the results (default: print only)")
    args = parser.parse_args()
    for flag in ("steps", "log_every", "repeats"):  # None (not given) picks the device's default below
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    gpu = args.device == "cuda"
    args.steps = args.steps if args.steps is not None else (300 if gpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (50 if gpu else 10)
    args.log_every = args.log_every if args.log_every is not None else (10 if gpu else 1)
    if args.steps <= args.warmup + args.log_every or args.samples < 8:
        parser.error("--steps must exceed --warmup + --log-every and --samples must be at least 8")
    known = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*") if (p / "train.py").exists())
    unknown = [s for s in args.stages or [] if s not in known]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; choose from {', '.join(known)}")
    stages = args.stages or known
    choose_device(args.device)  # a missing GPU is one line now, not the same failure in every stage's row
    if args.json:
        output_file(args.json, "--json")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for stage in stages:
            try:
                results.append(bench_stage(stage, args, Path(tmp)))
            except RuntimeError as err:
                results.append({"stage": stage, "error": str(err)})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'stage':15s} {'device':7s} {'amp':4s} {'compile':8s} {'NHWC':5s} {'train img/s':>12s} "
          f"{'sample ms/img':>14s}  ms/img by sampler steps")
    for r in results:
        if "error" in r:
            print(f"{r['stage']:15s} error: {r['error']}")
            continue
        by_steps = ", ".join(f"{s}: {ms_text(ms)}" for s, ms in r.get("sample_ms_per_image_by_steps", {}).items())
        print(f"{r['stage']:15s} {r['device']:7s} {str(r['amp'])[0]:4s} {str(r['compile'])[0]:8s} "
              f"{str(r['channels_last'])[0]:5s} "
              f"{r['train_images_per_s']:12.1f} {ms_text(r['sample_ms_per_image']):>14s}  {by_steps}")
    if args.json:  # each row says how and where it was measured
        provenance = {"command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
                      "machine": machine(args.device), "commit": git_hash()}
        Path(args.json).write_text(json.dumps([{**r, **provenance} for r in results], indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0  # a failed stage must not pass for a finished benchmark


if __name__ == "__main__":
    sys.exit(run_entry(main))
