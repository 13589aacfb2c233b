"""Draw images from a trained VAE: z ~ p(z) = N(0, I), then the decoder's Bernoulli means sigmoid(logits).

    python sample.py                                  # newest run of this stage, else pretrained/mnist.pt
    python sample.py --num-samples 10000 --out samples.npz && python -m shared.evaluate samples.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from model import SIZES, VAE, vae_config

from shared import UserError
from shared.checkpoint import load_checkpoint, load_error
from shared.cli import add_sample_args, check_sample_args, run_entry, sample_outputs
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz
from shared.runtime import choose_device

STAGE = "01_vae"


def load_model(ckpt_arg: str, device: torch.device | str = "cpu") -> tuple[VAE, dict, Path]:
    """The VAE of a checkpoint (``--ckpt``, else the newest run, else pretrained/), rebuilt from its config."""
    path = find_checkpoint(STAGE, Path(__file__).parent, ckpt_arg)
    ckpt = load_checkpoint(path, STAGE)
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if cfg.get("model") not in SIZES:
        raise UserError(f"{path} names an unknown model {cfg.get('model')!r}")
    model = VAE(vae_config(cfg["model"], cfg.get("z_dim", 0)))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path} does not hold this stage's VAE weights ({load_error(err)})") from None
    return model.to(device).eval(), ckpt, path


@torch.no_grad()
def sample_prior(model: VAE, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """``n`` decoder means at z ~ N(0, I): (n, 1, 28, 28) floats in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - start), model.cfg.z_dim, generator=g).to(device)  # (b, N_z)
        out.append(torch.sigmoid(model.decode(z)).cpu())  # (b, 1, 28, 28)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> Path:
    parser = add_sample_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    check_sample_args(args)
    model, ckpt, path = load_model(args.ckpt, choose_device(args.device))
    out, png = sample_outputs(args.out, path)
    images = sample_prior(model, args.num_samples, args.batch_size, args.seed)
    save_samples_npz(out, images, value_range=(0.0, 1.0))
    grid = save_grid(images[:64], png, value_range=(0.0, 1.0))
    print(f"{len(images)} samples from {path} (step {ckpt['step']}) -> {out}, grid {grid}")
    return out


if __name__ == "__main__":
    run_entry(main)
