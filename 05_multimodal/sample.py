"""Draw digits from text: `python sample.py --prompt "a thick slanted seven" --cfg-scale 3`.

Without a prompt, the prompts are "a zero" ... "a nine" in turn. `--prompts-file` reads one prompt a line;
`--interpolate A B` walks from prompt A to prompt B with the noise held fixed.
The .npz holds uint8 `images` and, as `labels`, the digit each prompt asked for (along an interpolation: A's
digit while the weight w of B is below 0.5, B's from there on).

A checkpoint trained with `--two-digit` draws 28 x 56 canvases ("a 3 to the left of an 8"; default prompts:
`captions.py::two_digit_prompts`); its `labels` are (N, 2): the (left, right) digits each prompt asked for.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from captions import DIGIT_WORDS, Tokenizer, article, parse_prompt, parse_two_digit, two_digit_prompts
from flow import sample
from model import TextToImage
from tqdm import tqdm
from train import STAGE, TrainConfig, build

from shared import UserError
from shared.checkpoint import load_checkpoint, load_error, weights_of
from shared.cli import add_sample_args, check_sample_args, run_entry, sample_outputs
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz
from shared.runtime import choose_device

STAGE_DIR = Path(__file__).parent


def load_model(path: Path, device, weights: str = "ema") -> tuple[TextToImage, Tokenizer, TrainConfig]:
    """The model, tokenizer and training config of a checkpoint, with its EMA ("ema") or raw ("model") weights.

    A training checkpoint holds both; an exported file (pretrained/mnist.pt) one set, and asking for the other is
    an error (``shared.checkpoint.weights_of``)."""
    ckpt = load_checkpoint(path, STAGE)
    state = weights_of(ckpt, path, weights)
    raw = dict(ckpt["config"])
    # Runs from before the position flags had learned positions on both streams; a short-lived "auto" meant
    # sin-cos on the two-digit canvas and learned otherwise.
    raw.setdefault("text_pos", "learned")
    raw.setdefault("image_pos", "learned")
    if raw["image_pos"] == "auto":
        raw["image_pos"] = "sincos" if raw.get("two_digit") else "learned"
    cfg = TrainConfig(**{k: v for k, v in raw.items() if k in TrainConfig.__dataclass_fields__})
    tok = Tokenizer()
    model = build(cfg, tok)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit this stage's model ({load_error(err)})") from None
    return model.to(device).eval(), tok, cfg


def read_prompts(args, two_digit: bool = False) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompts-file {path}: not a readable text file ({type(err).__name__})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {path} holds no prompts")
        return prompts
    if args.prompt:
        return args.prompt
    if two_digit:
        return two_digit_prompts(20)[0]
    return [f"{article(w)} {w}" for w in DIGIT_WORDS]


@torch.no_grad()
def generate(model: TextToImage, tok: Tokenizer, prompts: list[str], noise: torch.Tensor, scale: float,
             steps: int, batch_size: int, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Images in [-1, 1] for ``prompts`` (one per noise image), in batches; guidance only for t in ``interval``."""
    device = noise.device
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch",
                  disable=len(prompts) <= batch_size):
        chunk = prompts[i: i + batch_size]
        cond = model.condition(tok.batch(chunk, strict=True).to(device))
        null = model.condition(tok.batch([""] * len(chunk)).to(device))
        out.append(sample(model.velocity, noise[i: i + len(chunk)], cond, null, scale, steps,
                          interval=interval).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def interpolate_prompts(model: TextToImage, tok: Tokenizer, a: str, b: str, noise: torch.Tensor, scale: float,
                        steps: int, batch_size: int, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """One image per w = 0 ... 1 (``len(noise)`` of them), all from ``noise[0]``, in batches: Euler steps along
    v = (1 - w) v_A + w v_B, where v_A and v_B are the guided velocities (Eq. 8) of the two prompts, each read
    with its own token states and padding mask. So w = 0 draws what :func:`generate` draws for A, w = 1 for B."""
    device = noise.device

    # A and B share the empty prompt's velocity, so blending their guided velocities equals guiding the blend of
    # their conditional ones: v_null + s ((1 - w) v_A + w v_B - v_null). `sample` guides `blend` like any prompt.
    def blend(z, t, cond):  # cond: prompt A's (states, keep, pooled), prompt B's, then each row's w
        mix = cond[6].view(-1, 1, 1, 1)
        return (1 - mix) * model.velocity(z, t, cond[:3]) + mix * model.velocity(z, t, cond[3:6])

    out = []
    for w in torch.linspace(0, 1, len(noise), device=device).split(batch_size):
        n = len(w)
        cond_a, cond_b = (model.condition(tok.batch([p] * n, strict=True).to(device)) for p in (a, b))
        null = model.condition(tok.batch([""] * n).to(device))
        out.append(sample(blend, noise[:1].expand(n, *noise.shape[1:]), (*cond_a, *cond_b, w), (*null, *null, w),
                          scale, steps, interval=interval).clamp(-1, 1))
    return torch.cat(out)


def add_guidance_args(parser: argparse.ArgumentParser) -> None:
    """The sampler's flags that sample.py and evaluate.py share."""
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale w of Eq. (8) "
                        "(1: plain conditional, 0: unconditional; default: the training run's --cfg-scale)")
    parser.add_argument("--sample-steps", type=int, default=None, help="Euler steps from noise to image, at least 1 "
                        "(default: the training run's --sample-steps)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                        help="guide only while LO <= t <= HI, 0 <= LO < HI <= 1 (t = 1 is noise); plain conditional "
                        "elsewhere")
    parser.add_argument("--weights", default="ema", choices=("ema", "model"), help="a training checkpoint's "
                        "EMA (the default, and all pretrained/mnist.pt holds) or raw weights (README section 6 "
                        "compares them)")


def check_guidance_args(args: argparse.Namespace) -> None:
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise UserError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise UserError(f"--sample-steps must be at least 1, got {args.sample_steps}")
    lo, hi = args.cfg_interval
    if not 0 <= lo < hi <= 1:  # also false for NaN
        raise UserError(f"--cfg-interval LO HI needs 0 <= LO < HI <= 1, got {lo:g} {hi:g}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(parser, num_samples=80)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; the "
                        "samples cycle through them)")
    parser.add_argument("--prompts-file", default="", help="a text file with one prompt a line")
    parser.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="walk from prompt A (w = 0) to prompt B "
                        "(w = 1), blending their guided velocities (1 - w) v_A + w v_B; the labels are A's digit for "
                        "w < 0.5, B's from w = 0.5 on")
    add_guidance_args(parser)
    args = parser.parse_args(argv)
    check_sample_args(args)
    check_guidance_args(args)
    if args.interpolate and (args.prompt or args.prompts_file):
        raise UserError("--interpolate A B takes its two prompts itself; drop --prompt / --prompts-file")
    if args.prompt and args.prompts_file:
        raise UserError("give prompts by --prompt or by --prompts-file, not both")
    if args.interpolate and args.num_samples < 2:
        raise UserError(f"--interpolate needs --num-samples of at least 2 (A and B), got {args.num_samples}")
    device = choose_device(args.device)
    path = find_checkpoint(STAGE, STAGE_DIR, args.ckpt)
    model, tok, train_cfg = load_model(path, device, args.weights)
    out, png = sample_outputs(args.out, path)
    args.sample_steps = train_cfg.sample_steps if args.sample_steps is None else args.sample_steps
    args.cfg_scale = train_cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    cfg = model.dit.cfg
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, cfg.channels, cfg.height, cfg.width_px, generator=g).to(device)
    if args.interpolate:
        a, b = args.interpolate
        prompts, nrow = [a if w < 0.5 else b for w in torch.linspace(0, 1, args.num_samples).tolist()], 8
    else:
        base = read_prompts(args, train_cfg.two_digit)
        prompts, nrow = [base[i % len(base)] for i in range(args.num_samples)], (10 if len(base) % 10 == 0 else 8)
    # a prompt's unknown word, or a one-digit prompt for a two-digit model, is a mistake found before sampling
    tok.batch(sorted(set(prompts)), strict=True)
    if train_cfg.two_digit:
        digits = torch.tensor([parse_two_digit(p) for p in prompts])  # (N, 2): (left, right)
    else:
        digits = torch.tensor([parse_prompt(p)[0] for p in prompts])
    if args.interpolate:
        images = interpolate_prompts(model, tok, *args.interpolate, noise, args.cfg_scale, args.sample_steps,
                                     args.batch_size, tuple(args.cfg_interval))
    else:
        images = generate(model, tok, prompts, noise, args.cfg_scale, args.sample_steps, args.batch_size,
                          tuple(args.cfg_interval))
    save_samples_npz(out, images, digits if (digits >= 0).all() else None)
    grid = save_grid(images[:100], png, nrow=nrow)
    print(f"{len(images)} samples from {path} (cfg scale {args.cfg_scale:g}): {out}, grid {grid}")
    return out


if __name__ == "__main__":
    run_entry(main)
