import math

import pytest
import torch
import torch.nn.functional as F
from model import (
    SIZES,
    Attention,
    DiT,
    DiTBlock,
    DiTConfig,
    SwiGLU,
    apply_rope,
    count_params,
    dit_config,
    drop_labels,
    explicit_attention,
    forward_gflops,
    modulate,
    patchify,
    rope_2d_angles,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Leave the zero init behind, so that conditioning actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("p", [2, 4])
def test_patchify_unpatchify_identity_and_layout(p):
    x = torch.randn(3, 2, 28, 28)
    tokens = patchify(x, p)
    assert tokens.shape == (3, (28 // p) ** 2, p * p * 2)
    assert torch.equal(unpatchify(tokens, p, 2), x)
    # token 1 is the patch right of the top-left one, its values ordered (row, col, channel)
    assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].permute(0, 2, 3, 1).reshape(3, -1))


def test_sincos_table_is_2d_and_distinct():
    table = sincos_pos_embed_2d(64, 7)
    assert table.shape == (49, 64)
    assert torch.unique(table, dim=0).shape[0] == 49  # every position has its own code
    # the first half depends on the row only: positions 0 and 1 share a row
    assert torch.allclose(table[0, :32], table[1, :32]) and not torch.allclose(table[0, 32:], table[1, 32:])


def test_adaln_zero_blocks_are_identity_at_init():
    cfg = DiTConfig(hidden_size=64, depth=2, num_heads=4)
    x, c = torch.randn(2, 49, 64), torch.randn(2, 64)
    model = DiT(cfg)
    for b in model.blocks:  # every block of a fresh model passes its input through unchanged
        assert torch.equal(b(x, c), x)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([10.0, 500.0]), torch.tensor([3, 10]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer


@pytest.mark.parametrize("swiglu", [False, True])
def test_dit_block_is_eq_a2_written_out(swiglu):
    """Eq. (A2) with six distinct modulation vectors: which chunk is shift, scale or gate, and which pair goes to
    which sublayer (the zero-init test cannot tell, as every gate is 0 there)."""
    cfg = DiTConfig(hidden_size=8, depth=1, num_heads=2, swiglu=swiglu)
    block = randomize(DiTBlock(cfg))
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.zero_()  # the modulation is then its bias, the same for every c
    beta1, gamma1, alpha1, beta2, gamma2, alpha2 = block.adaLN_modulation[-1].bias.detach().view(6, 1, 1, 8)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    x1 = x + alpha1 * block.attn(block.norm1(x) * (1 + gamma1) + beta1)
    x2 = x1 + alpha2 * block.mlp(block.norm2(x1) * (1 + gamma2) + beta2)
    assert torch.allclose(block(x, c), x2, atol=1e-6)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])


def test_swiglu_is_w2_of_silu_a_times_b_at_two_thirds_width():
    torch.manual_seed(0)
    m = SwiGLU(8, 12)
    assert m.w2.in_features == 8 and m.w13.out_features == 2 * 8  # hidden int(2/3 * 12) = 8
    x = torch.randn(2, 3, 8)
    a, b = m.w13(x).chunk(2, dim=-1)
    assert torch.allclose(m(x), m.w2(F.silu(a) * b), atol=1e-6)
    assert not torch.allclose(m(x), m.w2(F.silu(a * b)), atol=1e-3)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 49, 16).unbind(0)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v), explicit_attention(q, k, v), atol=1e-5)
    attn = Attention(64, 4)
    x = torch.randn(2, 49, 64)
    q, k, v = attn.qkv_heads(x)
    by_hand = attn.proj(explicit_attention(q, k, v).transpose(1, 2).reshape(2, 49, 64))
    assert torch.allclose(attn(x), by_hand, atol=1e-5)


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    t = torch.tensor([0.0, 0.37, 999.0])  # float times: flow time t in [0, 1] reaches the network as 1000 t
    angle = t[:, None] * 10000 ** (-torch.arange(8.0) / 8)[None]  # w_i = 10000^(-i/8)
    assert torch.allclose(timestep_embedding(t, 16), torch.cat([angle.cos(), angle.sin()], dim=1), atol=1e-4)


def test_rope_scores_depend_only_on_relative_offset():
    grid, hd = 5, 16
    angles = rope_2d_angles(hd, grid)
    torch.manual_seed(0)
    q = torch.randn(hd).expand(1, 1, grid * grid, hd)  # the same query and key at every position
    k = torch.randn(hd).expand(1, 1, grid * grid, hd)
    scores = (apply_rope(q, angles) @ apply_rope(k, angles).transpose(-2, -1))[0, 0]  # (T, T)
    by_offset = {}
    for i in range(grid * grid):
        for j in range(grid * grid):
            offset = (i // grid - j // grid, i % grid - j % grid)
            by_offset.setdefault(offset, []).append(scores[i, j])
    for values in by_offset.values():
        assert torch.allclose(torch.stack(values), values[0], atol=1e-4)
    assert len({round(float(v[0]), 3) for v in by_offset.values()}) > 20  # and it does depend on the offset
    # two axes, not one over the flattened patch index: the next patch in a row and the first patch of the next
    # row are one apart in reading order but not on the grid
    assert not torch.allclose(by_offset[(0, 1)][0], by_offset[(1, 1 - grid)][0], atol=1e-3)
    by_cell = angles.view(grid, grid, hd // 2)
    assert torch.equal(by_cell[:, :1, :hd // 4].expand(grid, grid, hd // 4), by_cell[..., :hd // 4])  # rows
    assert torch.equal(by_cell[:1, :, hd // 4:].expand(grid, grid, hd // 4), by_cell[..., hd // 4:])  # columns
    # rotation keeps norms
    assert torch.allclose(apply_rope(q, angles).norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_rope_frequencies_are_base_100_per_axis():
    """The README's argument is about the frequencies: an axis of a head of width hd gets hd/4 of them,
    100^(-i/(hd/4)); the cell one row down turns the row half by them, one column right the column half."""
    hd, grid = 16, 7
    angles = rope_2d_angles(hd, grid).view(grid, grid, hd // 2)
    freqs = 100.0 ** (-torch.arange(4.0) / 4)
    assert torch.allclose(angles[1, 0], torch.cat([freqs, torch.zeros(4)]))
    assert torch.allclose(angles[0, 1], torch.cat([torch.zeros(4), freqs]))
    assert torch.allclose(angles[3, 5], torch.cat([3 * freqs, 5 * freqs]))


def test_attention_rotates_both_queries_and_keys():
    """Inside Attention: the same token at every position gives attention weights that depend only on the grid
    offset (rotating q alone would make them depend on where the query is)."""
    grid = 4
    attn = randomize(Attention(16, 2), seed=1)
    x = torch.randn(16).expand(1, grid * grid, 16)
    weights = attn.attention_map(x, rope_2d_angles(8, grid))[0, 0].detach()  # (T, T)
    logits = weights.log()  # a row's scores up to that row's constant, which s_ij - s_ii cancels
    by_offset = {}
    for i in range(grid * grid):
        for j in range(grid * grid):
            by_offset.setdefault((i // grid - j // grid, i % grid - j % grid), []).append(logits[i, j] - logits[i, i])
    for values in by_offset.values():
        assert torch.allclose(torch.stack(values), values[0], atol=1e-4)
    # and they do depend on the offset (with only q rotated, every key of a row would score the same)
    assert len({round(float(v[0]), 3) for v in by_offset.values()}) > 10


def test_label_dropout_is_per_sample():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (2000,))
    dropped = drop_labels(y, 0.1, 10)
    frac = (dropped == 10).float().mean().item()
    assert 0.07 < frac < 0.13  # p = 0.1 per sample, not all-or-none per batch
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    # inside the model: dropped only while training
    model = randomize(DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, class_dropout=0.5)))
    x, t, y = torch.randn(64, 1, 28, 28), torch.full((64,), 100.0), torch.randint(0, 10, (64,))
    model.eval()
    assert torch.equal(model(x, t, y), model(x, t, y))
    model.train()
    torch.manual_seed(1)
    changed = (model(x, t, y) - model.eval()(x, t, y)).flatten(1).abs().amax(1) > 0  # (64,)
    assert 10 < changed.sum() < 54


def expected_params(cfg: DiTConfig) -> int:
    """The parameter count written out layer by layer (GELU MLP, LayerNorm without affine)."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    hidden = int(d * cfg.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden + hidden * d + d) + (d * 6 * d + 6 * d)
    embed = (p * p * c * d + d) + (256 * d + d + d * d + d) + (cfg.num_classes + 1) * d
    final = (d * 2 * d + 2 * d) + (d * p * p * c + p * p * c)
    return embed + cfg.depth * block + final


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes_parameter_counts(size):
    cfg = dit_config(size)
    assert count_params(DiT(cfg)) == expected_params(cfg)
    counts = {s: count_params(DiT(dit_config(s))) for s in ("tiny", "small")}
    assert counts == {"tiny": 1_275_408, "small": 9_742_352}


def test_lightning_switches_build_and_run():
    cfg = dit_config("micro", swiglu=True, rmsnorm=True, rope=True, qk_norm=True)
    model = randomize(DiT(cfg))
    assert isinstance(model.blocks[0].norm1, torch.nn.RMSNorm)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 900.0]), torch.tensor([0, 9]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
    plain = count_params(DiT(dit_config("micro")))
    assert abs(count_params(DiT(cfg)) - plain) / plain < 0.02  # SwiGLU's 2/3 width keeps the size


def test_gflops_scale_with_tokens():
    g4 = forward_gflops(DiT(dit_config("tiny", patch_size=4)))
    g2 = forward_gflops(DiT(dit_config("tiny", patch_size=2)))
    cfg = dit_config("tiny")
    d = cfg.hidden_size
    block_macs = 49 * (12 * d * d) + 2 * 49 * 49 * d  # linears + QK^T and AV per image
    assert math.isclose(g4, 2 * cfg.depth * block_macs / 1e9, rel_tol=0.1)
    assert 3.5 < g2 / g4 < 4.5  # 4x the tokens: ~4x the flops


def test_attention_qk_norm_runs_in_float32_under_bf16_autocast(monkeypatch):
    """With --amp the qkv projection hands QKNorm bf16 queries and keys while its gain is float32; the fused RMSNorm
    kernel wants one dtype (on a bf16 input torch warns once and falls back), so QKNorm normalises in float32 and
    gives SDPA bf16 back."""
    attn = Attention(16, num_heads=2, qk_norm=True)
    torch.nn.init.normal_(attn.q_norm.weight)
    calls = []

    def recording_rms_norm(x, shape, weight, eps):
        calls.append(((x.dtype, weight.dtype, eps), fused(x, shape, weight, eps)))
        return calls[-1][1]

    fused = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", recording_rms_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.qkv_heads(torch.randn(2, 5, 16))  # (B, nh, T, hd) each
    assert [dtypes for dtypes, _ in calls] == [(torch.float32, torch.float32, 1e-6)] * 2  # q, then k
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(q, calls[0][1].bfloat16()) and torch.equal(k, calls[1][1].bfloat16())
