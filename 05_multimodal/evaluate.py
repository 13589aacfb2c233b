"""Measure a text-to-image checkpoint: the mini-CLIP's zero-shot accuracy and retrieval, then the MMDiT's digit
adherence (shared classifier), attribute adherence (the pixel measures of captions.py), CLIP-score, FID-MNIST.

    python evaluate.py --ckpt PATH --num-samples 1000 --json results.json --assets assets

Pictures (confusion matrix, prompt grid, guidance sweep) go to --assets when given.

A checkpoint trained with `train.py --two-digit` is measured on the compositional test instead: each 28 x 56
sample is cut into its left and right 28 x 28 halves, the shared classifier reads each, and a prompt counts
only when both digits are right and in the asked order (picture: two_digit_grid.png). Prompts that ask opposite
levels of one attribute of the two sides ("a thin 0 to the left of a thick 1") check that each adjective lands on
its own digit (attribute_binding; picture: two_digit_binding.png).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from captions import (
    DIGIT_WORDS,
    SLANT_EDGES,
    SMALL_HEIGHT,
    THICK_EDGES,
    article,
    attribute_levels,
    captions_for,
    ink_height,
    slant,
    stroke_thickness,
    two_digit_caption,
    two_digit_prompts,
)
from sample import STAGE_DIR, add_guidance_args, check_guidance_args, generate, load_model
from train import STAGE, class_prompt_ids, grid_prompts, zero_shot_logits

from shared import UserError
from shared.cli import one_line_error, output_dir, output_file, run_entry
from shared.data import load_images, to_symmetric, to_unit
from shared.experiment import find_checkpoint
from shared.images import save_grid, to_uint8
from shared.runtime import DEVICES, choose_device

ATTRIBUTE_PROMPTS = {  # (attribute, level, adjective) asked for in the attribute-adherence prompts
    "thin": ("thickness", 0, "thin"), "thick": ("thickness", 2, "thick"),
    "left": ("slant", 0, "backslanted"), "upright": ("slant", 1, "upright"), "right": ("slant", 2, "slanted"),
    "small": ("size", 0, "small"),
}


# attribute -> (pixel measure, the cut points between its levels, as captions.py::attribute_levels cuts them)
LEVEL_EDGES = {"thickness": (stroke_thickness, THICK_EDGES), "slant": (slant, SLANT_EDGES),
               "size": (ink_height, (SMALL_HEIGHT,))}


def miss_distance(values: torch.Tensor, edges: tuple[float, ...], level: int) -> torch.Tensor:
    """How far each measured value lies outside the band of the asked level (0 inside it): the size of a miss,
    in the measure's own units (pixels of stroke width, shear, rows of ink)."""
    bounds = (-math.inf, *edges, math.inf)
    return (bounds[level] - values).clamp(min=0) + (values - bounds[level + 1]).clamp(min=0)


@torch.no_grad()
def zero_shot(model, tok, images, labels, device) -> tuple[float, torch.Tensor]:
    """Accuracy and the 10 x 10 confusion matrix (rows: true digit) of prompt-based classification."""
    ids, n_templates = class_prompt_ids(tok)
    preds = torch.cat([zero_shot_logits(model.clip, to_symmetric(images[i: i + 1000]).to(device),
                                        ids.to(device), n_templates).argmax(1).cpu()
                       for i in range(0, len(images), 1000)])
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    return (preds == labels).float().mean().item(), confusion


@torch.no_grad()
def retrieval(model, tok, images, labels, device, seed: int = 0) -> dict:
    """Text -> image retrieval among len(images) test images, each with one generated caption."""
    x = to_unit(images)
    captions = captions_for(x, labels, torch.Generator().manual_seed(seed))
    z_img = model.clip.embed_image((2 * x - 1).to(device))
    z_txt = model.clip.embed_text(tok.batch(captions).to(device))
    sims = z_txt @ z_img.T  # (N captions, N images)
    ranks = (sims > sims.diag()[:, None]).sum(1)  # images scoring above the caption's own image
    top1 = sims.argmax(1).cpu()
    return {"recall@1": (ranks < 1).float().mean().item(), "recall@10": (ranks < 10).float().mean().item(),
            "top1_same_digit": (labels[top1] == labels).float().mean().item()}


def attribute_prompts(n: int) -> tuple[list[str], list[int], list[str]]:
    """n prompts "a <adjective> <digit>", digits and attributes in turn: (prompts, digits, attribute keys)."""
    keys = list(ATTRIBUTE_PROMPTS)
    prompts, digits, asked = [], [], []
    for i in range(n):
        d, key = i % 10, keys[(i // 10) % len(keys)]
        word = DIGIT_WORDS[d] if (i // 60) % 2 else str(d)
        adj = ATTRIBUTE_PROMPTS[key][2]
        prompts.append(f"{article(adj)} {adj} {word}")
        digits.append(d)
        asked.append(key)
    return prompts, digits, asked


@torch.no_grad()
def clip_score(model, tok, images: torch.Tensor, prompts: list[str], device) -> float:
    """100 x mean cosine between each image's and its prompt's mini-CLIP embeddings."""
    z_img = model.clip.embed_image(images.to(device))
    z_txt = model.clip.embed_text(tok.batch(prompts).to(device))
    return 100 * (z_img * z_txt).sum(1).mean().item()


def classify_halves(classifier, images: torch.Tensor) -> torch.Tensor:
    """uint8 canvases (N, 1, 28, 56) -> the shared classifier's digit for each half, (N, 2) = (left, right)."""
    from shared.classifier import predict

    halves = torch.cat([images[..., :28], images[..., 28:]])  # (2N, 1, 28, 28): all left halves, then all right
    return predict(classifier, halves.contiguous())[1].argmax(1).view(2, -1).T


def two_digit_scores(pred: torch.Tensor, asked: torch.Tensor) -> dict:
    """Compositional scores from (N, 2) predicted and asked (left, right) digits: both right and in order,
    each side's accuracy, how often both digits were drawn but on swapped sides, and how often one of the two
    asked digits was drawn on both sides."""
    doubled = (pred[:, 0] == pred[:, 1]) & ((pred[:, :1] == asked).any(1))
    return {"both_in_order": (pred == asked).all(1).float().mean().item(),  # Eq. (10)
            "left_accuracy": (pred[:, 0] == asked[:, 0]).float().mean().item(),
            "right_accuracy": (pred[:, 1] == asked[:, 1]).float().mean().item(),
            "swapped": (pred.flip(1) == asked).all(1).float().mean().item(),
            "doubled": doubled.float().mean().item()}


# attribute -> (pixel measure, adjective asking for less of it, adjective asking for more; "" says nothing)
BINDING_ATTRIBUTES = {"thickness": (stroke_thickness, "thin", "thick"), "slant": (slant, "backslanted", "slanted"),
                      "size": (ink_height, "small", "")}


def binding_prompts(n: int, adjectives: bool = True) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """n two-digit prompts that ask opposite levels of one attribute of the two sides ("a thick 3 to the left of a
    thin eight"): (prompts, pairs (n, 2), attribute names, side asked for less of it (n,): 0 left, 1 right).

    Prompt i has the digits and phrasing of :func:`two_digit_prompts`, attribute i % 3, and asks less of it on
    the left when (i // 30) is even, so that each left digit meets each attribute on both sides. With
    ``adjectives=False`` the same pairs come plainly: the control, where no side is asked for anything.
    """
    _, pairs = two_digit_prompts(n)
    names = list(BINDING_ATTRIBUTES)
    prompts, attributes, low_side = [], [], []
    for i, (a, b) in enumerate(pairs.tolist()):
        name, low = names[i % 3], (i // 30) % 2
        less, more = BINDING_ATTRIBUTES[name][1:]
        left, right = ((less, more) if low == 0 else (more, less)) if adjectives else ("", "")
        prompts.append(two_digit_caption((a, left), (b, right), left_first=(i // 10) % 2 == 0))
        attributes.append(name)
        low_side.append(low)
    return prompts, pairs, attributes, torch.tensor(low_side)


def binding_scores(images: torch.Tensor, attributes: list[str], low_side: torch.Tensor) -> dict:
    """Per attribute, how often the side asked for less of it measures less than the other side (ties count
    half; 0.5 is chance). images: float canvases (N, 1, 28, 56) in [0, 1]."""
    halves = torch.stack([images[..., :28], images[..., 28:]], 1)  # (N, 2, 1, 28, 28)
    scores = {}
    for name, (measure, _, _) in BINDING_ATTRIBUTES.items():
        idx = torch.tensor([i for i, a in enumerate(attributes) if a == name])
        m = measure(halves[idx].flatten(0, 1)).view(-1, 2)  # (k, 2) = (left, right)
        low = m.gather(1, low_side[idx, None])[:, 0]
        high = m.gather(1, 1 - low_side[idx, None])[:, 0]
        scores[name] = ((low < high).float() + 0.5 * (low == high).float()).mean().item()  # Eq. (11)
    return scores


def rate_by_attribute(right: torch.Tensor, attributes: list[str]) -> dict:
    """The mean of ``right`` (N,) over the prompts of each attribute: which adjectives cost digit accuracy."""
    return {name: right[[a == name for a in attributes]].mean().item() for name in BINDING_ATTRIBUTES}


@torch.no_grad()
def swap_cosines(model, tok, pairs: torch.Tensor) -> dict:
    """How much the mini-CLIP's text states say about word order: for "a {a} to the left of a {b}" and its swap
    "a {b} to the left of a {a}", the cosine of the pooled states, and of each digit word's state at its two
    places. Near 1: the states are (almost) a bag of words, and the order must come from elsewhere."""
    texts = [[two_digit_caption((int(a), ""), (int(b), ""), True) for a, b in pairs.tolist()],
             [two_digit_caption((int(b), ""), (int(a), ""), True) for a, b in pairs.tolist()]]
    ids = [tok.batch(t) for t in texts]
    device = next(model.parameters()).device
    (s1, p1), (s2, p2) = (model.clip.text(i.to(device)) for i in ids)  # states (N, L, width), pooled (N, width)
    digits = torch.tensor([tok.stoi[w] for w in DIGIT_WORDS])
    at1, at2 = (torch.isin(i, digits).nonzero()[:, 1].view(-1, 2) for i in ids)  # (N, 2) places of the digits
    rows = torch.arange(len(pairs))
    same_word = torch.cat([torch.cosine_similarity(s1[rows, at1[:, 0]], s2[rows, at2[:, 1]], dim=-1),
                           torch.cosine_similarity(s1[rows, at1[:, 1]], s2[rows, at2[:, 0]], dim=-1)])
    return {"pooled": torch.cosine_similarity(p1, p2, dim=-1).mean().item(), "digit_words": same_word.mean().item()}


@torch.no_grad()
def evaluate_two_digit(model, tok, n: int, scale: float, steps: int, device, assets: str = "",
                       interval: tuple[float, float] = (0.0, 1.0)) -> dict:
    """The compositional test: n prompts over the 90 ordered pairs of different digits, both phrasings."""
    from shared.classifier import load_classifier

    classifier = load_classifier("cpu")
    prompts, asked = two_digit_prompts(n)
    noise = torch.randn(n, 1, 28, 56, generator=torch.Generator().manual_seed(0)).to(device)
    images = generate(model, tok, prompts, noise, scale, steps, 250, interval)
    u8 = to_uint8(images)
    pred = classify_halves(classifier, u8)
    left_of = torch.tensor([" left of " in p for p in prompts])  # the phrasing: "to the left of" / "right of"
    result = {"num_prompts": n, **two_digit_scores(pred, asked),
              "left_of_prompts": two_digit_scores(pred[left_of], asked[left_of]),
              "right_of_prompts": two_digit_scores(pred[~left_of], asked[~left_of]),
              "clip_swap_cosine": swap_cosines(model, tok, torch.tensor(
                  [(a, b) for a in range(10) for b in range(10) if a != b]))}  # all 90 ordered pairs, once each
    # control: the same digit on both sides ("a 3 to the left of a 3") needs no binding of digit to side
    m = max(10, n // 5)
    same = torch.arange(m) % 10
    prompts = [two_digit_caption((int(d), ""), (int(d), ""), left_first=True) for d in same]
    noise = torch.randn(m, 1, 28, 56, generator=torch.Generator().manual_seed(1)).to(device)
    same_images = generate(model, tok, prompts, noise, scale, steps, 250, interval).cpu()
    result["same_digit_prompts"] = {"num_prompts": m, **two_digit_scores(
        classify_halves(classifier, to_uint8(same_images)), torch.stack([same, same], 1))}
    # binding: opposite levels of one attribute asked of the two sides; the control asks the same pairs plainly
    # from the same noise, so its score is what the digits and the noise give without any adjective
    m = max(60, n // 2)
    noise = torch.randn(m, 1, 28, 56, generator=torch.Generator().manual_seed(2)).to(device)
    for key, adjectives in (("attribute_binding", True), ("attribute_binding_control", False)):
        prompts, pairs, attributes, low_side = binding_prompts(m, adjectives)
        images = (generate(model, tok, prompts, noise, scale, steps, 250, interval).cpu() + 1) / 2
        pred = classify_halves(classifier, to_uint8(images, value_range=(0, 1)))
        right = (pred == pairs).all(1).float()  # (m,) both digits right and in order
        result[key] = {"num_prompts": m, **binding_scores(images, attributes, low_side),
                       "both_in_order": right.mean().item(),
                       "both_in_order_by_attribute": rate_by_attribute(right, attributes)}
        if assets and adjectives:
            pick = torch.cat([torch.arange(12), torch.arange(30, 42)])  # columns: thickness, slant, size
            save_grid(images[pick], Path(assets) / "two_digit_binding.png", nrow=3, value_range=(0, 1))
    if assets:
        save_grid(u8[:60], Path(assets) / "two_digit_grid.png", nrow=10)
    return result


def save_confusion(confusion: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow((confusion.float() / confusion.sum(1, keepdim=True)).numpy(), cmap="Blues")
    for i in range(10):
        for j in range(10):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("zero-shot prediction")
    ax.set_ylabel("true digit")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--ckpt", default="", help="checkpoint (default: newest run, else pretrained/mnist.pt)")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples for each generation metric")
    add_guidance_args(parser)
    parser.add_argument("--json", default="", help="write the numbers here")
    parser.add_argument("--assets", default="", help="write the pictures into this folder")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to sample and measure")
    args = parser.parse_args(argv)
    if args.num_samples < 10:
        raise UserError(f"--num-samples must be at least 10, got {args.num_samples}")
    check_guidance_args(args)
    if args.json:  # checked now, not after the minutes of sampling
        output_file(args.json, "--json")
    if args.assets:
        output_dir(args.assets, "--assets")
    device = choose_device(args.device)
    path = find_checkpoint(STAGE, STAGE_DIR, args.ckpt)
    model, tok, cfg = load_model(path, device, args.weights)  # a UserError if the checkpoint lacks those weights
    scale = cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    steps = cfg.sample_steps if args.sample_steps is None else args.sample_steps
    interval = tuple(args.cfg_interval)
    t0 = time.monotonic()
    if cfg.two_digit:
        result = {"ckpt": str(path), "weights": args.weights, "cfg_scale": scale, "cfg_interval": list(interval),
                  "sample_steps": steps,
                  **evaluate_two_digit(model, tok, args.num_samples, scale, steps, device, args.assets, interval),
                  "seconds": round(time.monotonic() - t0, 1)}
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    if args.num_samples < 10 * len(ATTRIBUTE_PROMPTS):  # each attribute is asked of 10 prompts in turn
        raise UserError(f"--num-samples must be at least {10 * len(ATTRIBUTE_PROMPTS)} so that every attribute is "
                        f"prompted, got {args.num_samples}")
    test_x, test_y = load_images("mnist", train=False)
    acc, confusion = zero_shot(model, tok, test_x, test_y, device)
    result = {"ckpt": str(path), "weights": args.weights, "cfg_scale": scale, "cfg_interval": list(interval),
              "sample_steps": steps, "zero_shot_accuracy": acc,
              "retrieval_1000": retrieval(model, tok, test_x[:1000], test_y[:1000], device)}
    print(json.dumps(result), flush=True)

    from shared.classifier import load_classifier, predict
    from shared.metrics import evaluate

    classifier = load_classifier("cpu")
    g = torch.Generator().manual_seed(0)
    n = args.num_samples
    plain = [f"{article(w)} {w}" for w in DIGIT_WORDS]
    prompts = [plain[i % 10] for i in range(n)]
    noise = torch.randn(n, 1, 28, 28, generator=g).to(device)
    images = generate(model, tok, prompts, noise, scale, steps, 500, interval)
    digits = torch.arange(n) % 10
    metrics = evaluate(to_uint8(images), digits.numpy())
    result["plain_prompts"] = {k: metrics[k] for k in ("fid", "fid_floor", "precision", "recall", "label_accuracy")}
    result["plain_prompts"]["clip_score"] = clip_score(model, tok, images, prompts, device)
    print(json.dumps(result["plain_prompts"]), flush=True)

    prompts, asked_digits, asked = attribute_prompts(n)
    noise = torch.randn(n, 1, 28, 28, generator=g).to(device)
    images = generate(model, tok, prompts, noise, scale, steps, 500, interval)
    x01 = (images.cpu() + 1) / 2
    levels = attribute_levels(x01)
    adherence, misses = {}, {}
    for key, (name, level, _) in ATTRIBUTE_PROMPTS.items():
        idx = torch.tensor([i for i, a in enumerate(asked) if a == key])
        adherence[key] = (levels[name][idx] == level).float().mean().item()
        measure, edges = LEVEL_EDGES[name]
        off = miss_distance(measure(x01[idx]), edges, level)[levels[name][idx] != level]
        misses[key] = {"count": len(off), "median_distance": off.median().item() if len(off) else 0.0,
                       "max_distance": off.max().item() if len(off) else 0.0}
    real_levels = attribute_levels(to_unit(test_x))
    result["attribute_prompts"] = {
        "attribute_adherence": adherence,
        "attribute_misses": misses,  # how far outside the asked band the misses measure
        "real_test_level_fractions": {k: torch.bincount(v, minlength=3).div(len(v)).tolist()
                                      for k, v in real_levels.items()},
        "clip_score": clip_score(model, tok, images, prompts, device),
    }
    preds = predict(classifier, to_uint8(images))[1].argmax(1)
    result["attribute_prompts"]["digit_adherence"] = (preds == torch.tensor(asked_digits)).float().mean().item()
    real_caps = captions_for(to_unit(test_x[:1000]), test_y[:1000], torch.Generator().manual_seed(0))
    result["real_images_clip_score"] = clip_score(model, tok, to_symmetric(test_x[:1000]), real_caps, device)
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result["attribute_prompts"]), flush=True)

    if args.assets:
        out = Path(args.assets)
        save_confusion(confusion, out / "zero_shot_confusion.png")
        grid = grid_prompts()
        noise = torch.randn(len(grid), 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
        save_grid(generate(model, tok, grid, noise, scale, steps, 500, interval), out / "prompt_grid.png", nrow=10)
        sweep_prompts = ["a thick slanted seven", "a thin upright 4", "a small 2", "a bold 0, slanted left"]
        scales = (0.0, 1.0, 2.0, 3.0, 5.0)
        noise = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
        rows = [generate(model, tok, [p] * 8, noise, s, steps, 500, interval) for p in sweep_prompts for s in scales]
        save_grid(torch.cat(rows), out / "guidance_sweep.png", nrow=8)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_entry(main)
