"""The lesson's pictures from a trained VAE: reconstructions, prior samples, a latent interpolation and, for a
2-D latent space (N_z = 2), the learned manifold (the paper's Fig. 4) and the test set's codes colored by digit.

    python figures.py --ckpt pretrained/mnist.pt --out assets
    python figures.py --ckpt ../experiments/01_vae/<z2 run>/ckpt.pt --out assets --prefix z2_
    python figures.py --curves ../experiments/01_vae/fig2/{,ws-}z{3,5,10,20,200} --out assets   # Fig. 2 from runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from model import SIZES, VAE
from sample import load_model, sample_prior
from train import binarized_test_set

from shared import UserError
from shared.checkpoint import load_checkpoint
from shared.cli import check_seed, one_line_error, output_dir, run_entry
from shared.data import DATASETS
from shared.images import read_metrics, save_grid


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Rows of inputs x and below each the decoder mean at z = mu(x): (2B, 1, 28, 28), B a multiple of 16."""
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))
    return torch.stack([x.view(-1, 16, 1, 28, 28), recon.view(-1, 16, 1, 28, 28)], 1).reshape(-1, 1, 28, 28)


@torch.no_grad()
def interpolation(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoder means along the straight line from mu(x_a) to mu(x_b), one row per pair: (B*steps, 1, 28, 28)."""
    mu_a, mu_b = model.encode(x_a)[0], model.encode(x_b)[0]    # (B, N_z)
    t = torch.linspace(0, 1, steps)[None, :, None]               # (1, steps, 1)
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]               # (B, steps, N_z)
    return torch.sigmoid(model.decode(z.flatten(0, 1)))


@torch.no_grad()
def manifold(model: VAE, n: int = 20) -> torch.Tensor:
    """Fig. 4: a grid of unit-square coordinates mapped through the Gaussian inverse CDF to z, decoded: (n*n, ...)."""
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    g = torch.distributions.Normal(0.0, 1.0).icdf(u)              # (n,)
    z = torch.stack(torch.meshgrid(-g, g, indexing="ij")[::-1], -1).reshape(-1, 2)  # rows: z2 high->low
    return torch.sigmoid(model.decode(z))


@torch.no_grad()
def plot_latent_codes(model: VAE, x: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Scatter of the posterior means mu(x) of test images, colored by digit (N_z = 2 only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mu = torch.cat([model.encode(x[i:i + 1000])[0] for i in range(0, len(x), 1000)])
    fig, ax = plt.subplots(figsize=(5, 4.4))
    points = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ticks=range(10), label="digit")
    ax.set_xlabel("$\\mu_1(x)$")
    ax.set_ylabel("$\\mu_2(x)$")
    ax.set_title(f"{len(x)} test digits in the 2-D latent space")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def lower_bound_curve(run: Path) -> dict:
    """One run's Fig. 2 data: training images seen at each test evaluation, the test ELBO there, and the mean
    training ELBO (one z per image, as logged) over the steps since the previous evaluation. Images seen count
    every process of a torchrun run: step x batch size x the world size its checkpoint records."""
    if not (run / "config.json").is_file() or not (run / "metrics.jsonl").is_file():
        raise UserError(f"{run} is not a run folder of train.py (no config.json / metrics.jsonl)")
    cfg = json.loads((run / "config.json").read_text())
    rows = read_metrics(run / "metrics.jsonl")
    ckpt = run / "ckpt.pt"
    world = load_checkpoint(ckpt).get("world_size", 1) if ckpt.is_file() else 1
    seen, test, train, window = [], [], [], []
    for row in rows:
        if "elbo" in row:
            window.append(row["elbo"])
        if "test_elbo" in row and window:
            seen.append(row["step"] * cfg["batch_size"] * world)
            test.append(row["test_elbo"])
            train.append(sum(window) / len(window))
            window = []
    if not seen:
        raise UserError(f"{run}/metrics.jsonl has no test_elbo rows")
    return dict(z_dim=cfg["z_dim"] or SIZES[cfg["model"]].z_dim, method=cfg.get("method", "aevb"), seen=seen,
                test=test, train=train)


def plot_lower_bound_curves(curves: list[dict], path: Path) -> Path:
    """The paper's Fig. 2 from our runs' curves (:func:`lower_bound_curve`): the lower bound per image against
    training images seen, one panel per N_z, train (line) and test (dots), AEVB and wake-sleep in two colors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_dims = sorted({c["z_dim"] for c in curves})
    fig, axes = plt.subplots(1, len(z_dims), figsize=(2.6 * len(z_dims), 2.8), sharey=True, squeeze=False)
    for ax, z_dim in zip(axes[0], z_dims):
        for c in sorted((c for c in curves if c["z_dim"] == z_dim), key=lambda c: c["method"]):
            color, name = {"aevb": ("C0", "AEVB"), "wake-sleep": ("C3", "Wake-Sleep")}[c["method"]]
            ax.plot(c["seen"], c["train"], lw=1.2, color=color, label=f"{name} (train)")
            ax.plot(c["seen"], c["test"], ".", ms=2.5, color=color, alpha=0.6, label=f"{name} (test)")
        ax.set_xscale("log")
        ax.set_title(f"MNIST, $N_z$ = {z_dim}")
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("lower bound per image (nats)")
    # the first training window averages over the untrained start, far below: keep the test points in view
    axes[0][0].set_ylim(min(min(c["test"]) for c in curves) - 5, max(max(c["train"] + c["test"]) for c in curves) + 3)
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = one_line_error  # a bad flag is one line on stderr and exit code 2, not argparse's usage block
    p.add_argument("--ckpt", default="", help="checkpoint (default: newest run of this stage, else pretrained/)")
    p.add_argument("--out", default="assets", help="folder for the PNGs")
    p.add_argument("--prefix", default="", help="prefix of the file names")
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="test images to reconstruct and encode")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior samples")
    p.add_argument("--curves", nargs="+", default=[], metavar="RUN",
                   help="instead of pictures of one checkpoint, draw the paper's Fig. 2 (lower bound against "
                   "training images seen) from these run folders' metrics")
    args = p.parse_args(argv)
    check_seed(args.seed)
    if Path(args.prefix).name != args.prefix:  # a prefix is part of a file name; --out says where
        raise UserError(f"--prefix {args.prefix!r} must not hold a path; put the folder in --out")
    out = output_dir(args.out, "--out")
    if args.curves:  # the picture, and its numbers beside it
        curves = {run: lower_bound_curve(Path(run)) for run in args.curves}
        path = plot_lower_bound_curves(list(curves.values()), out / f"{args.prefix}lower_bound_curves.png")
        numbers = path.with_suffix(".json")
        numbers.write_text(json.dumps(curves) + "\n")
        for p in (path, numbers):
            print(f"wrote {p} ({p.stat().st_size // 1024} KB)")
        return [path, numbers]
    model, _, _ = load_model(args.ckpt)
    x, labels = binarized_test_set(args.dataset)
    name = lambda s: out / f"{args.prefix}{s}.png"  # noqa: E731
    grid = dict(value_range=(0.0, 1.0))
    paths = [save_grid(reconstructions(model, x[:32]), name("reconstructions"), nrow=16, **grid),
             save_grid(sample_prior(model, 64, 64, args.seed), name("prior_samples"), nrow=8, **grid),
             save_grid(interpolation(model, x[32:38], x[38:44]), name("interpolation"), nrow=10, **grid)]
    if model.cfg.z_dim == 2:
        paths += [save_grid(manifold(model), name("manifold"), nrow=20, padding=0, **grid),
                  plot_latent_codes(model, x, labels, name("latent_codes"))]
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return paths


if __name__ == "__main__":
    run_entry(main)
