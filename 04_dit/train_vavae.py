"""Train the toy VA-VAE: a KL autoencoder 28x28x1 -> 7x7x4 whose latents are aligned to the frozen MNIST classifier
(DINOv2's stand-in) by the VF loss of Yao et al. 2025; with --no-align, the same autoencoder without it. The
checkpoint is what `python train.py --latents CKPT` trains a DiT on.

    python train_vavae.py --run-name aligned                 # default preset, with the VF loss
    python train_vavae.py --run-name plain --no-align        # the same autoencoder, no alignment
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from vavae import AE_STAGE, AEConfig, Autoencoder, ae_losses, foundation_features, vf_loss

from shared import UserError
from shared.classifier import load_classifier
from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_symmetric, to_unit
from shared.experiment import Run
from shared.images import to_uint8
from shared.runtime import autocast, to_device

STAGE = AE_STAGE  # its own experiments/ folder, so that sample.py never mistakes it for a DiT run

PRESETS = {
    "smoke": dict(dataset="synthetic", steps=20, batch_size=16, width=4, sample_every=0, ckpt_every=0),
    "default": dict(steps=2000, batch_size=64, sample_every=500, ckpt_every=500),
    "full": dict(steps=20_000, batch_size=128, sample_every=2000, ckpt_every=2000),
}


@dataclass
class TrainConfig(CommonConfig):
    steps: int = arg(2000, "optimizer steps to train for (in total, also when resuming)", min=1)
    batch_size: int = arg(64, "images per step (per process under DDP)", min=1)
    lr: float = arg(1e-3, "Adam learning rate", min=1e-12)
    width: int = arg(16, "autoencoder width (channels of its first conv)", min=1)
    beta: float = arg(1e-3, "weight of the KL term (per pixel) in Eq. (16)")
    align: bool = arg(True, "add the VF loss (Eq. 21) against the frozen classifier's 7x7x64 features")
    vf_weight: float = arg(0.5, "w_hyper of Eq. (21) (paper: 0.5 in its first stage, then 0.1)")
    m1: float = arg(0.5, "margin of the marginal cosine loss, Eq. (18) (paper: 0.5); at 2 it never acts", max=2)
    m2: float = arg(0.25, "margin of the marginal distance-matrix loss, Eq. (19) (paper: 0.25); at 2 it never "
                    "acts", max=2)
    sample_every: int = arg(500, "write a reconstruction grid every N steps (0: only at the end)")


@torch.no_grad()
def reconstruct(ae: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> uint8 reconstructions through the posterior mean."""
    device = next(ae.parameters()).device
    out = [ae.decode(ae.encode(to_symmetric(images[i:i + batch_size]).to(device))[0]).cpu()
           for i in range(0, len(images), batch_size)]
    return to_uint8(torch.cat(out))


def recon_grid(ae: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """(32, 1, 28, 28) in [-1, 1]: 16 test images (rows 1-2) above their reconstructions (rows 3-4)."""
    return to_symmetric(torch.cat([images[:16], reconstruct(ae, images[:16])]))


def main(cfg: TrainConfig) -> dict:
    if cfg.compile and cfg.align:  # torch 2.14's compiled backward refuses (or gets wrong) a second gradient
        raise UserError("--compile cannot take the adaptive weight's gradients of one forward pass (Eq. 20); "
                        "add --no-align or leave out --compile")
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset)
        test_images, test_labels = load_images(cfg.dataset, train=False)
        ae = Autoencoder(AEConfig(width=cfg.width)).to(run.device)
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
        # Loaded before restore(): building the classifier draws from the global RNG, which a resumed run must
        # then set back to the checkpoint's state, as a straight run's next draw would find it.
        classifier = load_classifier(run.device) if cfg.align else None
        run.restore(model=ae, optimizer=opt)
        # Without alignment the VF projection W (ae.proj) gets no gradient; DDP must then not wait for it.
        net = run.wrap(ae, find_unused_parameters=not cfg.align)
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():
            x, _ = next(batches)
            x = to_device(to_symmetric(x), run.device)  # (B, 1, 28, 28) in [-1, 1]
            with autocast(run.device, cfg.amp):
                out = net(x)  # z = mu + sigma eps (Eq. 14), x_hat = decode(z)
                losses = ae_losses(out, x, cfg.beta)  # Eq. (16)
                loss = losses["ae"]
                if cfg.align:
                    f = foundation_features(classifier, x)  # (B, 64, 7, 7), frozen
                    losses.update(vf_loss(ae, out["z"], f, losses["rec"], cfg.m1, cfg.m2, cfg.vf_weight))  # (17)-(21)
                    loss = loss + losses["vf"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.log(step, **losses)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=ae, optimizer=opt)
            if run.every(cfg.sample_every, step):
                run.save_images(recon_grid(ae, test_images), f"step{step:06d}.png", nrow=8)
        run.save_checkpoint(model=ae, optimizer=opt)
        run.save_images(recon_grid(ae, test_images), "final.png", nrow=8)

        # Reconstruction quality on the test split, through the posterior mean.
        ae.eval()
        rec = reconstruct(ae, test_images)
        mse = (to_unit(rec) - to_unit(test_images)).pow(2).mean().item()  # pixels in [0, 1]
        result = {"test_mse": mse, "test_psnr": 10 * math.log10(1 / mse)}
        if cfg.dataset == "mnist":
            from shared.metrics import evaluate

            scores = evaluate(rec, test_labels, device=run.device)
            result.update(recon_fid=scores["fid"], recon_fid_floor=scores["fid_floor"],
                          recon_label_accuracy=scores["label_accuracy"])
        run.flush(run.step, **result)
        if run.is_main:
            print(" ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
