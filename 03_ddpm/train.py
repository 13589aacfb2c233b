"""Train a DDPM (Ho et al. 2020) on MNIST: Algorithm 1 with Adam, learning-rate warm-up, gradient clipping
and an exponential moving average (EMA) of the weights, which is what gets sampled and saved for use."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusion import Diffusion
from model import SIZES, build_unet, count_params

from shared import UserError
from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_symmetric
from shared.experiment import Run
from shared.runtime import autocast, to_device

STAGE = "03_ddpm"

PRESETS = {
    # seconds on CPU, for nox: a tiny net on the synthetic bars
    "smoke": dict(dataset="synthetic", model="tiny", steps=30, batch_size=16, timesteps=100, warmup=5,
                  sample_every=0, ckpt_every=0, sample_steps=5, log_every=5),
    # < 15 min on 2 CPU cores (designed for ~10 min alone): recognizable digits
    "default": dict(),
    # the GPU run the README's targets are for (the paper's recipe: lr 2e-4, 5k warm-up, EMA 0.9999)
    "full": dict(model="base", steps=100_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                 sample_every=5000, ckpt_every=5000, log_every=100),
}


@dataclass
class TrainConfig(CommonConfig):
    steps: int = arg(2000, "optimizer steps to train for (in total, also when resuming)", min=1)
    batch_size: int = arg(64, "images per step (per process under DDP)", min=1)
    lr: float = arg(1e-3, "peak Adam learning rate, after warm-up", min=1e-12)
    model: str = arg("small", "U-Net size (see model.py SIZES)", tuple(SIZES))
    dropout: float = arg(0.1, "dropout inside the residual blocks, 0..1 (the paper: 0.1 on CIFAR-10)", max=1)
    timesteps: int = arg(1000, "T, the number of diffusion steps", min=2)
    schedule: str = arg("linear", "beta schedule: the paper's linear one, or cosine (Nichol & Dhariwal, an "
                        "extension)", ("linear", "cosine"))
    beta_1: float = arg(1e-4, "linear schedule: beta_1 for T = 1000, scaled by 1000/T for other T (0 < beta_1 "
                        "<= beta_T < 1)", max=1)
    beta_T: float = arg(0.02, "linear schedule: beta_T for T = 1000, scaled by 1000/T for other T (0 < beta_1 "
                        "<= beta_T < 1)", max=1)
    warmup: int = arg(200, "linear learning-rate warm-up steps")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    ema_decay: float = arg(0.995, "EMA decay of the sampled weights, 0..1 (used as min(decay, (1+k)/(10+k)) at step k)",
                           max=1)
    sample_steps: int = arg(20, "DDIM steps (eta = 0) for the sample grids drawn during training", min=1)


def make_diffusion(cfg) -> Diffusion:
    """The forward process a config describes (also what sample.py rebuilds from a checkpoint's config)."""
    if not 0 < cfg["beta_1"] <= cfg["beta_T"] < 1:
        raise UserError(f"need 0 < --beta-1 <= --beta-T < 1, got {cfg['beta_1']} and {cfg['beta_T']}")
    defaults = TrainConfig.__dataclass_fields__
    if cfg["schedule"] == "cosine" and (cfg["beta_1"], cfg["beta_T"]) != (defaults["beta_1"].default,
                                                                          defaults["beta_T"].default):
        raise UserError("--beta-1 and --beta-T set the ends of the linear schedule; --schedule cosine has none")
    return Diffusion(cfg["timesteps"], cfg["schedule"], cfg["beta_1"], cfg["beta_T"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def draw_samples(diffusion: Diffusion, ema: torch.nn.Module, cfg, device, n: int = 64) -> torch.Tensor:
    """A fixed-noise DDIM grid from the EMA weights; a private generator leaves the training RNG untouched."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    return diffusion.sample_ddim(ema, (n, 1, 28, 28), S=min(cfg.sample_steps, cfg.timesteps), eta=0.0,
                                 generator=g, device=device)


def main(cfg: TrainConfig):
    diffusion = make_diffusion(vars(cfg))
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset)  # uint8 (N, 1, 28, 28); no flips for digits
        model = build_unet(cfg.model, cfg.dropout).to(run.device)
        diffusion.to(run.device)  # its tables beside the network
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # dropout off in the EMA copy
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        run.restore(model=model, ema=ema, optimizer=opt)
        print(f"eps_theta: U-Net '{cfg.model}', {count_params(model) / 1e6:.2f}M parameters, T = {cfg.timesteps}")
        net = run.wrap(model)
        batches = run.batches(images, labels, cfg.batch_size)

        # ---- Algorithm 1: x_0 ~ q(x_0), t ~ U{1..T}, eps ~ N(0, I), step on || eps - eps_theta(x_t, t) ||^2 ----
        for step in run.steps():
            x0 = to_device(to_symmetric(next(batches)[0]), run.device)  # (B, 1, 28, 28) in [-1, 1]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
            with autocast(run.device, cfg.amp):
                loss = diffusion.loss_simple(net, x0)  # Eq. (14)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            run.log(step, loss=loss, grad_norm=grad_norm)
            if run.every(cfg.sample_every, step):
                run.save_images(draw_samples(diffusion, ema, cfg, run.device), f"step{step:06d}.png")
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, ema=ema, optimizer=opt)

        run.save_checkpoint(model=model, ema=ema, optimizer=opt)
        run.save_images(draw_samples(diffusion, ema, cfg, run.device), "final.png")
        return ema


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
