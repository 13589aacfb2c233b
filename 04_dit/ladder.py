"""The LightningDiT ablation ladder at toy scale: one DiT trained again and again at a fixed step count, the
recipe's switches turned on one at a time (the shape of LightningDiT's Table 1), each rung scored by
FID-MNIST (shared/metrics.py) at several step counts.

    python ladder.py --eval-at 500 1000 2000 --num-samples 2000                  # hours on a CPU
    python ladder.py --preset smoke --eval-at 5 10 --num-samples 20              # seconds (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from diffusion import sample
from train import PRESETS, STAGE, TrainConfig
from train import main as train_main

from shared import UserError
from shared.cli import config_from_preset, one_line_error, run_entry
from shared.experiment import experiments_dir
from shared.images import to_uint8
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


def rung_configs(preset: str, **overrides) -> list[tuple[str, TrainConfig]]:
    """The ladder's configs: cumulative switches on one preset."""
    flags, out = dict(VANILLA), []
    for i, (name, extra) in enumerate(RUNGS):
        flags.update(extra)
        out.append((name, config_from_preset(TrainConfig, PRESETS, preset, run_name=f"ladder-{i}", sample_every=0,
                                             **{**overrides, **flags})))
    return out


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

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["rung"] for r in rows):
        points = [(r["step"], r["fid"]) for r in rows if r["rung"] == name]
        ax.plot(*zip(*points), marker="o", lw=1, label=name)
    ax.set(xlabel="training step", ylabel="FID-MNIST", yscale="log", title="LightningDiT ladder (toy scale)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
    from shared.metrics import evaluate  # needs the shared classifier's weights

    out = experiments_dir() / STAGE / "ladder"
    rows = []
    for name, cfg in rung_configs(args.preset, device=args.device)[:args.rungs]:
        for steps in sorted(args.eval_at):  # resume the same run to each step count: one run, scored on the way
            resume = "auto" if steps != min(args.eval_at) else ""
            ema = train_main(dataclasses.replace(cfg, steps=steps, resume=resume))
            images, labels = draw(ema, cfg, args.num_samples, args.sample_steps, args.cfg_scale)
            scores = evaluate(images, labels)
            rows.append({"rung": name, "step": steps, "fid": scores["fid"], "fid_floor": scores["fid_floor"],
                         "label_accuracy": scores.get("label_accuracy")})
            print(json.dumps(rows[-1]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| rung | " + " | ".join(f"FID @ {s}" for s in sorted(args.eval_at)) + " |",
             "| --- |" + " --- |" * len(args.eval_at)]
    for name in dict.fromkeys(r["rung"] for r in rows):
        table.append(f"| {name} | " + " | ".join(f"{r['fid']:.2f}" for r in rows if r["rung"] == name) + " |")
    (out / "ladder.md").write_text("\n".join(table) + "\n")
    plot_ladder(rows, out / "ladder_fid.png")
    print("\n".join(table))
    return rows


if __name__ == "__main__":
    run_entry(main)
