import math

import pytest
import torch
import torch.nn.functional as F
from captions import Tokenizer
from flow import guided_velocity, interpolate, logit_normal_t, rectified_flow_loss, sample
from model import (
    CLIP,
    CLIP_SIZES,
    MMDIT_SIZES,
    CLIPConfig,
    MMDiT,
    MMDiTConfig,
    Stream,
    TextToImage,
    count_params,
    info_nce,
    zero_shot_logits,
)
from sample import generate, interpolate_prompts

TOK = Tokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    clip_cfg = CLIPConfig(vocab_size=len(TOK), **CLIP_SIZES["tiny"])
    model = TextToImage(clip_cfg, MMDiTConfig(text_width=clip_cfg.width, **MMDIT_SIZES["tiny"]))
    for p in model.dit.parameters():  # leave adaLN-Zero's zero init so the tests see a non-trivial network
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_info_nce_is_cross_entropy_both_ways():
    torch.manual_seed(0)
    logits = 3 * torch.randn(6, 6)
    brute_i2t = -sum(math.log(math.exp(logits[i, i]) / sum(math.exp(logits[i, j]) for j in range(6)))
                     for i in range(6)) / 6
    brute_t2i = -sum(math.log(math.exp(logits[j, j]) / sum(math.exp(logits[i, j]) for i in range(6)))
                     for j in range(6)) / 6
    assert info_nce(logits).item() == pytest.approx((brute_i2t + brute_t2i) / 2, rel=1e-5)
    assert info_nce(logits).item() != pytest.approx(brute_i2t, rel=1e-3)  # the symmetry matters


def test_clip_temperature_learns_and_logits_are_scaled_cosines():
    clip = CLIP(CLIPConfig(vocab_size=len(TOK), **CLIP_SIZES["tiny"]))
    x, ids = torch.randn(4, 1, 28, 28), TOK.batch(["a 7", "a thick 3", "an 8", "1, slanted left"])
    logits = clip(x, ids)
    assert logits.shape == (4, 4) and logits.abs().max() <= 1 / 0.07 + 1e-4
    info_nce(logits).backward()
    assert clip.log_scale.grad is not None and clip.log_scale.grad != 0


def test_clip_logits_are_exp_log_scale_times_cosines_of_the_encoders_outputs():
    """Eq. (1): S_ij = e^s cos(f(x_i), g(y_j)), with e^s = 1/0.07 at init and clamped at 100, checked against the
    raw encoder outputs (image head; text projection of the <eos> state) and F.cosine_similarity."""
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vocab_size=len(TOK), **CLIP_SIZES["tiny"])).eval()
    x, ids = torch.randn(4, 1, 28, 28), TOK.batch(["a 7", "a thick 3", "an 8", "1, slanted left"])
    with torch.no_grad():
        f = clip.image(x)  # (4, embed_dim), not normalized
        g = clip.text_proj(clip.text(ids)[1])
        cos = F.cosine_similarity(f[:, None], g[None], dim=-1)  # (4 images, 4 texts)
        assert cos.abs().max() > 0.05 and not torch.allclose(cos, cos.T, atol=1e-4)  # a non-trivial matrix
        assert torch.allclose(clip(x, ids), cos / 0.07, rtol=1e-5, atol=1e-5)  # the initial temperature
        for s, scale in ((math.log(3.0), 3.0), (-1.0, math.exp(-1.0)), (math.log(100), 100.0), (7.0, 100.0)):
            clip.log_scale.fill_(s)
            assert torch.allclose(clip(x, ids), scale * cos, rtol=1e-5, atol=1e-5), s


def test_zero_shot_logits_average_templates_per_class():
    clip = CLIP(CLIPConfig(vocab_size=len(TOK), **CLIP_SIZES["tiny"]))
    ids = TOK.batch(["a 0", "zero", "a 1", "one"])
    x = torch.randn(3, 1, 28, 28)
    z = clip.embed_text(ids).view(2, 2, -1).mean(1)
    want = clip.embed_image(x) @ F.normalize(z, dim=-1).T
    assert torch.allclose(zero_shot_logits(clip, x, ids, 2), want, atol=1e-6)


def test_padding_does_not_change_the_joint_attention():
    model = tiny().eval()
    ids = TOK.batch(["a thick 7", "an 8"])
    states, keep, pooled = model.condition(ids)
    z, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    out = model.dit(z, t, states, keep, pooled)
    junk = torch.where(keep[..., None], states, 100 * torch.randn_like(states))  # change every padded token
    assert torch.allclose(model.dit(z, t, junk, keep, pooled), out, atol=1e-5)
    longer = torch.cat([states, torch.randn(2, 5, states.shape[2])], 1)  # five more padding tokens
    keep_longer = torch.cat([keep, keep.new_zeros(2, 5)], 1)
    assert torch.allclose(model.dit(z, t, longer, keep_longer, pooled), out, atol=1e-5)
    junk_everywhere = 100 * torch.randn_like(states)  # not padding: the output must move
    assert not torch.allclose(model.dit(z, t, junk_everywhere, keep, pooled), out, atol=1e-3)


def test_text_encoder_ignores_padding():
    model = tiny().eval()
    ids = TOK.batch(["a thick 7"])  # 4 tokens, 12 pads
    s1, p1 = model.clip.text(ids[:, :6])
    s2, p2 = model.clip.text(ids)
    assert torch.allclose(p1, p2, atol=1e-5) and torch.allclose(s1[:, :4], s2[:, :4], atol=1e-5)


def test_cfg_scale_one_is_the_conditional_prediction():
    model = tiny().eval()
    cond = model.condition(TOK.batch(["a thick 7", "a small 2", "nine"]))
    null = model.condition(TOK.batch(["", "", ""]))
    z, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    v_cond, v_null = model.velocity(z, t, cond), model.velocity(z, t, null)
    guided = {w: guided_velocity(model.velocity, z, t, cond, null, w) for w in (0.0, 0.5, 1.0, 1.5, 3.0)}
    assert torch.allclose(guided[1.0], v_null + 1.0 * (v_cond - v_null), atol=1e-5)  # Eq. (8) written out at w = 1
    assert torch.allclose(guided[1.0], v_cond, atol=1e-5) and torch.allclose(guided[0.0], v_null)
    # w = 0.5 and 1.5 go through the batched Eq. (8) line; w = 1 (a shortcut) must be their midpoint
    assert torch.allclose(guided[1.0], (guided[0.5] + guided[1.5]) / 2, atol=1e-5)
    assert torch.allclose(guided[3.0], v_null + 3 * (v_cond - v_null), atol=1e-5)
    assert not torch.allclose(guided[3.0], v_cond, atol=1e-4) and not torch.allclose(v_cond, v_null, atol=1e-4)


def test_interpolation_ends_are_the_two_prompts():
    """w = 0 draws exactly what generate(A) draws from the same noise, w = 1 what generate(B) draws: each prompt is
    read with its own padding mask (A is shorter than B, so B's mask would show A's padding states)."""
    model = tiny().eval()
    noise = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)).expand(5, -1, -1, -1)
    a, b = "an 8", "a thick slanted seven, drawn small"
    for scale, interval in ((3.0, (0.0, 1.0)), (1.0, (0.0, 1.0)), (4.0, (0.5, 1.0))):
        walk = interpolate_prompts(model, TOK, a, b, noise, scale, steps=3, batch_size=8, interval=interval)
        ends = generate(model, TOK, [a, b], noise[:2], scale, 3, 8, interval)
        in_batches = interpolate_prompts(model, TOK, a, b, noise, scale, steps=3, batch_size=2, interval=interval)
        assert torch.allclose(in_batches, walk, atol=1e-5)  # batches of 2, 2, 1 walk the same w's
        assert torch.allclose(walk[0], ends[0], atol=1e-5) and torch.allclose(walk[-1], ends[1], atol=1e-5)
        assert not torch.allclose(ends[0], ends[1], atol=1e-3)
        steps_along = (walk[1:] - walk[:-1]).flatten(1).norm(dim=1)
        assert (steps_along > 0).all()  # the middle images differ from both ends and from each other


def test_mmdit_shapes_zero_init_and_named_sizes():
    model = MMDiT(MMDiTConfig(**MMDIT_SIZES["tiny"], text_width=32))
    z = torch.randn(2, 1, 28, 28)
    out = model(z, torch.rand(2), torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool), torch.randn(2, 32))
    assert out.shape == z.shape and out.abs().max() == 0  # adaLN-Zero and a zero final layer
    h_txt, h_img, c = torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.randn(2, 32)
    keep = torch.ones(2, 32, dtype=torch.bool)
    for block in model.blocks:  # every fresh block passes both streams through unchanged (zero gates)
        out_txt, out_img = block(h_txt, h_img, c, keep)
        assert torch.equal(out_txt, h_txt) and torch.equal(out_img, h_img)
    wide = MMDiT(MMDiTConfig(**MMDIT_SIZES["tiny"], text_width=32, width_px=56))
    assert wide.unpatchify(torch.randn(1, 7 * 14, 16)).shape == (1, 1, 28, 56)
    counts = {name: count_params(MMDiT(MMDiTConfig(**size))) for name, size in MMDIT_SIZES.items()}
    # fixed sin-cos patch positions: no parameters
    assert counts == {"tiny": 55_568, "S": 491_856, "M": 2_494_992, "B": 43_314_192}
    clip_counts = {name: count_params(CLIP(CLIPConfig(**size))) for name, size in CLIP_SIZES.items()}
    assert clip_counts == {"tiny": 32_433, "S": 173_473, "B": 4_204_545}


def test_last_block_text_update_gets_no_gradient():
    """Only the image tokens are read out, so the last block's text queries, proj, MLP and 4 of its 6 adaLN chunks
    never get a gradient: 58,064 of MMDiT S's 491,856 parameters (README, sections 4 and 7); every other block's
    text stream learns, through the image tokens' attention to its keys and values."""
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**MMDIT_SIZES["S"]))
    for p in model.parameters():  # leave the zero init, which would zero many gradients that are not dead
        p.data.add_(0.05 * torch.randn_like(p))
    out = model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.randn(2, 16, 64), torch.ones(2, 16, dtype=torch.bool),
                torch.randn(2, 64))
    out.square().sum().backward()
    dead = {name: p.numel() if p.grad is None else int((p.grad == 0).sum()) for name, p in model.named_parameters()}
    dead = {name: n for name, n in dead.items() if n}
    last = f"blocks.{len(model.blocks) - 1}.text."
    assert all(name.startswith(last) for name in dead), dead
    assert sum(n for name, n in dead.items() if name.split(".")[3] in ("proj", "mlp")) == 37_248  # no gradient at all
    assert dead[last + "ada.1.weight"] == 4 * 64 * 64 and dead[last + "qkv.weight"] == 64 * 64  # rows of live tensors
    assert sum(dead.values()) == 58_064


def test_unpatchify_inverts_patchify_layout():
    model = MMDiT(MMDiTConfig(**MMDIT_SIZES["tiny"], text_width=32))
    x = torch.randn(2, 1, 28, 28)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 1, 7, 7, 4, 4)
    tokens = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 49, 16)  # row-major patches, (p, p, C) inside
    assert torch.equal(model.unpatchify(tokens), x)


def test_logit_normal_t_quantiles():
    t = logit_normal_t(200_000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert (t < 0.5).float().mean().item() == pytest.approx(0.5, abs=0.005)
    assert (t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() == pytest.approx(0.8413, abs=0.005)
    shifted = logit_normal_t(200_000, m=1.0, s=0.5, generator=torch.Generator().manual_seed(1))
    assert shifted.logit().mean().item() == pytest.approx(1.0, abs=0.01)


def test_straight_path_and_exact_velocity_sampler():
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.rand(3)
    exact = lambda z, t, cond: eps - x0  # noqa: E731  the target velocity is constant along the straight path
    assert rectified_flow_loss(exact, x0, None, t, eps).item() == 0
    # a field that needs t: on the straight path (z_t - x0) / t is eps - x0 again, if the loss passes t itself
    assert rectified_flow_loss(lambda z, t, cond: (z - x0) / t.view(-1, 1, 1, 1), x0, None, t, eps).item() < 1e-10
    # the velocity toward a single data point x0: v(z, t) = (z - x0) / t; every Euler step stays on the straight
    # line from eps to x0 (the last step alone would land on x0 from anywhere, so the whole path is checked)
    toward = lambda z, t, cond: (z - cond[0]) / t.view(-1, 1, 1, 1)  # noqa: E731
    out, path = sample(toward, eps, (x0,), (x0,), 1.0, steps=7, return_path=True)
    assert len(path) == 8 and torch.allclose(out, x0, atol=1e-5)
    for i, z in enumerate(path):
        assert torch.allclose(z, interpolate(x0, eps, torch.full((3,), 1 - i / 7)), atol=1e-5), i


def test_guidance_interval_guides_only_the_steps_inside_it():
    model = tiny().eval()
    cond = model.condition(TOK.batch(["a thick 7", "a small 2"]))
    null = model.condition(TOK.batch(["", ""]))
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    full = sample(model.velocity, noise, cond, null, 4.0, steps=4)
    assert torch.allclose(sample(model.velocity, noise, cond, null, 4.0, steps=4, interval=(0.0, 1.0)), full)
    never = sample(model.velocity, noise, cond, null, 4.0, steps=4, interval=(2.0, 3.0))
    assert torch.allclose(never, sample(model.velocity, noise, cond, null, 1.0, steps=4), atol=1e-5)
    z = noise  # guided at the steps starting at t = 1 and 0.75, plain conditional at t = 0.5 and 0.25
    for t, w in ((1.0, 4.0), (0.75, 4.0), (0.5, 1.0), (0.25, 1.0)):
        z = z - 0.25 * guided_velocity(model.velocity, z, torch.full((2,), t), cond, null, w)
    early = sample(model.velocity, noise, cond, null, 4.0, steps=4, interval=(0.6, 1.0))
    assert torch.allclose(early, z, atol=1e-5)
    assert not torch.allclose(early, full, atol=1e-4) and not torch.allclose(early, never, atol=1e-4)


def test_generate_gives_each_batch_its_own_noise():
    """In batches, image i is drawn from noise[i]: batches of 2 give what one batch of 5 gives, and one prompt
    five times gives five different images."""
    model = tiny().eval()
    noise = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prompts = ["a thick 7"] * 5
    whole = generate(model, TOK, prompts, noise, 3.0, 2, batch_size=5)
    assert torch.allclose(generate(model, TOK, prompts, noise, 3.0, 2, batch_size=2), whole, atol=1e-5)
    flat = whole.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j], atol=1e-3) for i in range(5) for j in range(i))


def test_stream_normalises_queries_and_keys_in_float32_under_bf16_autocast(monkeypatch):
    """A stream's qkv runs in bf16 under --amp; its QK-norm must hand torch's RMSNorm float32 input to match the
    float32 gain (a mixed pair is refused by the fused kernel, with a one-time warning) and return bf16."""
    stream = Stream(16, heads=2, mlp_ratio=2)
    torch.nn.init.normal_(stream.k_norm.weight)
    torch.nn.init.normal_(stream.ada[1].weight)  # past the zero init, so the modulation is not the identity
    seen, outputs = [], []

    def recording_rms_norm(x, shape, weight, eps):
        seen.append((x.dtype, weight.dtype))
        outputs.append(torch_rms_norm(x, shape, weight, eps))
        return outputs[-1]

    torch_rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", recording_rms_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v, _ = stream.pre_attention(torch.randn(3, 7, 16), torch.randn(3, 16))  # h (B, L, D), c (B, D)
    assert seen == [(torch.float32, torch.float32)] * 2
    assert (q.dtype, k.dtype, v.dtype) == (torch.bfloat16,) * 3
    assert torch.equal(q, outputs[0].bfloat16()) and torch.equal(k, outputs[1].bfloat16())
