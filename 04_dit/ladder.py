"""The LightningDiT ablation ladder at toy scale: one DiT trained again and again at a fixed step count, the
recipe's switches turned on one at a time (the shape of LightningDiT's Table 1), each rung scored by
FID-MNIST (shared/metrics.py) at several step counts.

    python ladder.py --eval-at 500 1000 2000 --num-samples 2000                  # hours on a CPU
    python ladder.py --preset smoke --eval-at 5 10 --num-samples 20              # seconds (the test)

A Ctrl-C (or SIGTERM) stops the ladder, not just the rung: the rung saves its checkpoint, the rows scored so far
stay in ladder.json (written after every score) and the script exits with 130. The same command with --resume
goes on from there: scored rows are kept, the stopped rung resumes from its checkpoint. Without --resume a
ladder whose runs already exist is refused; --name starts another one beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

import torch
from diffusion import sample
from train import PRESETS, STAGE, TrainConfig
from train import main as train_main

from shared import UserError, experiment
from shared.checkpoint import load_checkpoint
from shared.cli import PER_INVOCATION, config_from_preset, one_line_error, run_entry
from shared.experiment import CKPT_NAME, experiments_dir
from shared.images import to_uint8
from shared.metrics import evaluate
from shared.runtime import DEVICES

# The vanilla DiT (every LightningDiT switch off); each rung adds its switches to all the rungs above it.
VANILLA = dict(objective="ddpm", logit_normal=False, cos_weight=0.0, swiglu=False, rmsnorm=False, rope=False,
               qk_norm=False, beta2=0.999)
RUNGS = [
    ("DiT (DDPM eps)", {}),
    ("+ rectified flow (v)", dict(objective="flow")),
    ("+ logit-normal t", dict(logit_normal=True)),
    ("+ cosine loss", dict(cos_weight=1.0)),
    ("+ SwiGLU", dict(swiglu=True)),
    ("+ RMSNorm", dict(rmsnorm=True)),
    ("+ 2-D RoPE", dict(rope=True)),
    ("+ QK-norm", dict(qk_norm=True)),
    ("+ AdamW beta2 0.95", dict(beta2=0.95)),
]


SCORING = ("num_samples", "sample_steps", "cfg_scale")  # how a row was scored; a resumed ladder must match


def rung_configs(preset: str, ladder: str = "ladder", **overrides) -> list[tuple[str, TrainConfig]]:
    """The ladder's configs: cumulative switches on one preset, run ``i`` named ``<ladder>-i``."""
    flags, out = dict(VANILLA), []
    for i, (name, extra) in enumerate(RUNGS):
        flags.update(extra)
        out.append((name, config_from_preset(TrainConfig, PRESETS, preset, run_name=f"{ladder}-{i}",
                                             sample_every=0, **{**overrides, **flags})))
    return out


def reached_step(run_dir: Path) -> int:
    """The step of the run's checkpoint (0 when it has none): what a rung really trained to."""
    path = run_dir / CKPT_NAME
    return int(load_checkpoint(path, STAGE)["step"]) if path.is_file() else 0


def trained_with(cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` was trained with ``cfg`` (its step count and per-invocation flags aside)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return True
    old, new = json.loads(path.read_text()), json.loads(json.dumps(dataclasses.asdict(cfg)))
    return all(old.get(k) == v for k, v in new.items() if k != "steps" and k not in PER_INVOCATION)


@torch.no_grad()
def draw(ema, cfg: TrainConfig, n: int, steps: int, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 28, 28, generator=g)
    sampler = "ddim" if cfg.objective == "ddpm" else "heun"
    dev = next(ema.parameters()).device
    x = torch.cat([sample(ema, noise[i:i + 500].to(dev), labels[i:i + 500].to(dev), cfg.objective, sampler, steps,
                          cfg_scale, ema.cfg.num_classes, generator=g).cpu() for i in range(0, n, 500)])
    return to_uint8(x), labels


def plot_ladder(rows: list[dict], path: Path) -> Path:
    """FID-vs-steps, one line per rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in dict.fromkeys(r["rung"] for r in rows):
        points = [(r["step"], r["fid"]) for r in rows if r["rung"] == name]
        ax.plot(*zip(*points), marker="o", lw=1, label=name)
    ax.set(xlabel="training step", ylabel="FID-MNIST", yscale="log", title="LightningDiT ladder (toy scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: it hid points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_ladder(rows: list[dict], eval_at: list[int], out: Path) -> str:
    """Write ladder.json, ladder.md and the plot from the rows scored so far; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| rung | " + " | ".join(f"FID @ {s}" for s in eval_at) + " |", "| --- |" + " --- |" * len(eval_at)]
    for name in dict.fromkeys(r["rung"] for r in rows):
        fid = {r["step"]: r["fid"] for r in rows if r["rung"] == name}
        table.append(f"| {name} | " + " | ".join(f"{fid[s]:.2f}" if s in fid else "—" for s in eval_at) + " |")
    (out / "ladder.md").write_text("\n".join(table) + "\n")
    plot_ladder(rows, out / "ladder_fid.png")
    return "\n".join(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="train.py preset every rung starts from (its batch, learning rate, EMA)")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[500, 1000, 2000],
                        help="step counts to score; each rung is one run, resumed from one count to the next")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per score (at least 10)")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampler steps (DDIM for the eps-model, "
                        "Heun for the flow models)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale of the samples")
    parser.add_argument("--rungs", type=int, default=len(RUNGS), help=f"climb only the first N of the {len(RUNGS)} "
                        "rungs")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to train and sample")
    parser.add_argument("--name", default="ladder", help="the ladder's name: its runs are experiments/04_dit/"
                        "<name>-N, its table, rows and plot experiments/04_dit/<name>/")
    parser.add_argument("--resume", action="store_true", help="continue a stopped ladder of this --name (same "
                        "flags): keep its scored rows, resume its stopped rung from its checkpoint")
    args = parser.parse_args(argv)
    if min(args.eval_at) < 1:
        raise UserError(f"--eval-at steps must be positive, got {args.eval_at}")
    if args.num_samples < 10:
        raise UserError(f"--num-samples must be at least 10, got {args.num_samples}")
    if args.sample_steps < 1:
        raise UserError(f"--sample-steps must be at least 1, got {args.sample_steps}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise UserError(f"--cfg-scale must be finite and non-negative, got {args.cfg_scale}")
    if not 1 <= args.rungs <= len(RUNGS):
        raise UserError(f"--rungs must be between 1 and {len(RUNGS)}, got {args.rungs}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise UserError(f"--name must be letters, digits, '_', '.' or '-', got {args.name!r}")

    eval_at = sorted(set(args.eval_at))
    scoring = {k: getattr(args, k) for k in SCORING}
    stage_dir, out = experiments_dir() / STAGE, experiments_dir() / STAGE / args.name
    rungs = rung_configs(args.preset, args.name, device=args.device)[:args.rungs]
    rows = []
    if not args.resume:  # refused up front, not after the rungs before the one whose folder is taken
        taken = [p for p in [out / "ladder.json"] + [stage_dir / cfg.run_name / CKPT_NAME for _, cfg in rungs]
                 if p.is_file()]
        if taken:
            raise UserError(f"{taken[0].parent} holds an earlier ladder: continue it with --resume (same flags), "
                            f"start another with --name NEW, or delete {out} and {stage_dir / args.name}-*")
    elif (out / "ladder.json").is_file():
        rows = json.loads((out / "ladder.json").read_text())
        if any(r.get(k) != v for r in rows for k, v in scoring.items()):
            raise UserError(f"--resume: {out / 'ladder.json'} was scored with other --num-samples, --sample-steps "
                            f"or --cfg-scale; resume with the flags it was started with")
    if args.resume and not all(trained_with(cfg, stage_dir / cfg.run_name) for _, cfg in rungs):
        raise UserError(f"--resume: the runs of ladder {args.name!r} were trained with other settings (another "
                        f"--preset?); resume with the flags it was started with")
    for name, cfg in rungs if args.resume else []:  # a run can't go back to a step count it has no score for
        unscored = [s for s in eval_at if not any((r["rung"], r["step"]) == (name, s) for r in rows)]
        if unscored and reached_step(stage_dir / cfg.run_name) > unscored[0]:
            raise UserError(f"--resume: {stage_dir / cfg.run_name} is already past step {unscored[0]}, which it has "
                            f"no score for; keep the --eval-at it was started with")

    stopped = ""
    hint, experiment.RESUME_HINT = experiment.RESUME_HINT, ""  # resuming one rung alone would leave it unscored
    try:
        for name, cfg in rungs:
            for steps in eval_at:  # resume the same run to each step count: one run, scored on the way
                if any((r["rung"], r["step"]) == (name, steps) for r in rows):
                    continue  # scored before the ladder was stopped
                ema = train_main(dataclasses.replace(cfg, steps=steps, resume="auto"))
                reached = reached_step(stage_dir / cfg.run_name)
                if reached < steps:  # Ctrl-C or SIGTERM: its checkpoint is saved, its score would not be @ steps
                    stopped = f"rung '{name}' stopped at step {reached} of {steps}"
                    break
                images, labels = draw(ema, cfg, args.num_samples, args.sample_steps, args.cfg_scale)
                scores = evaluate(images, labels)
                rows.append({"rung": name, "step": reached, "fid": scores["fid"], "fid_floor": scores["fid_floor"],
                             "label_accuracy": scores.get("label_accuracy"), **scoring})
                print(json.dumps(rows[-1]))
                save_ladder(rows, eval_at, out)  # after every score: a stop loses no row
            if stopped:
                break
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one while sampling or scoring
        stopped = "interrupted"
    finally:
        experiment.RESUME_HINT = hint
    if rows:
        table = save_ladder(rows, eval_at, out)
        print(table)
    if stopped:
        again = list(sys.argv[1:] if argv is None else argv)
        again += [] if "--resume" in again else ["--resume"]
        print(f"ladder stopped ({stopped}); {len(rows)} rows scored, in {out / 'ladder.json'}; continue with: "
              f"python ladder.py {shlex.join(again)}", file=sys.stderr)
        sys.exit(130)
    return rows


if __name__ == "__main__":
    run_entry(main)
