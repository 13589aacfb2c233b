"""Train a class-conditional DiT on MNIST with the LightningDiT recipe (rectified flow, logit-normal t, cosine
loss, SwiGLU, RMSNorm, 2-D RoPE, QK-norm, AdamW beta2 = 0.95; each a flag), or the vanilla DiT of Peebles &
Xie (2022) with the DDPM eps-objective by turning them off.

    python train.py                      # default preset: DiT-tiny/4 with the LightningDiT recipe
    python train.py --preset full        # the same, 22,000 steps, the last 4,000 with a decaying learning rate
    python train.py --objective ddpm --no-logit-normal --cos-weight 0 --no-swiglu --no-rmsnorm --no-rope \
        --no-qk-norm --beta2 0.999       # vanilla DiT
    python train.py --latents ../experiments/04_dit-vavae/aligned/ckpt.pt    # on 7x7x4 VA-VAE latents
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusion import ddpm_loss, linear_alpha_bar, rf_loss, sample
from model import SIZES, DiT, dit_config
from vavae import Autoencoder, decode_latents, prepare_latents

from shared import UserError
from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_symmetric
from shared.experiment import Run
from shared.runtime import autocast, to_device

STAGE = "04_dit"

PRESETS = {
    "smoke": dict(dataset="synthetic", size="micro", steps=30, batch_size=16, sample_every=0, ckpt_every=0,
                  sample_steps=5, warmup=5),
    "default": dict(steps=2000, batch_size=64, sample_every=1000, ckpt_every=500),
    # the default recipe 11x longer, its last 4,000 steps with a decaying learning rate: ~1.5 h on a 2-core CPU,
    # where it met both targets (README section 6, "Decaying the learning rate")
    "full": dict(steps=22_000, decay_steps=4_000, sample_every=2000, ckpt_every=1000),
    # DiT-small/2 (8x the Gflops of DiT-tiny/2): the preset named "full" until 2026-11-30, of the first H200 rows
    "small2": dict(size="small", patch_size=2, steps=100_000, batch_size=256, lr=3e-4, ema_decay=0.9999,
                   warmup=1000, sample_every=5000, ckpt_every=5000),
}


@dataclass
class TrainConfig(CommonConfig):
    steps: int = arg(2000, "optimizer steps to train for (in total, also when resuming)", min=1)
    batch_size: int = arg(64, "images per step (per process under DDP)", min=1)
    lr: float = arg(1e-3, "peak AdamW learning rate (DiT: 1e-4 at batch 256 for 400k steps)", min=1e-12)
    size: str = arg("tiny", "named model size (model.py::SIZES)", tuple(SIZES))
    patch_size: int = arg(4, "patch side: 4 -> 7x7 = 49 tokens, 2 -> 14x14 = 196 tokens", (2, 4))
    objective: str = arg("flow", "ddpm: eps-prediction (DiT); flow: rectified flow, velocity prediction "
                         "(LightningDiT)", ("ddpm", "flow"))
    logit_normal: bool = arg(True, "flow only: draw t from the logit-normal instead of U(0, 1)")
    cos_weight: float = arg(1.0, "flow only: weight of the velocity-direction (cosine) loss term")
    swiglu: bool = arg(True, "SwiGLU feed-forward instead of the GELU MLP")
    rmsnorm: bool = arg(True, "RMSNorm instead of LayerNorm")
    rope: bool = arg(True, "2-D rotary position embedding in every attention layer")
    qk_norm: bool = arg(True, "RMS-normalise queries and keys")
    beta2: float = arg(0.95, "AdamW beta2 (LightningDiT: 0.95; DiT: 0.999); below 1, as AdamW requires",
                       max=0.99999)
    class_dropout: float = arg(0.1, "probability of dropping a label to the null class, per sample", max=1)
    ema_decay: float = arg(0.999, "EMA decay of the weights that sample.py uses (with a 1+n / 10+n warm-up)",
                           max=1)
    warmup: int = arg(100, "linear learning-rate warm-up steps")
    decay_steps: int = arg(0, "not in either paper: decay the learning rate linearly to 0 over the last N steps "
                           "(0: constant after the warm-up)")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    cfg_scale: float = arg(2.0, "classifier-free guidance scale of the grids written while training")
    sample_steps: int = arg(25, "sampler steps for the grids written while training", min=1)
    sample_every: int = arg(1000, "write a sample grid every N steps (0: only at the end)")
    latents: str = arg("", "a train_vavae.py checkpoint: train on its frozen encoder's 7x7x4 latents (normalised "
                       "per channel, Eq. 22) with patch size 1 instead of on pixels; --patch-size is then ignored")


def build_model(cfg: TrainConfig, ae: Autoencoder | None = None) -> DiT:
    shape = dict(patch_size=cfg.patch_size) if ae is None else dict(image_size=7, in_channels=ae.cfg.z_channels,
                                                                     patch_size=1)
    return DiT(dit_config(cfg.size, class_dropout=cfg.class_dropout, swiglu=cfg.swiglu, rmsnorm=cfg.rmsnorm,
                          rope=cfg.rope, qk_norm=cfg.qk_norm, **shape))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step 1..cfg.steps: a linear warm-up, then constant (as DiT and LightningDiT), then, with
    --decay-steps N, a linear decay over the last N steps (warm-up-stable-decay, Hägele et al. 2024): a
    constant-rate run can be continued, and its last steps average out the noise a constant rate leaves."""
    lr = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
    if cfg.decay_steps:
        lr *= min(1.0, (cfg.steps - step + 1) / cfg.decay_steps)  # 1 at the decay's first step, 1/N at the last
    return lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)  # e = decay e + (1 - decay) p


@torch.no_grad()
def sample_grid(ema: DiT, cfg: TrainConfig, device, per_class: int = 8, seed: int = 0,
                ae: Autoencoder | None = None) -> torch.Tensor:
    """(10 per_class, 1, 28, 28) in [-1, 1]: one row per digit, from a fixed noise (a private generator,
    so sampling never moves the training RNG); latent samples are decoded by the autoencoder."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(per_class).to(device)
    c, s = ema.cfg.in_channels, ema.cfg.image_size
    noise = torch.randn(len(y), c, s, s, generator=g).to(device)
    sampler = "ddim" if cfg.objective == "ddpm" else "heun"
    x = sample(ema, noise, y, cfg.objective, sampler, cfg.sample_steps, cfg.cfg_scale, ema.cfg.num_classes,
               generator=g, clip=ae is None)
    return x if ae is None else decode_latents(ae, x)


def main(cfg: TrainConfig):
    if cfg.decay_steps > cfg.steps:
        raise UserError(f"--decay-steps ({cfg.decay_steps}) must not exceed --steps ({cfg.steps})")
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset)
        ae = None
        if cfg.latents:  # VA-VAE variant: the data are the frozen encoder's normalised latents (Eq. 22)
            ae, images = prepare_latents(cfg.latents, images)  # (N, 4, 7, 7) float
            ae = ae.to(run.device)
        extra = {} if ae is None else {"autoencoder": ae}  # saved with the DiT, so sample.py can decode
        model = build_model(cfg, ae).to(run.device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=0.0)
        run.restore(model=model, ema=ema, optimizer=opt)
        net = run.wrap(model)
        alpha_bar = linear_alpha_bar().to(run.device)
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():
            x, y = next(batches)
            x0 = to_symmetric(x) if ae is None else x  # (B, 1, 28, 28) pixels in [-1, 1], or (B, 4, 7, 7) latents
            x0, y = to_device(x0, run.device), to_device(y, run.device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            with autocast(run.device, cfg.amp):
                if cfg.objective == "ddpm":
                    losses = ddpm_loss(net, x0, y, alpha_bar)
                else:
                    losses = rf_loss(net, x0, y, cfg.logit_normal, cfg.cos_weight)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            run.log(step, **losses)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, ema=ema, optimizer=opt, **extra)
            if run.every(cfg.sample_every, step):
                run.save_images(sample_grid(ema, cfg, run.device, ae=ae), f"step{step:06d}.png", nrow=8)
        run.save_checkpoint(model=model, ema=ema, optimizer=opt, **extra)
        run.save_images(sample_grid(ema, cfg, run.device, ae=ae), "final.png", nrow=8)
        return ema


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
