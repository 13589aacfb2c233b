"""The single-digit evaluation of evaluate.py, on stand-ins whose answers are known: prompts, retrieval, the
zero-shot confusion matrix, attribute and digit adherence."""

import json
from pathlib import Path
from types import SimpleNamespace

import evaluate as evaluate_script
import pytest
import torch
import torch.nn.functional as F
from captions import DIGIT_WORDS, Tokenizer, article, attribute_levels, parse_prompt, shrink
from evaluate import ATTRIBUTE_PROMPTS, attribute_prompts, retrieval, zero_shot
from test_captions import stroke
from train import grid_prompts

import shared.classifier
import shared.metrics
from shared.data import load_images

STAGE_DIR = Path(__file__).parents[1]


def test_attribute_prompts_ask_each_attribute_of_every_digit():
    """The 60 prompts that --num-samples 60 draws ask each of the 6 attributes of all 10 digits; the next 60
    ask the same in words. Each prompt names the digit it is scored against and the attribute it is scored on."""
    prompts, digits, asked = attribute_prompts(120)
    assert len(prompts) == len(digits) == len(asked) == 120
    for p, d, key in zip(prompts, digits, asked):
        name, level, _ = ATTRIBUTE_PROMPTS[key]
        assert parse_prompt(p) == (d, {name: level}), (p, d, key)
        assert Tokenizer().UNK not in Tokenizer().encode(p, strict=True)
    pairs = {(key, d) for key in ATTRIBUTE_PROMPTS for d in range(10)}
    assert sorted(zip(asked[:60], digits[:60])) == sorted(pairs)  # each pair once
    assert sorted(zip(asked[60:], digits[60:])) == sorted(pairs)
    assert all(p.split()[-1] == str(d) for p, d in zip(prompts[:60], digits[:60]))
    assert all(p.split()[-1] == DIGIT_WORDS[d] for p, d in zip(prompts[60:], digits[60:]))


class FixedEmbeddings(torch.nn.Module):
    """A mini-CLIP stand-in that returns preset unit embeddings: image i -> z_img[i], caption i -> z_txt[i]."""

    def __init__(self, z_img: torch.Tensor, z_txt: torch.Tensor):
        super().__init__()
        self.z_img, self.z_txt = z_img, z_txt

    def embed_image(self, x):
        assert x.shape == (len(self.z_img), 1, 28, 28) and -1 <= x.min() and x.max() <= 1
        return self.z_img

    def embed_text(self, ids):
        assert ids.shape == (len(self.z_txt), Tokenizer().max_len)
        return self.z_txt


def retrieve(z_img, z_txt, images, labels) -> dict:
    model = SimpleNamespace(clip=FixedEmbeddings(z_img, z_txt))
    return retrieval(model, Tokenizer(), images, labels, "cpu")


def test_retrieval_ranks_each_caption_own_image():
    """Recall@k: the share of captions whose own image has fewer than k images scoring strictly above it."""
    images, labels = load_images("mnist", train=False)
    n = 30
    images, labels = images[:n], labels[:n]
    z = F.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    assert retrieve(z, z, images, labels) == {"recall@1": 1.0, "recall@10": 1.0, "top1_same_digit": 1.0}
    # A known permutation: caption i embeds as image perm[i]. The first 12 are rotated by one (own image second,
    # one image above it), the other 18 are fixed points.
    perm = torch.cat([torch.arange(12).roll(1), torch.arange(12, n)])
    eye = torch.eye(n)
    got = retrieve(eye, eye[perm], images, labels)
    assert got["recall@1"] == pytest.approx(18 / n) and got["recall@10"] == 1.0
    assert got["top1_same_digit"] == pytest.approx((labels[perm] == labels).float().mean().item())
    assert got["top1_same_digit"] < 1  # the rotation does move captions onto other digits' images
    # Known ranks: caption i's own image scores between the (i % 12)-th and the next highest of the other images,
    # so that exactly i % 12 images rank above it (0 for 3 captions, < 10 for 26). Each row's own score differs,
    # so a caption must be compared with its own image's score, not another caption's.
    sims = torch.rand(n, n, generator=torch.Generator().manual_seed(1))
    for i in range(n):
        others = torch.cat([sims[i, :i], sims[i, i + 1:]]).sort(descending=True).values
        r = i % 12
        sims[i, i] = others[0] + 0.1 if r == 0 else (others[r - 1] + others[r]) / 2
    got = retrieve(eye, sims, images, labels)  # images one-hot: the scores are the rows of z_txt
    assert got["recall@1"] == pytest.approx(3 / n) and got["recall@10"] == pytest.approx(26 / n)


class DigitReader(torch.nn.Module):
    """A mini-CLIP stand-in for zero-shot: a prompt embeds as the one-hot of the digit it names, an image as the
    one-hot of the digit written into its top-left pixel (as the value d + 1 of 255)."""

    cfg = SimpleNamespace(embed_dim=10)

    def embed_text(self, ids):
        tok = Tokenizer()
        return F.one_hot(torch.tensor([parse_prompt(tok.decode(row))[0] for row in ids]), 10).float()

    def embed_image(self, x):
        return F.one_hot(((x[:, 0, 0, 0] + 1) * 127.5).round().long() - 1, 10).float()


def test_zero_shot_confusion_has_true_digits_as_rows():
    images, labels = load_images("mnist", train=False)
    images, labels = images[:1200].clone(), labels[:1200]  # two batches of the 1,000 that zero_shot reads at once
    preds = labels.clone()
    threes, sevens = (labels == 3).nonzero()[:20, 0], (labels == 7).nonzero()[:5, 0]
    preds[threes], preds[sevens] = 8, 1
    images[:, 0, 0, 0] = (preds + 1).to(torch.uint8)
    acc, confusion = zero_shot(SimpleNamespace(clip=DigitReader()), Tokenizer(), images, labels, "cpu")
    assert acc == pytest.approx(1 - 25 / 1200)
    assert confusion[3, 8] == 20 and confusion[8, 3] == 0 and confusion[7, 1] == 5 and confusion[1, 7] == 0
    assert torch.equal(confusion.sum(1), torch.bincount(labels, minlength=10))  # rows: true digit
    assert torch.equal(confusion.sum(0), torch.bincount(preds, minlength=10))  # columns: predicted
    assert confusion.sum() - confusion.diag().sum() == 25


def attribute_strokes() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each key of ATTRIBUTE_PROMPTS, a drawn stroke that has the asked level and one that misses it:
    float (1, 1, 28, 28) in [0, 1]."""
    upright, right = stroke((14, 4), (14, 24), 2.5), stroke((6, 24), (22, 4), 2.5)
    left = stroke((10, 4), (18, 24), 2.5)
    thin, thick = stroke((14, 4), (14, 24), 1.0), stroke((14, 4), (14, 24), 4.5)
    small = shrink(upright, torch.tensor([0.5]))
    return {"thin": (thin, thick), "thick": (thick, thin), "left": (left, right), "upright": (upright, right),
            "right": (right, upright), "small": (small, upright)}


def test_attribute_and_digit_adherence_count_the_matches(monkeypatch):
    """evaluate.py on the pretrained checkpoint with the sampler and the shared classifier replaced: the sampler
    draws the asked attribute for digits 0-6 and misses it for 7-9, the classifier reads the asked digit for
    digits 0-7 and the next digit for 8-9. So each attribute's adherence is 0.7 and the digit adherence 0.8."""
    strokes = attribute_strokes()
    for key, (hit, miss) in strokes.items():  # the drawn strokes measure as intended
        name, level, _ = ATTRIBUTE_PROMPTS[key]
        assert attribute_levels(hit)[name].item() == level and attribute_levels(miss)[name].item() != level, key
    key_of = {(name, level): key for key, (name, level, _) in ATTRIBUTE_PROMPTS.items()}
    drawn, flags, scored = [], [], []

    def fake_generate(model, tok, prompts, noise, *args):
        drawn.append(prompts)
        flags.append((args[0], args[1], args[3]))  # scale, steps, interval (args[2] is the batch size)
        out = []
        for p in prompts:
            digit, named = parse_prompt(p)
            if not named:  # the plain prompts "a seven"
                out.append(strokes["upright"][0])
                continue
            hit, miss = strokes[key_of[next(iter(named.items()))]]
            out.append(hit if digit < 7 else miss)
        return 2 * torch.cat(out) - 1  # (N, 1, 28, 28) in [-1, 1], as the sampler returns

    def fake_predict(classifier, u8):
        asked = torch.tensor([parse_prompt(p)[0] for p in drawn[-1]])  # the images come in prompt order
        assert u8.dtype == torch.uint8 and len(u8) == len(asked)
        read = torch.where(asked < 8, asked, (asked + 1) % 10)
        return torch.zeros(len(u8), 128), F.one_hot(read, 10).float()

    test_x, test_y = load_images("mnist", train=False)
    def test_split(name, train=True):
        assert not train  # zero-shot, retrieval and the real-image CLIP score read the test split
        return test_x[:100], test_y[:100]

    monkeypatch.setattr(evaluate_script, "load_images", test_split)
    monkeypatch.setattr(evaluate_script, "generate", fake_generate)
    monkeypatch.setattr(shared.classifier, "load_classifier", lambda device="cpu": object())
    monkeypatch.setattr(shared.classifier, "predict", fake_predict)
    monkeypatch.setattr(shared.metrics, "evaluate", lambda images, labels: scored.append(list(labels)) or dict.fromkeys(
        ("fid", "fid_floor", "precision", "recall", "label_accuracy"), 0.0))
    result = evaluate_script.main(["--ckpt", str(STAGE_DIR / "pretrained" / "mnist.pt"), "--num-samples", "60",
                                   "--device", "cpu", "--cfg-scale", "4", "--sample-steps", "2", "--cfg-interval",
                                   "0.1", "0.9"])
    assert len(drawn) == 2 and len(drawn[1]) == 60
    assert flags == [(4.0, 2, (0.1, 0.9))] * 2  # both prompt sets sampled as asked
    assert scored == [[parse_prompt(p)[0] for p in drawn[0]]]  # FID's labels are the plain prompts' digits
    scores = result["attribute_prompts"]
    assert scores["attribute_adherence"] == pytest.approx(dict.fromkeys(ATTRIBUTE_PROMPTS, 0.7))
    assert all(m["count"] == 3 and m["median_distance"] > 0 for m in scores["attribute_misses"].values())
    assert scores["digit_adherence"] == pytest.approx(0.8)


GUIDANCE = ["--cfg-scale", "2.5", "--sample-steps", "3", "--cfg-interval", "0.2", "0.7"]


@pytest.mark.parametrize("flags, asked", [(GUIDANCE, (2.5, 3, (0.2, 0.7))), ([], (3.0, 30, (0.0, 1.0)))])
def test_flags_reach_every_sampler_call_and_the_outputs(tmp_path, monkeypatch, flags, asked):
    """evaluate.py with --assets and --json, the sampler and the classifier replaced: --num-samples sets both
    prompt sets' sizes, every sample is drawn with --cfg-scale / --sample-steps / --cfg-interval, or without them
    the checkpoint's own (pretrained: scale 3, 30 steps), the guidance sweep with its own scales; the pictures are
    written, the JSON file holds the returned numbers, and these report the settings used and --device; a second
    evaluation draws the same noise."""
    calls, devices, noises = [], [], []

    def fake_generate(model, tok, prompts, noise, scale, steps, batch_size, interval):
        assert len(noise) == len(prompts)
        calls.append((list(prompts), scale, steps, interval))
        noises.append(noise.clone())
        return noise.clamp(-1, 1)

    test_x, test_y = load_images("mnist", train=False)
    monkeypatch.setattr(evaluate_script, "load_images", lambda name, train=True: (test_x[:100], test_y[:100]))
    monkeypatch.setattr(evaluate_script, "choose_device", lambda device: devices.append(device) or torch.device("cpu"))
    monkeypatch.setattr(evaluate_script, "generate", fake_generate)
    monkeypatch.setattr(shared.classifier, "load_classifier", lambda device="cpu": object())
    monkeypatch.setattr(shared.classifier, "predict",
                        lambda classifier, u8: (torch.zeros(len(u8), 128), torch.zeros(len(u8), 10)))
    monkeypatch.setattr(shared.metrics, "evaluate", lambda images, labels: dict.fromkeys(
        ("fid", "fid_floor", "precision", "recall", "label_accuracy"), 0.0))
    assets, out = tmp_path / "assets", tmp_path / "result.json"
    result = evaluate_script.main(["--ckpt", str(STAGE_DIR / "pretrained" / "mnist.pt"), "--num-samples", "70",
                                   "--device", "cpu", *flags, "--assets", str(assets), "--json", str(out)])
    scale, steps, interval = asked
    plain, attributes, grid, *sweep = calls
    assert plain[0] == [f"{article(w)} {w}" for w in DIGIT_WORDS] * 7 and attributes[0] == attribute_prompts(70)[0]
    assert grid[0] == grid_prompts() and len(sweep) == 4 * 5
    assert [c[1:] for c in (plain, attributes, grid)] == [asked] * 3
    assert [c[1:] for c in sweep] == [(s, steps, interval) for s in (0.0, 1.0, 2.0, 3.0, 5.0)] * 4
    assert all(len(set(c[0])) == 1 and len(c[0]) == 8 for c in sweep)  # one prompt a row, 8 noises
    assert {p.name for p in assets.iterdir()} == {"zero_shot_confusion.png", "prompt_grid.png", "guidance_sweep.png"}
    assert json.loads(out.read_text()) == result
    assert (result["cfg_scale"], result["sample_steps"], result["cfg_interval"], result["weights"]) == \
        (scale, steps, list(interval), "ema")
    assert devices == ["cpu"]
    if not flags:  # a second evaluation samples from the same noise: the numbers are reproducible
        before = len(noises)
        evaluate_script.main(["--ckpt", str(STAGE_DIR / "pretrained" / "mnist.pt"), "--num-samples", "70"])
        assert len(noises) == before + 2 and all(torch.equal(a, b) for a, b in zip(noises[:2], noises[before:]))
