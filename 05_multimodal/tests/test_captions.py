import pytest
import torch
from captions import (
    DIGIT_WORDS,
    Tokenizer,
    attribute_levels,
    captions_for,
    ink_height,
    make_caption,
    parse_prompt,
    parse_two_digit,
    shrink,
    slant,
    stroke_thickness,
    two_digit_canvas,
    two_digit_caption,
)

from shared import UserError


def stroke(p0, p1, width, size=28):
    """A drawn segment from p0 to p1 ((x, y) pixels, y down) of the given width: float (1, 1, size, size)."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    p0, p1 = torch.tensor(p0).float(), torch.tensor(p1).float()
    d = p1 - p0
    u = ((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / d.dot(d)
    u = u.clamp(0, 1)
    dist = ((xs - p0[0] - u * d[0]) ** 2 + (ys - p0[1] - u * d[1]) ** 2).sqrt()
    return (dist <= width / 2).float()[None, None]


SEGMENTS = [((14, 4), (14, 24)), ((10, 5), (18, 23)), ((6, 8), (22, 20)), ((8, 14), (20, 14))]


@pytest.mark.parametrize("seg", SEGMENTS)
def test_thickness_ranks_thick_above_thin(seg):
    widths = [1.0, 2.0, 3.0, 4.5]
    t = stroke_thickness(torch.cat([stroke(*seg, w) for w in widths]))
    assert (t[1:] > t[:-1]).all(), t
    assert 2.0 < t[2] < 3.8  # near the drawn width (edges are counted on the pixel grid: diagonals read thinner)


def test_thickness_on_two_strokes_of_a_plus():
    thin = stroke((14, 4), (14, 24), 1.5) + stroke((4, 14), (24, 14), 1.5)
    thick = stroke((14, 4), (14, 24), 4) + stroke((4, 14), (24, 14), 4)
    assert stroke_thickness(thick.clamp(max=1)) > stroke_thickness(thin.clamp(max=1)) + 1.5


def test_slant_ranks_slanted_above_upright():
    upright = stroke((14, 4), (14, 24), 2.5)
    right = stroke((10, 24), (18, 4), 2.5)  # bottom-left to top-right: "/"
    more_right = stroke((6, 24), (22, 4), 2.5)
    left = stroke((10, 4), (18, 24), 2.5)  # "\"
    s = slant(torch.cat([left, upright, right, more_right]))
    assert s[0] < -0.2 and abs(s[1]) < 1e-4 and 0.2 < s[2] < s[3], s
    # The value itself, -cov(x, y) / var(y), is the drawn shear: columns moved right per row up, 8 / 20 and 16 / 20
    # (the round caps pull it ~1 % lower). A correlation (~0.96, 0.98) or a -cov / std(y) (~2.5, 4.9) also rank.
    assert torch.allclose(s, torch.tensor([-0.4, 0.0, 0.4, 0.8]), atol=0.01), s
    levels = attribute_levels(torch.cat([left, upright, more_right]))["slant"]
    assert levels.tolist() == [0, 1, 2]


def test_height_and_shrink():
    x = stroke((14, 4), (14, 23), 3)
    assert ink_height(x).item() == 22  # rows 3..24: the round caps add 1.5 px at each end
    small = shrink(x, torch.tensor([0.5]))
    assert 10 <= ink_height(small).item() <= 12
    assert attribute_levels(small)["size"].item() == 0 and attribute_levels(x)["size"].item() == 1
    assert ink_height(torch.zeros(1, 1, 28, 28)).item() == 0


def test_captions_name_the_label_and_the_measured_attributes():
    tok = Tokenizer()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([stroke((14, 4), (14, 23), w) for w in (1.0, 4.5)] * 50)
    x = torch.cat([x, shrink(x[:20], torch.full((20,), 0.5))])
    labels = torch.arange(len(x)) % 10
    levels = attribute_levels(x)
    caps = captions_for(x, labels, g)
    assert len(set(caps)) > 30  # varied phrasings
    for i, cap in enumerate(caps):
        digit, named = parse_prompt(cap)
        assert digit == labels[i], cap
        for name, level in named.items():
            assert level == levels[name][i], (cap, name)
        if levels["size"][i] == 0:
            assert named.get("size") == 0, cap  # "small" is always said
        ids = tok.encode(cap)
        assert tok.UNK not in ids and len(ids) <= tok.max_len, cap


def test_caption_articles():
    r = torch.zeros(8)  # first template, numeral, no attribute dropped
    assert make_caption(8, {"thickness": 1, "slant": 1, "size": 1}, torch.tensor([1, 1, 1, 0, 0, 0, 0, 0.])) == "an 8"
    assert make_caption(7, {"thickness": 2, "slant": 2, "size": 1}, r) == "a thick slanted 7"


def test_tokenizer_round_trips_and_flags_unknown_words():
    tok = Tokenizer()
    for text in ["a thick slanted seven", "seven, slanted right, drawn small", "the digit 3, with thin strokes"]:
        assert tok.decode(tok.encode(text, strict=True)) == text
    assert tok.decode(tok.batch(["A Thick 7"])[0]) == "a thick 7"
    assert tok.encode("a purple 7") == [tok.stoi["a"], tok.UNK, tok.stoi["7"], tok.EOS]
    with pytest.raises(UserError, match="unknown word 'purple'"):
        tok.encode("a purple 7", strict=True)
    with pytest.raises(UserError, match="at most"):
        tok.encode(" ".join(["seven"] * 20), strict=True)
    ids = tok.batch(["a 7", ""])
    assert ids.shape == (2, tok.max_len) and ids[1, 0] == tok.EOS and (ids[1, 1:] == tok.PAD).all()


def test_two_digit_canvas_and_captions():
    left, right = stroke((14, 4), (14, 23), 2), stroke((6, 8), (22, 20), 2)
    canvas = two_digit_canvas(left, right)
    assert canvas.shape == (1, 1, 28, 56) and torch.equal(canvas[..., 28:], right)
    a = two_digit_caption((3, "small"), (8, "bold"), left_first=True)
    b = two_digit_caption((3, "small"), (8, "bold"), left_first=False)
    assert a == "a small three to the left of a bold eight"
    assert b == "a bold eight to the right of a small three"
    assert parse_two_digit(a) == parse_two_digit(b) == (3, 8)
    assert two_digit_caption((1, ""), (8, ""), True) == "a one to the left of an eight"
    assert Tokenizer().UNK not in Tokenizer().encode(a)
    # the relation is the phrase: a side's "slanted left" / "leaning right" must not flip the order
    assert parse_two_digit("an 8 to the right of a 3, slanted left") == (3, 8)
    assert parse_two_digit("a backslanted 3 to the left of a right-leaning 8") == (3, 8)
    assert parse_two_digit("a 3 to the left of an 8, leaning right") == (3, 8)
    for bad in ("a 3", "a 3 and an 8, slanted left", "a 3 to the left of an 8 to the right of"):
        with pytest.raises(UserError):
            parse_two_digit(bad)
    assert DIGIT_WORDS[parse_prompt("a bold italic 9")[0]] == "nine"
