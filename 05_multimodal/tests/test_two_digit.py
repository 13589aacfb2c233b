"""The two-digit compositional test: pairing, scoring, the MMDiT's word order, training and resume."""

import dataclasses
import json

import evaluate as evaluate_script
import numpy as np
import pytest
import sample as sample_script
import torch
import train
from captions import (
    DIGIT_WORDS,
    Tokenizer,
    attribute_levels,
    parse_prompt,
    parse_two_digit,
    shrink,
    slant,
    stroke_thickness,
    two_digit_batch,
    two_digit_prompts,
)
from evaluate import binding_prompts, binding_scores, classify_halves, rate_by_attribute, two_digit_scores
from model import MMDIT_SIZES, MMDiT, MMDiTConfig, sincos_positions, sincos_positions_2d

import shared.classifier
from shared import UserError
from shared.checkpoint import save_checkpoint
from shared.classifier import load_classifier, predict
from shared.cli import config_from_preset
from shared.data import load_images, to_unit
from shared.testing import checkpoints_equal, run_interrupted_and_straight

TINY = dict(steps=8, clip_steps=4, batch_size=16, sample_steps=2, log_every=2, two_digit=True)


def test_pair_builder_puts_the_named_digits_left_and_right_in_order():
    images, labels = load_images("mnist", train=False)
    x, y = to_unit(images[:200]), labels[:200]
    canvas, captions, pairs = two_digit_batch(x, y, torch.Generator().manual_seed(0))
    assert canvas.shape == (200, 1, 28, 56) and pairs.shape == (200, 2)
    flat = x.flatten(1)
    phrasings = set()
    for i, caption in enumerate(captions):
        assert torch.equal(canvas[i, ..., :28], x[i])  # digit i is drawn on the left
        j = int((flat == canvas[i, ..., 28:].flatten()).all(1).nonzero()[0])  # which digit is on the right
        assert pairs[i].tolist() == [int(y[i]), int(y[j])]
        assert parse_two_digit(caption) == (int(y[i]), int(y[j])), caption
        first, second = caption.split(" to the ")
        left_words, right_words = (first, second) if second.startswith("left") else (second, first)
        for words, k in ((left_words, i), (right_words, j)):  # each side's adjectives were measured on its digit
            for name, level in parse_prompt(words.removeprefix("left of ").removeprefix("right of "))[1].items():
                assert level == attribute_levels(x[k: k + 1])[name].item(), (caption, name)
        phrasings.add(second.split()[0])
        assert Tokenizer().UNK not in Tokenizer().encode(caption, strict=True)
    assert phrasings == {"left", "right"}
    assert sorted(canvas[:, ..., 28:].flatten(1).sum(1).tolist()) == sorted(flat.sum(1).tolist())  # each once


def test_two_digit_prompts_cover_every_ordered_pair_both_ways():
    prompts, pairs = two_digit_prompts(180)
    assert all(parse_two_digit(p) == tuple(q.tolist()) for p, q in zip(prompts, pairs))
    assert (pairs[:, 0] != pairs[:, 1]).all()
    asked = {(tuple(q.tolist()), " left of " in p) for p, q in zip(prompts, pairs)}
    assert len(asked) == 180  # 90 ordered pairs x 2 phrasings


def test_scorer_counts_a_swapped_pair_as_wrong():
    pred = torch.tensor([[3, 8], [8, 3], [3, 3], [1, 2]])
    asked = torch.tensor([[3, 8], [3, 8], [3, 8], [3, 8]])
    s = two_digit_scores(pred, asked)
    assert s == {"both_in_order": 0.25, "left_accuracy": 0.5, "right_accuracy": 0.25, "swapped": 0.25, "doubled": 0.25}
    # "doubled" is one of the asked digits twice: 5 twice, for 3 and 8, is not
    assert two_digit_scores(torch.tensor([[5, 5], [8, 8]]), torch.tensor([[3, 8], [3, 8]]))["doubled"] == 0.5
    # on real digits through the shared classifier: "3 left of 8" is right, the same canvas asked as "8 left of 3"
    images, labels = load_images("mnist", train=False)
    threes, eights = images[labels == 3][1:11], images[labels == 8][1:11]  # (the classifier reads the first 3 as 5)
    canvas = torch.cat([threes, eights], dim=3)  # (10, 1, 28, 56) uint8
    classifier = load_classifier("cpu")
    pred = classify_halves(classifier, canvas)
    assert torch.equal(pred[:, 0], predict(classifier, threes)[1].argmax(1))  # each half is read on its own
    assert two_digit_scores(pred, torch.tensor([[3, 8]] * 10))["both_in_order"] == 1.0
    swapped = two_digit_scores(pred, torch.tensor([[8, 3]] * 10))
    assert swapped["both_in_order"] == 0.0 and swapped["swapped"] == 1.0


def test_binding_prompts_ask_opposite_levels_on_both_sides_of_every_digit():
    prompts, pairs, attributes, low_side = binding_prompts(120)
    assert all(parse_two_digit(p) == tuple(q.tolist()) for p, q in zip(prompts, pairs))
    assert "a thin zero to the left of a thick one" == prompts[0] and "a small two to the left of a three" == prompts[2]
    assert "a thin two to the right of a thick zero" == prompts[30]  # the next 30 ask the other way round
    for p, a, low, (left, right) in zip(prompts, attributes, low_side.tolist(), pairs.tolist()):
        less = {"thickness": "thin", "slant": "backslanted", "size": "small"}[a]
        asked_less = left if low == 0 else right
        assert f"{less} {DIGIT_WORDS[asked_less]}" in p, p
    met = {(left, a, low) for (left, _), a, low in zip(pairs.tolist(), attributes, low_side.tolist())}
    assert len(met) == 10 * 3 * 2  # every left digit x attribute x side asked for less
    phrasing = {(" left of " in p, low) for p, low in zip(prompts, low_side.tolist())}
    assert len(phrasing) == 4  # the side asked for less is not tied to the phrasing
    plain, plain_pairs, _, _ = binding_prompts(120, adjectives=False)
    assert torch.equal(plain_pairs, pairs) and plain == two_digit_prompts(120)[0]


def test_rate_by_attribute_averages_each_attribute_own_prompts():
    right = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    attributes = ["thickness", "slant", "size", "thickness", "slant", "size"]
    assert rate_by_attribute(right, attributes) == {"thickness": 1.0, "slant": 0.0, "size": 0.5}


def test_binding_scorer_reads_each_side_on_its_own():
    images, _ = load_images("mnist", train=False)
    x = to_unit(images[:500])
    thin, thick = x[stroke_thickness(x).argsort()[[0, -1]]]
    back, forward = x[slant(x).argsort()[[0, -1]]]
    small = shrink(x[:1], torch.tensor([0.5]))[0]
    canvases = torch.stack([torch.cat([thin, thick], 2), torch.cat([back, forward], 2),
                            torch.cat([small, x[0]], 2)])  # (3, 1, 28, 56): less of each attribute on the left
    attributes = ["thickness", "slant", "size"]
    assert binding_scores(canvases, attributes, torch.zeros(3, dtype=torch.long)) == dict.fromkeys(attributes, 1.0)
    assert binding_scores(canvases, attributes, torch.ones(3, dtype=torch.long)) == dict.fromkeys(attributes, 0.0)
    same = torch.cat([x[:3], x[:3]], 3)  # identical halves: a tie, half right
    assert binding_scores(same, attributes, torch.zeros(3, dtype=torch.long)) == dict.fromkeys(attributes, 0.5)


def test_text_positions_make_the_mmdit_hear_word_order():
    """Without positions, joint attention treats the text tokens as a set: permuting them (states and mask
    together) leaves the image output unchanged. With learned or sin-cos ``text_pos`` it does not."""
    torch.manual_seed(0)
    z, t = torch.randn(2, 1, 28, 56), torch.rand(2)
    states, pooled = torch.randn(2, 16, 32), torch.randn(2, 32)
    keep = torch.ones(2, 16, dtype=torch.bool)
    perm = torch.randperm(16)
    for text_pos in ("none", "learned", "sincos"):
        model = MMDiT(MMDiTConfig(**MMDIT_SIZES["tiny"], text_width=32, width_px=56, text_pos=text_pos))
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        out = model(z, t, states, keep, pooled)
        moved = model(z, t, states[:, perm], keep[:, perm], pooled)
        assert out.shape == (2, 1, 28, 56)
        assert torch.allclose(out, moved, atol=1e-5) == (text_pos == "none")


def test_sincos_positions_compare_by_offset_only():
    """Eq. (12) itself, and <P_i, P_j> = sum_k cos(w_k (i - j)): the similarity of two fixed positions depends
    only on their offset, every row has norm sqrt(dim / 2), and the 2-D table is a row half and a column half."""
    P = sincos_positions(16, 64)
    n, k = torch.arange(16.0)[:, None], torch.arange(32.0)[None]
    angle = n * 10000 ** (-2 * k / 64)  # Eq. (12) written out: n omega_k, omega_k = 10000^(-2k/d)
    assert torch.allclose(P, torch.cat([angle.cos(), angle.sin()], dim=1), atol=1e-4)
    gram = P @ P.T
    for offset in range(1, 8):
        diagonal = torch.diagonal(gram, offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4)
    assert gram[0, 1] < gram[0, 0] and torch.allclose(P.norm(dim=1), torch.full((16,), 32 ** 0.5))
    grid = sincos_positions_2d(7, 14, 64)[0].view(7, 14, 64)
    assert torch.equal(grid[2, :, :32], grid[2, :1, :32].expand(14, 32))  # same row, same row half
    assert torch.equal(grid[:, 5, 32:], grid[:1, 5, 32:].expand(7, 32))  # same column, same column half
    assert not torch.equal(grid[0, 0, 32:], grid[0, 1, 32:])


@pytest.mark.parametrize("image_pos", ["learned", "sincos"])
def test_fixed_positions_are_not_parameters(image_pos):
    model = MMDiT(MMDiTConfig(**MMDIT_SIZES["tiny"], text_width=32, width_px=56, text_pos="sincos",
                              image_pos=image_pos))
    names = {name for name, _ in model.named_parameters()}
    assert "text_pos" not in names and ("pos_emb" in names) == (image_pos == "learned")
    assert "text_pos" not in model.state_dict()  # a buffer made from the config, not saved


def test_two_digit_resume_is_bit_identical_and_sample_writes_pairs(tmp_path, monkeypatch):
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", **TINY, device="cpu")
    straight, resumed = run_interrupted_and_straight(train.main, cfg, 6, tmp_path)  # stopped in the MMDiT phase
    assert checkpoints_equal(straight, resumed, keys=("model", "ema"))
    assert "dit.pos_emb" not in straight["model"] and "dit.text_pos" not in straight["model"]  # fixed sin-cos
    out = tmp_path / "two.npz"
    sample_script.main(["--ckpt", str(tmp_path / train.STAGE / "straight" / "ckpt.pt"), "--num-samples", "4",
                        "--out", str(out), "--device", "cpu", "--prompt", "a small 3 to the left of a bold 8",
                        "--prompt", "a 1 to the right of a 7"])
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (4, 1, 28, 56)
    assert data["labels"].tolist() == [[3, 8], [7, 1], [3, 8], [7, 1]]
    with monkeypatch.context() as patch:  # a one-digit prompt for the two-digit model: refused before sampling
        patch.setattr(sample_script, "generate", lambda *args: pytest.fail("sampled before the mistake showed"))
        with pytest.raises(UserError, match="not a two-digit prompt"):
            sample_script.main(["--ckpt", str(tmp_path / train.STAGE / "straight" / "ckpt.pt"), "--out", str(out),
                                "--prompt", "a 1 to the right of a 7", "--prompt", "a seven"])
    asked_pairs = []
    swap_cosines = evaluate_script.swap_cosines
    monkeypatch.setattr(evaluate_script, "swap_cosines", lambda m, t, pairs: asked_pairs.extend(pairs.tolist())
                        or swap_cosines(m, t, pairs))
    result = evaluate_script.main(["--ckpt", str(tmp_path / train.STAGE / "straight" / "ckpt.pt"), "--num-samples",
                                   "10", "--device", "cpu", "--assets", str(tmp_path)])  # the two-digit evaluation
    assert result["num_prompts"] == 10 and 0 <= result["both_in_order"] <= result["left_accuracy"] <= 1
    assert 0 < result["clip_swap_cosine"]["pooled"] <= 1 and (tmp_path / "two_digit_grid.png").is_file()
    assert sorted(map(tuple, asked_pairs)) == [(a, b) for a in range(10) for b in range(10) if a != b]  # each once
    binding, control = result["attribute_binding"], result["attribute_binding_control"]
    assert binding["num_prompts"] == control["num_prompts"] == 60 and (tmp_path / "two_digit_binding.png").is_file()
    assert all(0 <= binding[k] <= 1 and 0 <= control[k] <= 1 for k in ("thickness", "slant", "size"))
    for scores in (binding, control):  # 20 prompts per attribute: the three rates average to the overall one
        by_attribute = scores["both_in_order_by_attribute"]
        assert sorted(by_attribute) == ["size", "slant", "thickness"]
        assert sum(by_attribute.values()) / 3 == pytest.approx(scores["both_in_order"], abs=1e-6)


class OneHotText(torch.nn.Module):
    """A stand-in for the mini-CLIP's text encoder: each token's state is the one-hot of its id; the pooled
    state is their sum (a bag of words) or, with ``first_word``, the state of the second token (the first digit
    word of "a {a} to the left of a {b}")."""

    def __init__(self, vocab: int, first_word: bool = False):
        super().__init__()
        self.vocab, self.first_word = vocab, first_word
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # swap_cosines asks the model for its device

    def text(self, ids):
        states = torch.nn.functional.one_hot(ids, self.vocab).float()
        return states, states[:, 1] if self.first_word else states.sum(1)


def test_swap_cosines_of_a_bag_of_words_are_one_and_of_the_first_word_zero():
    """README (12), the bag-of-words check: with one-hot token states, each digit word's state at its place in
    "a {a} ... a {b}" equals its state at its other place in "a {b} ... a {a}" (cosine 1), while comparing the
    two digits would give 0; summed states are the same bag of words (1), the first word differs (0)."""
    tok = Tokenizer()
    pairs = torch.tensor([(a, b) for a in range(10) for b in range(10) if a != b])
    stub = torch.nn.Module()
    stub.clip = OneHotText(len(tok))
    assert evaluate_script.swap_cosines(stub, tok, pairs) == pytest.approx({"pooled": 1.0, "digit_words": 1.0},
                                                                           abs=1e-6)
    stub.clip = OneHotText(len(tok), first_word=True)
    assert evaluate_script.swap_cosines(stub, tok, pairs) == pytest.approx({"pooled": 0.0, "digit_words": 1.0},
                                                                           abs=1e-6)


@pytest.mark.parametrize("two_digit", [False, True])
def test_two_digit_flag_widens_the_canvas_and_adds_text_positions(two_digit):
    """Both models have fixed 2-D sin-cos patch positions; only the two-digit one hears word positions."""
    dit = train.build(train.TrainConfig(two_digit=two_digit), Tokenizer()).dit
    assert (dit.text_pos is not None) == two_digit and dit.cfg.width_px == (56 if two_digit else 28)
    assert not isinstance(dit.pos_emb, torch.nn.Parameter)
    assert dit.pos_emb.shape == (1, 7 * (14 if two_digit else 7), 64)
    learned = train.build(train.TrainConfig(two_digit=True, image_pos="learned", text_pos="learned"), Tokenizer()).dit
    assert isinstance(learned.pos_emb, torch.nn.Parameter) and isinstance(learned.text_pos, torch.nn.Parameter)


@pytest.mark.parametrize("flags, asked", [
    (["--weights", "model", "--cfg-scale", "2.5", "--sample-steps", "3", "--cfg-interval", "0.2", "0.7"],
     ("model", 2.5, 3, (0.2, 0.7))),
    ([], ("ema", 1.5, 5, (0.0, 1.0))),  # the checkpoint's own --cfg-scale and --sample-steps
])
def test_two_digit_evaluation_samples_with_the_flags_and_sizes_asked(tmp_path, monkeypatch, flags, asked):
    """evaluate.py on a two-digit checkpoint, the sampler and the classifier replaced: every prompt set (pairs,
    same-digit control, binding and its control) is drawn with the --weights, --cfg-scale, --sample-steps and
    --cfg-interval asked (or the checkpoint's), in the sizes --num-samples sets (n, max(10, n // 5),
    max(60, n // 2) twice); the numbers, also in --json, report those settings; a second evaluation draws the
    same noise."""
    cfg = config_from_preset(train.TrainConfig, train.PRESETS, "smoke", two_digit=True, cfg_scale=1.5,
                             sample_steps=5)
    raw = train.build(cfg, Tokenizer()).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    ckpt = save_checkpoint({"stage": train.STAGE, "config": dataclasses.asdict(cfg), "step": cfg.steps,
                            "model": raw, "ema": ema}, tmp_path / "two.pt")
    weights, scale, steps, interval = asked
    calls, noises = [], []

    def fake_generate(model, tok, prompts, noise, scale, steps, batch_size, interval):
        assert noise.shape == (len(prompts), 1, 28, 56)
        want = {"model": raw, "ema": ema}[weights]["dit.final.weight"]
        assert torch.equal(model.state_dict()["dit.final.weight"], want)
        calls.append((len(prompts), scale, steps, interval))
        noises.append(noise.clone())
        return noise.clamp(-1, 1)

    monkeypatch.setattr(evaluate_script, "generate", fake_generate)
    monkeypatch.setattr(shared.classifier, "load_classifier", lambda device="cpu": object())
    monkeypatch.setattr(shared.classifier, "predict",
                        lambda classifier, u8: (torch.zeros(len(u8), 128), torch.zeros(len(u8), 10)))
    result = evaluate_script.main(["--ckpt", str(ckpt), "--num-samples", "130", "--device", "cpu", *flags,
                                   "--json", str(tmp_path / "two.json")])
    assert calls == [(n, scale, steps, interval) for n in (130, 26, 65, 65)]
    assert (result["num_prompts"], result["same_digit_prompts"]["num_prompts"],
            result["attribute_binding"]["num_prompts"], result["attribute_binding_control"]["num_prompts"]) == \
        (130, 26, 65, 65)
    assert (result["ckpt"], result["weights"], result["cfg_scale"], result["sample_steps"], result["cfg_interval"]) \
        == (str(ckpt), weights, scale, steps, list(interval))
    assert json.loads((tmp_path / "two.json").read_text()) == result
    evaluate_script.main(["--ckpt", str(ckpt), "--num-samples", "130", "--device", "cpu", *flags])
    assert len(noises) == 8 and all(torch.equal(a, b) for a, b in zip(noises[:4], noises[4:]))  # the same noise
