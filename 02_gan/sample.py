"""Draw samples x = G(z), z ~ p_z, from a trained generator: a grid PNG and a .npz of uint8 images.

    python sample.py                                  # newest run of this stage, else pretrained/mnist.pt
    python sample.py --num-samples 10000 --out samples.npz
    python -m shared.evaluate samples.npz --parzen    # FID-MNIST, precision/recall, Parzen log-likelihood
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from model import build_gan, sample_noise
from train import STAGE, gan_config_of

from shared import UserError
from shared.checkpoint import load_checkpoint, load_error, weights_of
from shared.cli import add_sample_args, check_sample_args, run_entry, sample_outputs
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz, to_uint8
from shared.runtime import choose_device


def load_generator(path: Path, device="cpu", weights: str | None = None) -> torch.nn.Module:
    """The generator of a checkpoint (a training run's, or the exported ``pretrained/mnist.pt``): its weight
    average ("ema", kept by ``train.py --ema-decay``) or its last weights ("model"); by default the average when
    the checkpoint holds one (``shared.checkpoint.weights_of``)."""
    ckpt = load_checkpoint(path, STAGE)
    state = weights_of(ckpt, path, weights)
    G, _ = build_gan(gan_config_of(ckpt["config"]))
    try:
        G.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit its own config ({load_error(err)})") from None
    return G.to(device).eval()


@torch.no_grad()
def generate(G, n: int, batch_size: int, seed: int, device="cpu") -> torch.Tensor:
    """n samples as uint8 (n, 1, 28, 28); the noise comes from its own seeded generator."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        z = sample_noise(min(batch_size, n - start), G.cfg, generator=rng).to(device)  # (b, z_dim)
        out.append(to_uint8(G(z), G.value_range))
    return torch.cat(out)


def main(argv=None):
    parser = add_sample_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--weights", choices=("ema", "model"), help="G's weight average (if the run kept one with "
                        "--ema-decay, the default then) or its last weights")
    args = parser.parse_args(argv)
    check_sample_args(args)
    path = find_checkpoint(STAGE, Path(__file__).parent, args.ckpt)
    out, png = sample_outputs(args.out, path)
    device = choose_device(args.device)
    G = load_generator(path, device, args.weights)
    images = generate(G, args.num_samples, args.batch_size, args.seed, device)  # (N, 1, 28, 28) uint8
    save_samples_npz(out, images)
    grid = save_grid(images[:64], png)
    print(f"{len(images)} samples from {path} -> {out} (grid: {grid})")
    return out


if __name__ == "__main__":
    run_entry(main)
