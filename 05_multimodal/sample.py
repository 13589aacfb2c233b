"""Draw digits from text: `python sample.py --prompt "a thick slanted seven" --cfg-scale 3`.

Without a prompt, the prompts are "a zero" ... "a nine" in turn. `--prompts-file` reads one prompt a line;
`--interpolate A B` walks the text condition from prompt A to prompt B with the noise held fixed.
The .npz holds uint8 `images` and, as `labels`, the digit each prompt asked for.

A checkpoint trained with `--two-digit` draws 28 x 56 canvases ("a 3 to the left of an 8"; default prompts:
`captions.py::two_digit_prompts`); its `labels` are (N, 2): the (left, right) digits each prompt asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from captions import DIGIT_WORDS, Tokenizer, article, parse_prompt, parse_two_digit, two_digit_prompts
from flow import sample
from model import TextToImage
from tqdm import tqdm
from train import STAGE, TrainConfig, build

from shared import UserError
from shared.checkpoint import load_checkpoint
from shared.cli import add_sample_args, check_sample_args, run_entry
from shared.experiment import find_checkpoint
from shared.images import save_grid, save_samples_npz
from shared.runtime import choose_device

STAGE_DIR = Path(__file__).parent


def load_model(path: Path, device, weights: str = "model") -> tuple[TextToImage, Tokenizer, TrainConfig]:
    ckpt = load_checkpoint(path, STAGE)
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    tok = Tokenizer()
    model = build(cfg, tok)
    state = ckpt[weights] if weights in ckpt else ckpt["model"]  # pretrained/ files hold one set, as "model"
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:
        raise UserError(f"{path} does not fit this stage's model ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), tok, cfg


def read_prompts(args, two_digit: bool = False) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: no such file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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
                        steps: int) -> torch.Tensor:
    """The token states and pooled embedding mixed (1 - w) A + w B for w from 0 to 1, one image per w."""
    n = len(noise)
    states_a, keep_a, pooled_a = model.condition(tok.batch([a], strict=True).to(noise.device))
    states_b, keep_b, pooled_b = model.condition(tok.batch([b], strict=True).to(noise.device))
    w = torch.linspace(0, 1, n, device=noise.device).view(n, 1, 1)
    cond = ((1 - w) * states_a + w * states_b, (keep_a | keep_b).expand(n, -1),
            (1 - w[:, 0]) * pooled_a + w[:, 0] * pooled_b)
    null = model.condition(tok.batch([""] * n).to(noise.device))
    return sample(model.velocity, noise[:1].expand_as(noise), cond, null, scale, steps).clamp(-1, 1)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(parser, num_samples=80)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; the "
                        "samples cycle through them)")
    parser.add_argument("--prompts-file", default="", help="a text file with one prompt a line")
    parser.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="walk from prompt A to prompt B")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale w of Eq. (8) "
                        "(1: plain conditional, 0: unconditional; default: the training run's --cfg-scale)")
    parser.add_argument("--sample-steps", type=int, default=0, help="Euler steps from noise to image (default: "
                        "the training run's --sample-steps)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                        help="guide only while LO <= t <= HI (t = 1 is noise); plain conditional elsewhere")
    parser.add_argument("--weights", default="model", choices=("ema", "model"), help="a training checkpoint's "
                        "raw or EMA weights (raw by default, like pretrained/mnist.pt and the README's tables; the EMA "
                        "measured slightly better on three seeds, README section 6)")
    args = parser.parse_args(argv)
    check_sample_args(args)
    if args.sample_steps < 0:
        raise UserError(f"--sample-steps must be positive, got {args.sample_steps}")
    device = choose_device(args.device)
    path = find_checkpoint(STAGE, STAGE_DIR, args.ckpt)
    model, tok, train_cfg = load_model(path, device, args.weights)
    args.sample_steps = args.sample_steps or train_cfg.sample_steps
    args.cfg_scale = train_cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    cfg = model.dit.cfg
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, cfg.channels, cfg.height, cfg.width_px, generator=g).to(device)
    if args.interpolate:
        prompts, nrow = [args.interpolate[0]] * args.num_samples, 8
        images = interpolate_prompts(model, tok, *args.interpolate, noise, args.cfg_scale, args.sample_steps)
    else:
        base = read_prompts(args, train_cfg.two_digit)
        prompts, nrow = [base[i % len(base)] for i in range(args.num_samples)], (10 if len(base) % 10 == 0 else 8)
        images = generate(model, tok, prompts, noise, args.cfg_scale, args.sample_steps, args.batch_size,
                          tuple(args.cfg_interval))
    if train_cfg.two_digit:
        digits = torch.tensor([parse_two_digit(p) for p in prompts])  # (N, 2): (left, right)
    else:
        digits = torch.tensor([parse_prompt(p)[0] for p in prompts])
    out = Path(args.out) if args.out else path.parent / "samples.npz"
    save_samples_npz(out, images, digits if (digits >= 0).all() else None)
    grid = save_grid(images[:100], out.with_suffix(".png"), nrow=nrow)
    print(f"{len(images)} samples from {path} (cfg scale {args.cfg_scale:g}): {out}, grid {grid}")
    return out


if __name__ == "__main__":
    run_entry(main)
