"""Train text-to-image on captioned MNIST: first a mini-CLIP (symmetric InfoNCE), then an MMDiT with rectified
flow on the frozen CLIP's token states.

One run, one checkpoint, two phases: steps 1..--clip-steps train CLIP, the remaining steps up to --steps train
the MMDiT (CLIP frozen). Captions are made on the fly from each image's label and measured attributes.
With --two-digit the MMDiT trains on 28 x 56 canvases of two random digits ("a small three to the left of a
bold eight"); the CLIP phase stays the same (single digits).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from captions import DIGIT_WORDS, Tokenizer, article, captions_for, shrink, two_digit_batch, two_digit_prompts
from flow import logit_normal_t, rectified_flow_loss, sample
from model import CLIP_SIZES, MMDIT_SIZES, CLIPConfig, MMDiTConfig, TextToImage, info_nce, zero_shot_logits

from shared import UserError
from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_symmetric, to_unit
from shared.experiment import Run
from shared.runtime import autocast, to_device

STAGE = "05_multimodal"

PRESETS = {
    "smoke": dict(dataset="synthetic", clip_size="tiny", dit_size="tiny", steps=24, clip_steps=12, batch_size=32,
                  sample_every=0, ckpt_every=0, sample_steps=4, log_every=5),
    "default": dict(dataset="mnist", clip_size="S", dit_size="S", steps=6000, clip_steps=2000, batch_size=64,
                    lr=6e-4, sample_every=1000, ckpt_every=250),
    "full": dict(dataset="mnist", clip_size="B", dit_size="B", steps=100_000, clip_steps=10_000, batch_size=256,
                 lr=3e-4, sample_every=5000, ckpt_every=5000),
}


@dataclass
class TrainConfig(CommonConfig):
    dataset: str = arg("mnist", "training data: mnist (bundled), or synthetic (tiny bars, for tests); the captions "
                       "describe digits", ("mnist", "synthetic"))
    steps: int = arg(6000, "optimizer steps in total: --clip-steps of CLIP, then the MMDiT's", min=2)
    clip_steps: int = arg(2000, "how many of the --steps train the mini-CLIP (the rest train the MMDiT)", min=1)
    lr: float = arg(6e-4, "MMDiT learning rate (AdamW)", min=1e-12)
    lr_decay: str = arg("constant", "MMDiT learning rate, over a 200-step warm-up: constant, or a cosine decay "
                        "from its first step to 0 at the last", ("constant", "cosine"))
    decay_steps: int = arg(0, "with a constant rate: decay it linearly over the last N steps (warm-up-stable-"
                           "decay; 0: no decay)")
    batch_size: int = arg(64, "images (with their captions) per step", min=1)
    ckpt_every: int = arg(250, "write a checkpoint every N steps (0: only at the end)")
    sample_every: int = arg(1000, "write a sample grid every N steps (0: only at the end)")
    clip_lr: float = arg(1e-3, "mini-CLIP learning rate (AdamW)", min=1e-12)
    clip_size: str = arg("S", "mini-CLIP size", tuple(CLIP_SIZES))
    dit_size: str = arg("S", "MMDiT size", tuple(MMDIT_SIZES))
    patch: int = arg(4, "MMDiT patch size (must divide 28)", min=1)
    p_uncond: float = arg(0.1, "caption dropout: probability of training on the empty prompt (for CFG)", max=1)
    p_small: float = arg(0.25, "probability of shrinking a digit (the captions then say 'small')", max=1)
    ema_decay: float = arg(0.999, "EMA decay of the MMDiT weights (ramped up as (1+k)/(10+k) over its first steps)",
                           max=1)
    t_mean: float = arg(0.0, "logit-normal t: mean m of the normal before the sigmoid", min=None)
    t_std: float = arg(1.0, "logit-normal t: std s", min=1e-6)
    cfg_scale: float = arg(3.0, "guidance scale of the sample grids written while training")
    sample_steps: int = arg(30, "Euler steps of the sample grids written while training", min=1)
    two_digit: bool = arg(False, "the compositional test: train the MMDiT on 28 x 56 canvases of two digits "
                          "with 'left of' / 'right of' captions (the CLIP phase is unchanged)")
    text_pos: str = arg("sincos", "positions on the MMDiT's text tokens in a --two-digit run (fixed sin-cos, "
                        "learned or none)", ("sincos", "learned", "none"))
    image_pos: str = arg("sincos", "positions on the MMDiT's image patches: fixed 2-D sin-cos or learned (README, "
                         "section 6)", ("sincos", "learned"))


GRID_PROMPTS = ("a {n}", "a thick {w}", "a thin {w}", "a slanted {n}", "an upright {w}", "a small {w}",
                "{w}, slanted left", "a bold italic {n}")


def grid_prompts() -> list[str]:
    """One row per phrasing, one column per digit (the training-time sample grid)."""
    prompts = [p.format(n=d, w=DIGIT_WORDS[d]) for p in GRID_PROMPTS for d in range(10)]
    prompts = [article(p.split()[1]) + p[p.index(" "):] if p.split()[0] in ("a", "an") else p for p in prompts]
    return prompts


def class_prompt_ids(tok: Tokenizer) -> tuple[torch.Tensor, int]:
    """Zero-shot prompts, class-major: (10 * n_templates, L) ids and n_templates."""
    templates = ("{a} {w}", "{a} {n}", "the digit {w}", "the digit {n}", "{w}", "{n}")
    prompts = [t.format(a=article(w), w=w, n=d) for d, w in enumerate(DIGIT_WORDS) for t in templates]
    return tok.batch(prompts, strict=True), len(templates)


def make_batch(x_u8: torch.Tensor, y: torch.Tensor, tok: Tokenizer, p_small: float, two_digit: bool = False):
    """A training batch: images in [-1, 1] (a fraction shrunk), and captions made from their pixels; with
    ``two_digit`` the digits are paired into (B, 1, 28, 56) canvases with two-digit captions."""
    x = to_unit(x_u8)  # (B, 1, 28, 28) in [0, 1]
    small = torch.rand(len(x)) < p_small
    scale = 0.5 + 0.22 * torch.rand(len(x))
    if small.any():
        x[small] = shrink(x[small], scale[small])
    if two_digit:
        x, captions, _ = two_digit_batch(x, y)
    else:
        captions = captions_for(x, y)
    return 2 * x - 1, tok.batch(captions)  # (B, 1, H, W) in [-1, 1], (B, L) token ids


def build(cfg: TrainConfig, tok: Tokenizer) -> TextToImage:
    clip_cfg = CLIPConfig(vocab_size=len(tok), max_len=tok.max_len, **CLIP_SIZES[cfg.clip_size])
    dit_cfg = MMDiTConfig(patch=cfg.patch, text_width=clip_cfg.width, text_len=tok.max_len,
                          width_px=56 if cfg.two_digit else 28, text_pos=cfg.text_pos if cfg.two_digit else "none",
                          image_pos=cfg.image_pos, **MMDIT_SIZES[cfg.dit_size])
    return TextToImage(clip_cfg, dit_cfg)


def mmdit_lr(cfg: TrainConfig, step: int) -> float:
    """The MMDiT's learning rate at a (global) step: linear warm-up over its first 200 steps, then constant or
    a cosine decay that reaches 0 at --steps. With --decay-steps N the constant rate falls linearly over the
    last N steps (warm-up-stable-decay, Hägele et al. 2024): a constant-rate run can be continued and still
    end on a decay."""
    k, n = step - cfg.clip_steps, cfg.steps - cfg.clip_steps  # MMDiT steps done (1..n) and in all
    factor = min(1.0, k / 200)  # the warm-up
    if cfg.lr_decay == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * k / n))
    if cfg.decay_steps:
        factor *= min(1.0, (cfg.steps - step + 1) / cfg.decay_steps)  # 1 at the decay's first step, 1/N at the last
    return cfg.lr * factor


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """Decay of the EMA at a global step: min(--ema-decay, (1 + k) / (10 + k)) on the MMDiT's k-th step.

    Without the ramp a 0.999 EMA started at the fresh MMDiT still holds 0.999^4000 ~ 2 % of that zero-output
    network after the default's 4,000 MMDiT steps; with it the start is forgotten within ~100 steps. The ramp
    stays below 0.999 until k ~ 9,000 (0.9978 at k = 4,000), so a short run averages about its last ninth."""
    k = step - cfg.clip_steps
    return min(cfg.ema_decay, (1 + k) / (10 + k))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def drop_captions(ids: torch.Tensor, p_uncond: float, null_ids: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Caption dropout for classifier-free guidance (README Eq. 8): each caption of ``ids`` (B, L) becomes the
    empty prompt ``null_ids`` (1, L), with probability ``p_uncond``, so that v(z, t, null) learns the
    unconditional velocity that the samplers guide away from."""
    # One uniform per row, drawn on the CPU whatever the device: the RNG stream, and with it a resumed run, does
    # not depend on where the model trains
    drop = torch.rand(len(ids), generator=generator) < p_uncond  # (B,)
    # torch.where, not ids[drop] = ...: a boolean index must count its True rows on the host, a GPU sync per step
    return torch.where(to_device(drop, ids.device)[:, None], null_ids, ids)  # (B, L)


@torch.no_grad()
def zero_shot_accuracy(model: TextToImage, tok: Tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       device, batch: int = 1000) -> float:
    ids, n_templates = class_prompt_ids(tok)
    model.clip.eval()
    right = 0
    for i in range(0, len(images), batch):
        x = to_symmetric(images[i: i + batch]).to(device)
        right += (zero_shot_logits(model.clip, x, ids.to(device), n_templates).argmax(1).cpu()
                  == labels[i: i + batch]).sum().item()
    return right / len(images)


def main(cfg: TrainConfig):
    if cfg.clip_steps >= cfg.steps:
        raise UserError(f"--clip-steps ({cfg.clip_steps}) must be below --steps ({cfg.steps}) to leave MMDiT steps")
    if cfg.decay_steps and cfg.lr_decay != "constant":
        raise UserError("--decay-steps decays a constant rate; it cannot be combined with --lr-decay cosine")
    if cfg.decay_steps > cfg.steps - cfg.clip_steps:
        raise UserError(f"--decay-steps ({cfg.decay_steps}) must not exceed the MMDiT's {cfg.steps - cfg.clip_steps} "
                        "steps")
    if cfg.dataset not in ("mnist", "synthetic"):
        raise UserError(f"--dataset {cfg.dataset}: the captions describe digits; use mnist (or synthetic for tests)")
    if 28 % cfg.patch:
        raise UserError(f"--patch must divide 28, got {cfg.patch}")
    tok = Tokenizer()
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset)
        test_images, test_labels = load_images(cfg.dataset, train=False)
        model = build(cfg, tok).to(run.device)
        ema = copy.deepcopy(model).requires_grad_(False)
        clip_opt = torch.optim.AdamW(model.clip.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
        dit_opt = torch.optim.AdamW(model.dit.parameters(), lr=cfg.lr, weight_decay=0.0)
        run.restore(model=model, ema=ema, clip_opt=clip_opt, dit_opt=dit_opt)
        # The last joint block's text update feeds nothing (model.py::MMDiT.forward), so its proj and MLP get no
        # gradient: DDP must know.
        clip_net, dit_net = run.wrap(model.clip), run.wrap(model.dit, find_unused_parameters=True)
        velocity = lambda z, t, cond: dit_net(z, t, *cond)  # noqa: E731
        null_ids = tok.batch([""]).to(run.device)  # the empty prompt: just <eos>
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():
            x_u8, y = next(batches)
            x, ids = make_batch(x_u8, y, tok, cfg.p_small, two_digit=cfg.two_digit and step > cfg.clip_steps)
            x, ids = to_device(x, run.device), to_device(ids, run.device)
            if step <= cfg.clip_steps:  # ---- phase 1: mini-CLIP, Eq. (1)-(2)
                for group in clip_opt.param_groups:
                    group["lr"] = cfg.clip_lr * min(1.0, step / 100)
                with autocast(run.device, cfg.amp):
                    loss = info_nce(clip_net(x, ids))
                clip_opt.zero_grad(set_to_none=True)
                loss.backward()
                clip_opt.step()
                run.log(step, clip_loss=loss, temperature=1 / model.clip.log_scale.exp())
                if step == cfg.clip_steps:
                    acc = zero_shot_accuracy(model, tok, test_images[:2000], test_labels[:2000], run.device)
                    run.flush(step, zero_shot_acc=acc)
            else:  # ---- phase 2: MMDiT with rectified flow on the frozen CLIP's token states, Eq. (4)-(6)
                if step == cfg.clip_steps + 1:  # the EMA starts from the trained CLIP and the fresh MMDiT
                    ema.load_state_dict(model.state_dict())
                model.clip.eval().requires_grad_(False)
                ids = drop_captions(ids, cfg.p_uncond, null_ids)
                cond = model.condition(ids)
                t = to_device(logit_normal_t(len(x), cfg.t_mean, cfg.t_std), run.device)
                eps = torch.randn_like(x)
                with autocast(run.device, cfg.amp):
                    loss = rectified_flow_loss(velocity, x, cond, t, eps)
                for group in dit_opt.param_groups:
                    group["lr"] = mmdit_lr(cfg, step)
                dit_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.dit.parameters(), 1.0)
                dit_opt.step()
                ema_update(ema, model, ema_decay(cfg, step))
                run.log(step, flow_loss=loss)
                if run.every(cfg.sample_every, step):
                    run.save_images(sample_grid(ema, tok, cfg, run.device), f"step{step:06d}.png", nrow=10)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, ema=ema, clip_opt=clip_opt, dit_opt=dit_opt)
        run.save_checkpoint(model=model, ema=ema, clip_opt=clip_opt, dit_opt=dit_opt)
        if run.step > cfg.clip_steps:
            run.save_images(sample_grid(ema, tok, cfg, run.device), "final.png", nrow=10)
        return model


def sample_grid(model: TextToImage, tok: Tokenizer, cfg: TrainConfig, device) -> torch.Tensor:
    """The GRID_PROMPTS x 10 digits grid (or 40 two-digit prompts), from fixed noise (a private generator leaves
    the training RNG alone)."""
    prompts = two_digit_prompts(40)[0] if cfg.two_digit else grid_prompts()
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(len(prompts), 1, 28, model.dit.cfg.width_px, generator=g).to(device)
    cond = model.condition(tok.batch(prompts).to(device))
    null = model.condition(tok.batch([""] * len(prompts)).to(device))
    return sample(model.velocity, noise, cond, null, cfg.cfg_scale, cfg.sample_steps).clamp(-1, 1)


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
