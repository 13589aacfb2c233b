"""The lesson's pictures from one checkpoint: guidance-scale sweep, samples along the sampler's trajectory and
the attention maps of one block, written to assets/.

    python figures.py --ckpt pretrained/mnist.pt --steps 25
    python figures.py --vavae PLAIN.pt ALIGNED.pt    # test digits and their reconstructions by two autoencoders
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusion import T_STEPS, linear_alpha_bar, q_sample, rf_interpolate, sample
from sample import STAGE, load_model
from train_vavae import reconstruct
from vavae import AE_STAGE, ae_from_state_dict

from shared import UserError
from shared.checkpoint import load_checkpoint
from shared.cli import check_seed, one_line_error, output_dir, run_entry
from shared.data import load_images
from shared.experiment import find_checkpoint
from shared.images import save_grid

HERE = Path(__file__).parent


def reconstruction_figure(paths: list[str], out: Path, n: int = 12) -> Path:
    """Row 1: n test digits; then one row of reconstructions (posterior mean) per train_vavae.py checkpoint."""
    images, _ = load_images("mnist", train=False)
    rows = [images[:n]]
    for path in paths:
        rows.append(reconstruct(ae_from_state_dict(load_checkpoint(path, AE_STAGE)["model"]).eval(), images[:n]))
    return save_grid(torch.cat(rows), out / "vavae_recon.png", nrow=n)


def noised(x0: torch.Tensor, eps: torch.Tensor, t_unit: float, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t at the normalised time t_unit in (0, 1) by the model's own forward process, and the time the network is
    shown: Eq. (2) at step t_unit T for a DDPM model, Eq. (7) at t = t_unit for a flow model (fed as T t)."""
    step = round(t_unit * T_STEPS)
    t = torch.full((x0.shape[0],), step)
    if objective == "ddpm":
        return q_sample(x0, t, eps, linear_alpha_bar()), t.float()
    return rf_interpolate(x0, eps, torch.full((x0.shape[0],), t_unit))[0], t.float()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--ckpt", default="", help="pixel-space DiT checkpoint to draw (default: this stage's "
                        "newest run, else pretrained/mnist.pt)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (DDIM for eps-models, Heun for flow)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0],
                        help="guidance scales of the sweep, one row each")
    parser.add_argument("--out", default=str(HERE / "assets"), help="folder the PNGs are written to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise every picture starts from")
    parser.add_argument("--vavae", nargs="+", default=[], metavar="CKPT", help="instead: test digits and their "
                        "reconstructions by these train_vavae.py checkpoints (one row each) -> vavae_recon.png")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not all(math.isfinite(s) and s >= 0 for s in args.scales):
        raise UserError(f"--scales must be finite and non-negative, got {args.scales}")
    check_seed(args.seed)
    out = output_dir(args.out, "--out")
    if args.vavae:
        print(f"wrote {reconstruction_figure(args.vavae, out)}")
        return
    model, cfg, ae = load_model(find_checkpoint(STAGE, HERE, args.ckpt), "cpu")
    if ae is not None:
        raise UserError("figures.py draws pixel-space DiTs; this checkpoint was trained on VA-VAE latents")
    sampler = "ddim" if cfg["objective"] == "ddpm" else "heun"
    null = model.cfg.num_classes
    y = torch.arange(10)
    noise = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))

    # guidance sweep: one row per scale, one column per digit, the same noise in every row
    rows = [sample(model, noise, y, cfg["objective"], sampler, args.steps, s, null) for s in args.scales]
    save_grid(torch.cat(rows), out / "cfg_sweep.png", nrow=10)

    # trajectory: one row per digit, columns from noise (left) to sample (right)
    path = []
    sample(model, noise, y, cfg["objective"], sampler, args.steps, 2.0, null, trajectory=path)
    picks = torch.linspace(0, len(path) - 1, 8).round().long().tolist()
    frames = torch.stack([noise] + [path[i] for i in picks], dim=1)  # (10, 9, 1, 28, 28)
    save_grid(frames.flatten(0, 1), out / "trajectory.png", nrow=9)

    # attention maps of the last block at a mid noise level (t/T = 0.3, noised as the model was trained): each
    # head, for the query token at the centre
    x0 = path[-1][:4]
    x_t, t = noised(x0, noise[:4], 0.3, cfg["objective"])
    maps = model.attention_maps(x_t, t, y[:4], block=model.cfg.depth - 1)  # (4, nh, T, T)
    g = model.cfg.grid
    centre = (g // 2) * g + g // 2
    heads = maps[:, :, centre].reshape(4, -1, 1, g, g)  # (4, nh, 1, g, g)
    heads = heads / heads.amax(dim=(-2, -1), keepdim=True)
    heads = torch.nn.functional.interpolate(heads.flatten(0, 1), size=28, mode="nearest").unflatten(0, (4, -1))
    tiles = torch.cat([(x0[:, None] + 1) / 2, heads], dim=1)  # (4, 1 + nh, 1, 28, 28) in [0, 1]
    save_grid(tiles.flatten(0, 1), out / "attention.png", nrow=tiles.shape[1], value_range=(0.0, 1.0))
    print(f"wrote cfg_sweep.png, trajectory.png, attention.png to {out}")


if __name__ == "__main__":
    run_entry(main)
