"""Draw digits from a trained DDPM: the ancestral sampler (Algorithm 2, T steps) or DDIM (S steps, eta).

    python sample.py                                   # DDIM, 20 steps, eta = 1, from the newest run
    python sample.py --sampler ddpm --var beta_tilde   # the paper's 1000-step sampler
    python sample.py --steps 50 --eta 0 --num-samples 10000 --out ddim50.npz   # deterministic DDIM
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusion import Diffusion
from model import SIZES, build_unet
from tqdm import tqdm
from train import STAGE, make_diffusion

from shared import UserError
from shared.checkpoint import load_checkpoint, load_error
from shared.cli import add_sample_args, check_sample_args, run_entry, sample_outputs
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz
from shared.runtime import choose_device


def load_model(path: Path, device) -> tuple[torch.nn.Module, Diffusion, dict]:
    """The EMA network (a pretrained file holds only those weights, as 'model'), in float32 and eval mode."""
    ckpt = load_checkpoint(path, STAGE)
    cfg = ckpt["config"]
    if cfg.get("model") not in SIZES:
        raise UserError(f"{path} names an unknown U-Net size {cfg.get('model')!r}")
    model = build_unet(cfg["model"], cfg["dropout"])
    weights = ckpt.get("ema", ckpt["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the U-Net '{cfg['model']}' ({load_error(err)})") from None
    return model.to(device).eval(), make_diffusion(cfg).to(device), ckpt


def generate(model, diffusion: Diffusion, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
             var: str = "beta", batch_size: int = 500, seed: int = 0, device="cpu") -> torch.Tensor:
    """n images in [-1, 1], drawn in batches from one seeded generator: (n, 1, 28, 28)."""
    g = torch.Generator(device).manual_seed(seed)
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=n <= batch_size):
        shape = (min(batch_size, n - i), 1, 28, 28)
        if sampler == "ddpm":
            out.append(diffusion.sample_ddpm(model, shape, sigma=var, generator=g, device=device).cpu())
        else:
            out.append(diffusion.sample_ddim(model, shape, S=steps, eta=eta, generator=g, device=device).cpu())
    return torch.cat(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(parser, num_samples=64)
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"),
                        help="ddpm: Algorithm 2 over all T steps; ddim: Song et al. Eq. (12) over --steps")
    parser.add_argument("--steps", type=int, default=20, help="DDIM: number of sampling steps S (1..T)")
    parser.add_argument("--eta", type=float, default=1.0,
                        help="DDIM, 0..1: 0 deterministic, 1 DDPM-like noise (the default: the better sampler for "
                             "the default preset's model, README section 6)")
    parser.add_argument("--var", default="beta", choices=("beta", "beta_tilde"),
                        help="DDPM: the reverse variance sigma_t^2")
    args = parser.parse_args(argv)
    check_sample_args(args)
    if not 0 <= args.eta <= 1:  # Song et al. Eq. (16): eta = 1 is already DDPM's noise level
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    device = choose_device(args.device)
    path = find_checkpoint(STAGE, Path(__file__).parent, args.ckpt)
    model, diffusion, ckpt = load_model(path, device)
    if args.sampler == "ddim" and not 1 <= args.steps <= diffusion.T:
        raise UserError(f"--steps must be in 1..{diffusion.T} (T of this checkpoint), got {args.steps}")
    out, png = sample_outputs(args.out, path)

    t0 = time.time()
    images = generate(model, diffusion, args.num_samples, args.sampler, args.steps, args.eta, args.var,
                      args.batch_size, args.seed, device)  # (N, 1, 28, 28)
    how = f"ddpm T={diffusion.T} var={args.var}" if args.sampler == "ddpm" else \
        f"ddim S={args.steps} eta={args.eta:g}"
    save_samples_npz(out, images)
    grid = save_grid(images[:64], png)
    print(f"{args.num_samples} samples ({how}, step {ckpt['step']} of {path}) in {time.time() - t0:.1f}s "
          f"-> {out}, {grid}")


if __name__ == "__main__":
    run_entry(main)
