"""Sample class-conditional digits from a trained DiT with classifier-free guidance.

    python sample.py                                   # newest run, else pretrained/mnist.pt; one row per digit
    python sample.py --class-label 7 --cfg-scale 3 --sampler euler --steps 100
    python sample.py --num-samples 10000 --out samples.npz && python -m shared.evaluate samples.npz

A DiT trained on VA-VAE latents (train.py --latents) samples 7x7x4 latents; its checkpoint carries the frozen
autoencoder, whose decoder turns them into 28x28 digits, so the .npz and the metrics are the same as for pixels.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusion import SAMPLERS, sample
from model import DiT, dit_config
from tqdm import tqdm
from vavae import Autoencoder, ae_from_state_dict, decode_latents

from shared import UserError
from shared.checkpoint import load_checkpoint, load_error
from shared.cli import add_sample_args, check_sample_args, run_entry, sample_outputs
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz
from shared.runtime import choose_device

STAGE = "04_dit"


def parse_args(argv=None) -> argparse.Namespace:
    parser = add_sample_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter), 100)
    parser.add_argument("--class-label", type=int, default=-1, help="digit to draw (default -1: every digit, "
                        "in equal shares, one grid row per digit)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (1: none; "
                        "default: %(default)s)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="ddpm|ddim for eps-models, "
                        "euler|heun for flow models (default: ddim, resp. heun)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default: %(default)s)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                        help="guide only while the normalised time t/T is in [LO, HI] (default: always)")
    return parser.parse_args(argv)


def load_model(path: Path, device) -> tuple[DiT, dict, Autoencoder | None]:
    """The DiT (EMA weights), its training config, and the frozen autoencoder if it was trained on latents."""
    ckpt = load_checkpoint(path, STAGE)
    c = ckpt["config"]
    try:
        ae = ae_from_state_dict(ckpt["autoencoder"]).to(device).eval() if "autoencoder" in ckpt else None
        shape = dict(patch_size=c["patch_size"]) if ae is None else dict(image_size=7, in_channels=ae.cfg.z_channels,
                                                                         patch_size=1)
        model = DiT(dit_config(c["size"], class_dropout=0.0, swiglu=c["swiglu"], rmsnorm=c["rmsnorm"],
                               rope=c["rope"], qk_norm=c["qk_norm"], **shape))
        weights = ckpt["ema"] if "ema" in ckpt else ckpt["model"]
        model.load_state_dict(weights)
    except KeyError as err:
        raise UserError(f"{path} is not a DiT checkpoint of this stage (it has no {err})") from None
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the DiT its config describes ({load_error(err)})") from None
    return model.to(device).eval(), c, ae


def main(argv=None):
    args = parse_args(argv)
    check_sample_args(args)
    if not -1 <= args.class_label <= 9:
        raise UserError(f"--class-label must be a digit 0..9 (or -1 for all), got {args.class_label}")
    if args.steps < 1 or not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise UserError(f"--steps must be at least 1 and --cfg-scale finite and non-negative, got --steps "
                        f"{args.steps} --cfg-scale {args.cfg_scale:g}")
    lo, hi = args.cfg_interval
    if not 0 <= lo < hi <= 1:  # also false for NaN
        raise UserError(f"--cfg-interval LO HI needs 0 <= LO < HI <= 1 (normalised time), got {lo:g} {hi:g}")
    device = choose_device(args.device)
    path = find_checkpoint(STAGE, Path(__file__).parent, args.ckpt)
    model, cfg, ae = load_model(path, device)
    sampler = args.sampler or ("ddim" if cfg["objective"] == "ddpm" else "heun")
    if SAMPLERS[sampler] != cfg["objective"]:
        raise UserError(f"--sampler {sampler} needs a {SAMPLERS[sampler]} model; {path} was trained with "
                        f"--objective {cfg['objective']}")
    npz, grid = sample_outputs(args.out, path)
    n = args.num_samples
    if args.class_label >= 0:
        labels = torch.full((n,), args.class_label, dtype=torch.long)
    else:
        labels = torch.arange(n) * 10 // n  # sorted: grid row i holds digit i when n is a multiple of 10
    g = torch.Generator().manual_seed(args.seed)
    c, s = model.cfg.in_channels, model.cfg.image_size
    noise = torch.randn(n, c, s, s, generator=g)  # (n, 1, 28, 28) pixels or (n, 4, 7, 7) latents
    out = []
    for i in tqdm(range(0, n, args.batch_size), desc="sampling", unit="batch", disable=n <= args.batch_size):
        x = sample(model, noise[i:i + args.batch_size].to(device), labels[i:i + args.batch_size].to(device),
                   cfg["objective"], sampler, args.steps, args.cfg_scale, model.cfg.num_classes,
                   tuple(args.cfg_interval), generator=g, clip=ae is None)
        out.append((x if ae is None else decode_latents(ae, x)).cpu())
    images = torch.cat(out)  # (n, 1, 28, 28) in [-1, 1]
    save_samples_npz(npz, images, labels)
    if args.class_label < 0 and n >= 10:  # one row per digit, up to 10 each
        per = min(10, n // 10)
        idx = torch.cat([torch.nonzero(labels == d).flatten()[:per] for d in range(10)])
        save_grid(images[idx], grid, nrow=per)
    else:
        save_grid(images[:100], grid, nrow=10)
    print(f"{n} samples ({sampler}, {args.steps} steps, cfg {args.cfg_scale:g}) from {path} -> {npz}, {grid}")


if __name__ == "__main__":
    run_entry(main)
