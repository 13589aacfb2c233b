"""The README's pictures, from one training run and its generator.

    python figures.py --run ../experiments/02_gan/default-16k --out assets   # the README's pictures

training.gif    samples of one fixed z through training (the run's samples/step_*.png)
nearest.png     samples beside their nearest training images in pixel space (the paper's Fig. 2 check)
interpolation.png  G along straight lines in z (the paper's Fig. 3)
d_outputs.png   mean D(x) and D(G(z)) over training; Theorem 1's equilibrium is D = 1/2
grad_norms.png  why the minimax generator loss saturates: its gradient against the non-saturating one
game_summary.json  the numbers the README quotes from those two plots (figures.py::game_summary)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from model import sample_noise
from sample import load_generator
from torchvision.io import ImageReadMode, read_image
from train import PAPER_TRAIN_IMAGES

from shared import UserError
from shared.cli import one_line_error, output_dir, run_entry
from shared.data import load_images, to_unit
from shared.images import read_metrics, save_gif, save_grid, to_uint8


def training_gif(run_dir: Path, out: Path, max_frames: int = 16) -> Path:
    paths = sorted((run_dir / "samples").glob("step_*.png"))
    if not paths:
        raise UserError(f"{run_dir}/samples holds no step_*.png frames")
    keep = np.unique(np.linspace(0, len(paths) - 1, max_frames).round().astype(int))
    frames = []
    for i in keep:
        grid = read_image(str(paths[i]), ImageReadMode.GRAY)[:, :122]  # the top 4 rows of the 8x8 grid (2 + 4 * 30 px)
        frames.append(to_unit(grid[None]))  # (1, 1, 122, 242)
    return save_gif(frames, out, nrow=1, value_range=(0.0, 1.0), ms_per_frame=300)


@torch.no_grad()
def nearest_neighbours(G, out: Path, n: int = 8, seed: int = 0) -> Path:
    """Each row: one sample, then its 5 nearest training images (Euclidean distance in pixels)."""
    train, _ = load_images("mnist")
    train = to_unit(train[:PAPER_TRAIN_IMAGES]).flatten(1)  # (50000, 784)
    z = sample_noise(n, G.cfg, generator=torch.Generator().manual_seed(seed))
    samples = to_unit(to_uint8(G(z), G.value_range)).flatten(1)  # (n, 784)
    idx = torch.cdist(samples, train).topk(5, largest=False).indices  # (n, 5)
    rows = torch.cat([samples[:, None], train[idx]], dim=1)  # (n, 6, 784)
    return save_grid(rows.view(-1, 1, 28, 28), out, nrow=6, value_range=(0.0, 1.0))


@torch.no_grad()
def interpolation(G, out: Path, rows: int = 6, steps: int = 10, seed: int = 1) -> Path:
    """z_t = (1 - t) z_0 + t z_1 for t in [0, 1]: a smooth walk through digits shows a smooth latent space
    (it does not by itself show that G did not memorise; the nearest-neighbour figure checks that)."""
    g = torch.Generator().manual_seed(seed)
    z0, z1 = sample_noise(rows, G.cfg, generator=g), sample_noise(rows, G.cfg, generator=g)  # (rows, z_dim)
    t = torch.linspace(0, 1, steps)[None, :, None]  # (1, steps, 1)
    z = ((1 - t) * z0[:, None] + t * z1[:, None]).flatten(0, 1)  # (rows * steps, z_dim)
    return save_grid(G(z), out, nrow=steps, value_range=G.value_range)


def d_outputs(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "d_real" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, [r["d_real"] for r in rows], lw=1, label="D(x), x ~ data")
    ax.plot(steps, [r["d_fake"] for r in rows], lw=1, label="D(G(z)), z ~ p_z")
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="equilibrium 1/2")
    ax.set(xlabel="generator step", ylabel="mean discriminator output", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def grad_norms(records: list[dict], out: Path) -> Path:
    """Left: |d loss / d logit| against D(G(z)) for both losses (closed form). Right: ||grad_theta_g|| measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gan import generator_loss_minimax, generator_loss_nonsaturating

    a = torch.linspace(-12, 6, 400, requires_grad=True)  # discriminator logits of fakes
    slopes = {}
    for name, fn in (("minimax  log(1 - D)", generator_loss_minimax), ("non-saturating  -log D",
                                                                         generator_loss_nonsaturating)):
        (grad,) = torch.autograd.grad(fn(a) * len(a), a)  # per-sample slope
        slopes[name] = grad.abs().detach()
    d = torch.sigmoid(a).detach()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, s in slopes.items():
        left.loglog(d, s, label=name)
    left.set(xlabel="D(G(z))", ylabel="|d loss / d logit|", title="gradient reaching G, per sample")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    rows = [r for r in records if "gnorm_minimax" in r]
    if rows:
        steps = [r["step"] for r in rows]
        right.semilogy(steps, [r["gnorm_minimax"] for r in rows], label="minimax")
        right.semilogy(steps, [r["gnorm_nonsaturating"] for r in rows], label="non-saturating")
        right.legend(fontsize=8)
    right.set(xlabel="generator step", ylabel="||grad_theta_g loss||", title="measured at the same (G, D)")
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def game_summary(records: list[dict], early: tuple[int, int] = (100, 250), late: int = 2000) -> dict:
    """The numbers the README reads off d_outputs.png and grad_norms.png, computed from the run's log: how low
    D(G(z)) fell early and when, both mean outputs over the last 500 steps, and the ratio of the non-saturating
    to the minimax gradient norm while D was winning (steps ``early``) and over the last ``late`` steps."""
    rows = [r for r in records if "d_fake" in r]
    last = rows[-1]["step"]
    low = min((r for r in rows if r["step"] <= 1000), key=lambda r: r["d_fake"])
    tail = [r for r in rows if r["step"] > last - 500]
    summary = {"last_step": last, "min_d_fake_first_1000": {"step": low["step"], "d_fake": low["d_fake"]},
               "last_500": {"d_real": float(np.mean([r["d_real"] for r in tail])),
                            "d_fake": float(np.mean([r["d_fake"] for r in tail]))}}
    d_fake = {r["step"]: r["d_fake"] for r in rows}  # the norms are logged in rows of their own
    diag = [r for r in records if "gnorm_minimax" in r and r["step"] in d_fake]
    for name, part in (("early", [r for r in diag if early[0] <= r["step"] <= early[1]]),
                       ("late", [r for r in diag if r["step"] > last - late])):
        if not part:
            continue
        ratio = [r["gnorm_nonsaturating"] / r["gnorm_minimax"] for r in part]
        summary[f"gnorm_ratio_{name}"] = {
            "steps": [part[0]["step"], part[-1]["step"]], "min": min(ratio), "max": max(ratio),
            "mean": float(np.mean(ratio)), "median": float(np.median(ratio)),
            "d_fake_range": [min(d_fake[r["step"]] for r in part), max(d_fake[r["step"]] for r in part)],
            "d_fake_mean": float(np.mean([d_fake[r["step"]] for r in part])),
            "at_last": {"step": part[-1]["step"], "minimax": part[-1]["gnorm_minimax"],
                        "nonsaturating": part[-1]["gnorm_nonsaturating"]}}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--run", required=True, help="a run folder of this stage (experiments/02_gan/NAME)")
    parser.add_argument("--out", default="assets", help="folder for the pictures")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    if not (run_dir / "ckpt.pt").is_file():
        raise UserError(f"--run {run_dir}: no ckpt.pt there")
    out = output_dir(args.out, "--out")
    G = load_generator(run_dir / "ckpt.pt")
    records = read_metrics(run_dir / "metrics.jsonl")
    made = [training_gif(run_dir, out / "training.gif"), nearest_neighbours(G, out / "nearest.png"),
            interpolation(G, out / "interpolation.png"), d_outputs(records, out / "d_outputs.png"),
            grad_norms(records, out / "grad_norms.png")]
    made.append(out / "game_summary.json")
    made[-1].write_text(json.dumps(game_summary(records), indent=1) + "\n")
    for path in made:
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    run_entry(main)
