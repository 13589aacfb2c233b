"""The README's pictures and numbers, from one checkpoint (default: the newest run, else pretrained/).

    python figures.py                       # forward.png, reverse_x0.png, samples.png, interpolation.png
    python figures.py --fid-steps 10,20,50 --fid-samples 1000   # + FID-MNIST of DDIM per S, fid_vs_steps.png
    python figures.py --no-pictures --fid-ddpm                   # + the 1000-step ancestral sampler's point
    python figures.py --bpd-images 64       # + the variational bound on test images, in bits/dim
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusion import Diffusion
from sample import generate, load_model
from train import STAGE

from shared import UserError
from shared.cli import one_line_error, output_dir, run_entry
from shared.data import load_images, to_symmetric
from shared.experiment import experiments_dir, find_checkpoint
from shared.images import save_grid, save_samples_npz, to_uint8
from shared.metrics import K_NEAREST


def scaled_timesteps(ts_1000: list[int], T: int) -> list[int]:
    """The t's a picture shows, given for T = 1000 and scaled by T/1000 for another T (as the schedule's ends are):
    0 stays 0, every other t lands in 1..T, and t's that meet after rounding are shown once. Same order."""
    return list(dict.fromkeys(0 if t == 0 else max(1, round(t * T / 1000)) for t in ts_1000))


def forward_process(diffusion: Diffusion, x0: torch.Tensor, out: Path) -> torch.Tensor:
    """One digit under q(x_t | x_0) (Eq. 4) at growing t, one noise draw for all t: the frames, (len(t's), 1, H, W)."""
    ts = scaled_timesteps([0, 25, 50, 100, 200, 300, 500, 700, 1000], diffusion.T)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    frames = torch.cat([x0 if t == 0 else diffusion.q_sample(x0, torch.tensor([t]), eps) for t in ts])
    save_grid(frames, out, nrow=len(ts))
    return frames


def reverse_process(model, diffusion: Diffusion, out: Path, n: int = 4) -> list[int]:
    """After Fig. 6 of the paper, which shows x_hat_0 alone: x_t (odd rows, our addition) and the network's
    x_hat_0 predicted from that x_t (even rows) along Algorithm 2, from x_T (t = T) to the sample x_0 (t = 0,
    where both rows show x_0). Returns the t's shown:
    1000, 800, 600, 400, 300, 200, 100, 50, 0 for T = 1000, scaled for another T."""
    trace = []
    diffusion.sample_ddpm(model, (n, 1, 28, 28), generator=torch.Generator().manual_seed(1), trace=trace)
    show = scaled_timesteps([1000, 800, 600, 400, 300, 200, 100, 50, 0], diffusion.T)
    picked = [(x, x0) for t, x, x0 in trace if t in show]  # each (n, 1, 28, 28), t = T..0 as in show
    rows = []
    for i in range(n):
        rows += [torch.stack([x[i] for x, _ in picked]), torch.stack([x0[i] for _, x0 in picked])]
    save_grid(torch.cat(rows), out, nrow=len(picked))
    return show


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation, which keeps the norm a Gaussian x_T should have (DDIM §5.3)."""
    omega = torch.acos((a * b).sum() / (a.norm() * b.norm()))
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def interpolation(model, diffusion: Diffusion, out: Path, pairs: int = 4, n: int = 9, S: int = 50) -> None:
    """DDIM (eta = 0) decodes of slerp(x_T^a, x_T^b, w): a smooth path between two digits."""
    g = torch.Generator().manual_seed(3)
    x_T = []
    for _ in range(pairs):
        a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
        x_T += [slerp(a, b, w) for w in torch.linspace(0, 1, n).tolist()]
    x_T = torch.cat(x_T)  # (pairs * n, 1, 28, 28)
    save_grid(diffusion.sample_ddim(model, x_T.shape, S=S, eta=0.0, x_T=x_T), out, nrow=n)


def fid_vs_steps(model, diffusion: Diffusion, runs: list[tuple[str, int, float]], n: int, batch_size: int) -> list:
    """FID-MNIST of n samples for each (sampler, S, eta): ("ddim", S, eta) is Song et al. Eq. (12) on S steps,
    ("ddpm", T, 0) is Algorithm 2."""
    from shared.metrics import evaluate

    rows = []
    for sampler, S, eta in runs:
        t0 = time.time()
        images = generate(model, diffusion, n, sampler, S, eta, batch_size=batch_size, seed=0)
        seconds = time.time() - t0
        name = f"{sampler}{S}" + (f"_eta{eta:g}" if eta else "")
        save_samples_npz(experiments_dir() / STAGE / "eval" / f"{name}.npz", images)
        scores = evaluate(to_uint8(images), device="cpu")
        row = {"sampler": sampler, "S": S, **({"eta": eta} if sampler == "ddim" else {"var": "beta"}),
               "num_samples": n, "sample_seconds": round(seconds, 1),
               **{k: v for k, v in scores.items() if isinstance(v, (int, float))}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def curve(row: dict) -> tuple[str, float]:
    """Which line of the plot a row belongs to: the sampler and, for DDIM, its eta."""
    return row["sampler"], row.get("eta", 0.0)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The FID table after a run: new points replace old ones of the same curve and S, the rest are kept."""
    replaced = {(*curve(r), r["S"]) for r in new}
    return sorted([r for r in old if (*curve(r), r["S"]) not in replaced] + new, key=lambda r: (*curve(r), r["S"]))


def merge_bpd_rows(old: list[dict], row: dict) -> list[dict]:
    """The bits/dim table after a run: the new row replaces one with the same test images and t draws."""
    key = lambda r: (r["test_images"], r["t_draws"])  # noqa: E731
    return sorted([r for r in old if key(r) != key(row)] + [row], key=key)


def plot_fid(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for line in sorted({curve(r) for r in rows}):
        pts = sorted((r["S"], r["fid"]) for r in rows if curve(r) == line)
        ax.plot(*zip(*pts), "o-", label=f"DDIM (eta={line[1]:g})" if line[0] == "ddim" else "ancestral (Algorithm 2)")
    floor = [r["fid_floor"] for r in rows if "fid_floor" in r]
    if floor:
        ax.axhline(floor[0], color="gray", ls="--", label="floor (real images, same N)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel("FID-MNIST")
    ax.set_title(f"{rows[0]['num_samples']} samples per point")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--ckpt", default="", help="checkpoint (default: newest run, else pretrained/mnist.pt)")
    parser.add_argument("--assets", default=str(Path(__file__).parent / "assets"), help="output folder")
    parser.add_argument("--fid-steps", default="", help="comma-separated DDIM step counts S to score, each in "
                        "1..T, e.g. 10,20,50")
    parser.add_argument("--fid-eta", type=float, default=0.0, help="eta of the --fid-steps DDIM points (0: "
                        "deterministic, 1: fresh noise at every step, as Algorithm 2 on the shorter chain)")
    parser.add_argument("--fid-ddpm", action="store_true", help="also score the ancestral sampler (all T steps)")
    parser.add_argument("--fid-samples", type=int, default=1000, help="samples per FID point")
    parser.add_argument("--bpd-images", type=int, default=0, help="test images for the bits/dim bound (0: skip)")
    parser.add_argument("--bpd-t", type=int, default=0, help="bits/dim: draws of t (0: all T terms)")
    parser.add_argument("--no-pictures", action="store_true", help="only the numbers")
    parser.add_argument("--batch-size", type=int, default=250, help="images per U-Net pass when sampling for FID "
                        "and per bits/dim batch")
    args = parser.parse_args(argv)
    try:
        steps = [int(s) for s in args.fid_steps.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--fid-steps must be comma-separated integers, got {args.fid_steps!r}") from None
    if not 0 <= args.fid_eta <= 1:
        raise UserError(f"--fid-eta must be in [0, 1], got {args.fid_eta}")
    if any(S < 1 for S in steps):
        raise UserError(f"--fid-steps must be at least 1 each, got {args.fid_steps!r}")
    if args.fid_samples <= K_NEAREST or args.bpd_images < 0 or args.bpd_t < 0 or args.batch_size <= 0:
        raise UserError(f"--fid-samples must be above {K_NEAREST} (the metrics' k), --batch-size positive, "
                        "--bpd-images and --bpd-t non-negative")
    assets = output_dir(args.assets, "--assets")
    path = find_checkpoint(STAGE, Path(__file__).parent, args.ckpt)
    model, diffusion, ckpt = load_model(path, torch.device("cpu"))
    if any(S > diffusion.T for S in steps):
        raise UserError(f"--fid-steps must be in 1..{diffusion.T} (T of this checkpoint), got {args.fid_steps!r}")
    print(f"{path}: step {ckpt['step']}")

    if not args.no_pictures:
        x0 = to_symmetric(load_images("mnist", train=False)[0][:1])  # (1, 1, 28, 28), a 7
        forward_process(diffusion, x0, assets / "forward.png")
        reverse_process(model, diffusion, assets / "reverse_x0.png")
        picture_steps = min(50, diffusion.T)  # DDIM steps of the pictures (a checkpoint with T < 50 has only T)
        images = generate(model, diffusion, 64, "ddim", picture_steps, 0.0, seed=0)
        save_grid(images, assets / "samples.png")
        interpolation(model, diffusion, assets / "interpolation.png", S=picture_steps)
        print(f"pictures -> {assets}")
    runs = [("ddim", S, args.fid_eta) for S in steps] + [("ddpm", diffusion.T, 0.0)] * args.fid_ddpm
    if runs:
        rows = fid_vs_steps(model, diffusion, runs, args.fid_samples, args.batch_size)
        table = assets / "fid_vs_steps.json"  # keep earlier points of other step counts
        old = json.loads(table.read_text()) if table.is_file() else []
        rows = merge_rows(old, rows)
        table.write_text(json.dumps(rows, indent=1) + "\n")
        plot_fid(rows, assets / "fid_vs_steps.png")
    if args.bpd_images:
        x0 = to_symmetric(load_images("mnist", train=False)[0][:args.bpd_images])
        t0 = time.time()
        g = torch.Generator().manual_seed(0)  # one stream for all batches: every image its own t's and noise
        bpd = torch.cat([diffusion.bits_per_dim(model, x, num_t=args.bpd_t, generator=g)
                         for x in x0.split(args.batch_size)])
        row = {"bpd": bpd.mean().item(), "bpd_se": (bpd.std() / math.sqrt(len(bpd))).item(),
               "test_images": len(bpd), "t_draws": args.bpd_t or diffusion.T - 1, "seconds": round(time.time() - t0)}
        print(json.dumps(row))
        table = assets / "bits_per_dim.json"  # one JSON list; a rerun replaces the row of its images and draws
        old = json.loads(table.read_text()) if table.is_file() else []
        rows = merge_bpd_rows(old, row)
        table.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    run_entry(main)
