"""Captioned MNIST, made here: attributes measured on the pixels, captions from label + attributes, a tokenizer.

Nothing is annotated by hand. Each digit image gets three measured attributes

    thickness  = 2 * area / edges        (a w x L stroke: 2wL / (2L + 2w) ~ w)
    slant      = -cov(x, y) / var(y)     (how far x moves right per row upwards; > 0 leans right)
    height     = rows spanned by ink     (MNIST digits are ~20 px tall; shrunken copies make "small")

which are cut into words ("thin", "thick", "slanted left", "upright", "slanted right", "small") and put into
one of several phrasings ("a thick 7", "seven, slanted right, drawn small"). A two-digit 28x56 canvas with
"left of" captions is the compositional test.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from shared import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ---------------------------------------------------------------------------------------------------------
# Attribute measures on pixels: x is float (B, 1, H, W) in [0, 1]
# ---------------------------------------------------------------------------------------------------------

INK = 0.5  # a pixel is ink above this grey level


def stroke_thickness(x: torch.Tensor) -> torch.Tensor:
    """Mean stroke width in pixels, 2 * area / edges: a w x L bar has area wL and 2L + 2w ink/paper edges."""
    ink = (x[:, 0] > INK).float()  # (B, H, W)
    ink = F.pad(ink, (1, 1, 1, 1))  # the border counts as paper
    edges = (ink[:, 1:, :] - ink[:, :-1, :]).abs().sum((1, 2)) + (ink[:, :, 1:] - ink[:, :, :-1]).abs().sum((1, 2))
    return 2 * ink.sum((1, 2)) / edges.clamp(min=1)  # (B,)


def slant(x: torch.Tensor) -> torch.Tensor:
    """Shear of the ink, -cov(x, y) / var(y) with rows y growing downwards: > 0 leans right ("/"), < 0 left."""
    B, _, H, W = x.shape
    w = x[:, 0].clamp(min=0)  # (B, H, W) ink weights
    ys = torch.arange(H, dtype=x.dtype).view(1, H, 1)
    xs = torch.arange(W, dtype=x.dtype).view(1, 1, W)
    mass = w.sum((1, 2)).clamp(min=1e-6)  # (B,)
    my = (w * ys).sum((1, 2)) / mass
    mx = (w * xs).sum((1, 2)) / mass
    dy, dx = ys - my.view(B, 1, 1), xs - mx.view(B, 1, 1)
    cov = (w * dx * dy).sum((1, 2)) / mass
    var_y = (w * dy * dy).sum((1, 2)) / mass
    return -cov / var_y.clamp(min=1e-6)  # (B,)


def ink_height(x: torch.Tensor) -> torch.Tensor:
    """Rows between the first and the last row holding ink (0 for an empty image)."""
    rows = (x[:, 0] > INK).any(dim=2)  # (B, H)
    H = rows.shape[1]
    first = rows.float().argmax(1)
    last = H - 1 - rows.flip(1).float().argmax(1)
    return torch.where(rows.any(1), last - first + 1, torch.zeros_like(first)).float()  # (B,)


# Cut points measured on the MNIST training set: thickness at its terciles (1.75, 2.2); slant so that ~22 %
# lean left and ~25 % right of its +0.1 median tilt; 97.6 % of MNIST digits are taller than 15 rows, so
# "small" mostly names a copy shrunk by `shrink`.
THICK_EDGES = (1.75, 2.2)
SLANT_EDGES = (-0.1, 0.3)
SMALL_HEIGHT = 15


def attribute_levels(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each attribute as a level index: thickness 0 thin / 1 / 2 thick, slant 0 left / 1 upright / 2 right,
    size 0 small / 1 normal."""
    return {
        "thickness": torch.bucketize(stroke_thickness(x), torch.tensor(THICK_EDGES)),
        "slant": torch.bucketize(slant(x), torch.tensor(SLANT_EDGES)),
        "size": (ink_height(x) > SMALL_HEIGHT).long(),
    }


def shrink(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Zoom each image out about its centre by ``scale`` (B,) in (0, 1]: how the "small" digits are made."""
    B = x.shape[0]
    theta = torch.zeros(B, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------

# level -> (adjectives for "a thick 7", phrases for "7, with thick strokes"); the middle level says nothing
THICKNESS_WORDS = {0: (("thin", "light", "fine"), ("with thin strokes", "drawn thin")),
                   2: (("thick", "bold", "heavy"), ("with thick strokes", "drawn bold"))}
SLANT_WORDS = {0: (("backslanted", "left-leaning"), ("slanted left", "leaning left")),
               1: (("upright", "straight"), ("standing upright", "not slanted")),
               2: (("slanted", "italic", "right-leaning"), ("slanted right", "leaning right"))}
SIZE_WORDS = {0: (("small", "tiny"), ("drawn small", "written small"))}
ATTRIBUTES = {"thickness": THICKNESS_WORDS, "slant": SLANT_WORDS, "size": SIZE_WORDS}
TEMPLATES = ("a {adj}{digit}", "{digit}, {phrases}", "the digit {digit}, {phrases}", "a {adj}handwritten {digit}")


def digit_text(label: int, numeral: bool) -> str:
    return str(label) if numeral else DIGIT_WORDS[label]


def article(next_word: str) -> str:
    return "an" if (next_word[:1] in "aeiou8" and next_word != "one") else "a"


def make_caption(label: int, levels: dict[str, int], r: torch.Tensor) -> str:
    """One caption for a digit and its attribute levels; ``r`` (8,) uniform numbers pick the phrasing.

    Size "small" is always said (so an unqualified prompt asks for a full-size digit); thickness and slant
    each appear with probability 0.6, upright slant with 0.3.
    """
    said = []
    for i, (name, words) in enumerate(ATTRIBUTES.items()):
        level = int(levels[name])
        keep = 1.0 if name == "size" else 0.3 if (name == "slant" and level == 1) else 0.6
        if level in words and r[i] < keep:
            said.append(words[level])
    digit = digit_text(label, numeral=bool(r[3] < 0.5))
    template = TEMPLATES[int(r[4] * len(TEMPLATES))]
    pick = lambda options, k: options[int(r[5 + k % 3] * len(options))]  # noqa: E731
    if "{adj}" in template:
        adjs = "".join(pick(adj, k) + " " for k, (adj, _) in enumerate(said))
        body = template[2:].format(adj=adjs, digit=digit)  # without its "a "
        return f"{article(body.split()[0])} {body}"
    if not said:
        return digit if r[4] < 0.5 else f"the digit {digit}"
    return template.format(digit=digit, phrases=", ".join(pick(ph, k) for k, (_, ph) in enumerate(said)))


def captions_for(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
    """Captions for a batch of float images (B, 1, H, W) in [0, 1] with their labels (B,)."""
    levels = attribute_levels(x)
    r = torch.rand(len(x), 8, generator=generator)
    return [make_caption(int(labels[i]), {k: v[i] for k, v in levels.items()}, r[i]) for i in range(len(x))]


def parse_prompt(text: str) -> tuple[int, dict[str, int]]:
    """The digit a prompt asks for (-1 if none) and the attribute levels it names (the first digit only)."""
    text = " ".join(Tokenizer.split(text))
    words = text.split()
    digits = [int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in words if w.isdigit() or w in DIGIT_WORDS]
    levels = {}
    for name, table in ATTRIBUTES.items():
        for level, (adjs, phrases) in table.items():
            # A level's own words, longest first. "slanted left" is not read as plain "slanted" because the
            # left level is checked before the right one and setdefault keeps the first match
            for option in sorted(adjs + phrases, key=len, reverse=True):
                if re.search(rf"(^| ){re.escape(option)}( |$)", text):
                    levels.setdefault(name, level)
    return (digits[0] if digits else -1), levels


# ---------------------------------------------------------------------------------------------------------
# Two digits on a 28 x 56 canvas: the compositional test
# ---------------------------------------------------------------------------------------------------------

def two_digit_canvas(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two (B, 1, 28, 28) images side by side -> (B, 1, 28, 56)."""
    return torch.cat([left, right], dim=3)


def two_digit_caption(left: tuple[int, str], right: tuple[int, str], left_first: bool) -> str:
    """("a small three to the left of a bold eight"): each side is (label, adjectives or "")."""
    def noun(label, adj):
        words = f"{adj} {DIGIT_WORDS[label]}".strip()
        return f"{article(words.split()[0])} {words}"
    if left_first:
        return f"{noun(*left)} to the left of {noun(*right)}"
    return f"{noun(*right)} to the right of {noun(*left)}"


def side_adjectives(levels: dict[str, int], r: torch.Tensor) -> str:
    """Adjectives for one side of a two-digit caption, in the order thickness, slant, size ("thick slanted
    small"); ``r`` (6,) uniform numbers.

    As in :func:`make_caption`: "small" is always said, thickness and slant each with probability 0.5
    (upright 0.3), so that a prompt without adjectives still asks for full-size digits.
    """
    words = []
    for i, (name, table) in enumerate(ATTRIBUTES.items()):
        level = int(levels[name])
        keep = 1.0 if name == "size" else 0.3 if (name == "slant" and level == 1) else 0.5
        if level in table and r[i] < keep:
            adjs = table[level][0]
            words.append(adjs[int(r[3 + i] * len(adjs))])
    return " ".join(words)


def two_digit_batch(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
    """Pair a batch of digits at random into 28 x 56 canvases with captions naming both, in order.

    x (B, 1, 28, 28) float in [0, 1], labels (B,). Digit i goes left, digit perm[i] right (each digit is used
    once on each side); the caption says "left of" or "right of" with probability 1/2 and carries each side's
    measured attributes. Returns (canvas (B, 1, 28, 56), captions, pairs (B, 2) = (left, right) labels).
    """
    perm = torch.randperm(len(x), generator=generator)
    levels = attribute_levels(x)
    r = torch.rand(len(x), 13, generator=generator)
    captions = []
    for i, j in enumerate(perm.tolist()):
        left = (int(labels[i]), side_adjectives({k: v[i] for k, v in levels.items()}, r[i, :6]))
        right = (int(labels[j]), side_adjectives({k: v[j] for k, v in levels.items()}, r[i, 6:12]))
        captions.append(two_digit_caption(left, right, left_first=bool(r[i, 12] < 0.5)))
    return two_digit_canvas(x, x[perm]), captions, torch.stack([labels, labels[perm]], 1)


def two_digit_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    """n plain prompts over all 90 ordered pairs of different digits: (prompts, pairs (n, 2) = (left, right)).

    Prompt i puts digit i % 10 left and (i % 10 + 1 + (i // 20) % 9) % 10 right; rows of ten alternate
    between "to the left of" and "to the right of", so each pair is asked both ways.
    """
    pairs = [(i % 10, (i % 10 + 1 + (i // 20) % 9) % 10) for i in range(n)]
    prompts = [two_digit_caption((a, ""), (b, ""), left_first=(i // 10) % 2 == 0) for i, (a, b) in enumerate(pairs)]
    return prompts, torch.tensor(pairs).view(n, 2)


def parse_two_digit(text: str) -> tuple[int, int]:
    """(left digit, right digit) that a "to the left of" / "to the right of" caption asks for.

    The relation is the whole phrase, not the word: "an 8 to the right of a 3, slanted left" puts the 3 left.
    """
    words = Tokenizer.split(text)
    digits = [int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in words if w.isdigit() or w in DIGIT_WORDS]
    padded = f" {' '.join(words)} "
    left_of, right_of = " to the left of " in padded, " to the right of " in padded
    if len(digits) != 2 or left_of == right_of:
        raise UserError(f"{text!r} is not a two-digit prompt like 'a 3 to the left of an 8'")
    return (digits[0], digits[1]) if left_of else (digits[1], digits[0])


# ---------------------------------------------------------------------------------------------------------
# Word-level tokenizer over the caption language
# ---------------------------------------------------------------------------------------------------------

def caption_vocabulary() -> list[str]:
    words = set(DIGIT_WORDS) | {str(d) for d in range(10)}
    words |= {"a", "an", "the", "digit", "handwritten", ",", "to", "of", "left", "right"}
    for table in ATTRIBUTES.values():
        for adjs, phrases in table.values():
            for text in adjs + phrases:
                words |= set(text.split())
    return sorted(words)


class Tokenizer:
    """Words -> ids with ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2; every sequence ends with ``<eos>``."""
    SPECIALS = ("<pad>", "<unk>", "<eos>")
    PAD, UNK, EOS = 0, 1, 2

    def __init__(self, words: list[str] | None = None, max_len: int = 16):
        self.itos = list(self.SPECIALS) + (words if words is not None else caption_vocabulary())
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.itos)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words, with commas as words of their own."""
        return re.findall(r"[\w-]+|,", text.lower())

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Ids of the words, then ``<eos>``. Unknown words become ``<unk>``, or a UserError when ``strict``."""
        words = self.split(text)
        unknown = [w for w in words if w not in self.stoi]
        if strict and unknown:
            raise UserError(f"unknown word {unknown[0]!r} in prompt {text!r}; the model knows only: "
                            + " ".join(w for w in self.itos[3:]))
        ids = [self.stoi.get(w, self.UNK) for w in words] + [self.EOS]
        if len(ids) > self.max_len:
            if strict:
                raise UserError(f"prompt {text!r} has {len(ids) - 1} words; at most {self.max_len - 1} fit")
            ids = ids[: self.max_len - 1] + [self.EOS]
        return ids

    def decode(self, ids) -> str:
        words = [self.itos[int(i)] for i in ids if int(i) not in (self.PAD, self.EOS)]
        return " ".join(words).replace(" ,", ",")

    def batch(self, texts: list[str], strict: bool = False) -> torch.Tensor:
        """(B, max_len) int64 ids, right-padded with ``<pad>``."""
        out = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text, strict)
            out[i, : len(ids)] = torch.tensor(ids)
        return out
