"""DiT (Peebles & Xie 2022, "Scalable Diffusion Models with Transformers") sized for 28x28 MNIST, with the
LightningDiT switches (Yao et al. 2025): SwiGLU, RMSNorm, 2-D RoPE and QK-norm, each a config flag.

The network maps (noisy image x_t, time t, class y) -> a prediction with x_t's shape: the noise eps
(DDPM objective) or the velocity v (rectified flow); what it means is decided in diffusion.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4  # 28/4 = 7x7 = 49 tokens; patch 2 gives 14x14 = 196 tokens
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10  # label num_classes is the null class used for classifier-free guidance
    class_dropout: float = 0.1  # p of replacing a label by the null class, per sample, while training
    swiglu: bool = False  # LightningDiT: SwiGLU feed-forward instead of GELU MLP
    rmsnorm: bool = False  # LightningDiT: RMSNorm instead of LayerNorm
    rope: bool = False  # LightningDiT: 2-D rotary position embedding in attention (on top of the sin-cos table)
    qk_norm: bool = False  # LightningDiT: RMS-normalise queries and keys per head

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# Named sizes scaled to MNIST (DiT-S/B/L/XL are 384..1152 wide and 12..28 deep); counts in the README.
SIZES = {
    "micro": dict(hidden_size=64, depth=2, num_heads=2),  # for smoke tests only
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),
    "small": dict(hidden_size=256, depth=8, num_heads=8),
}


def dit_config(size: str, **overrides) -> DiTConfig:
    return DiTConfig(**{**SIZES[size], **overrides})


# --------------------------------------------------------------------------------------------------------
# Patches and positions
# --------------------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C): non-overlapping p x p patches in raster order, T = (H/p)(W/p)."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, T, p*p*C) -> (B, C, H, W), the inverse of :func:`patchify` for a square grid."""
    B, T, _ = x.shape
    h = w = int(math.isqrt(T))
    x = x.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-2i/dim) (Transformer)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D table: half the channels encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float times -> (B, dim) sinusoidal features (then an MLP, as in DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=1)


# --------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding (LightningDiT; Su et al. 2021 extended to two axes)
# --------------------------------------------------------------------------------------------------------

def rope_2d_angles(head_dim: int, grid: int, base: float = 100.0) -> torch.Tensor:
    """(T, head_dim/2) rotation angles: the first half of the pairs turn with the row, the rest with the column.

    base 100, not LightningDiT's 10000: an axis here has only 7 patches (14 at patch size 2). With head width 32 an
    axis gets 8 frequencies base^(-i/8); at 10000, five of them turn by under 0.2 rad across the whole 7-patch
    grid, so those channels barely see position; at 100, two do, and the slowest still turns 0.11 rad."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, nh, T, hd) by angles (T, hd/2): R(a_i) q . R(a_j) k
    = q . R(a_j - a_i) k, so attention scores see only the offset between two positions."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, nh, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hd/2, 2)
    return out.flatten(-2).type_as(x)  # Eq. (A3): scores of rotated q, k see only a_j - a_i


# --------------------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------------------

def make_norm(dim: int, rms: bool, affine: bool = False) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=affine) if rms else \
        nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


class QKNorm(nn.RMSNorm):
    """LightningDiT's QK-norm: RMSNorm with a learned gain over each head's queries or keys, in float32. With --amp
    the qkv projection returns bf16 while the gain stays float32, a mix torch's fused RMSNorm kernel refuses (it
    warns and falls back to separate ops), so the input is upcast and the result cast back for SDPA."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out; the lesson's Eq. (A1). Attention.forward uses the fused SDPA."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    return scores.softmax(dim=-1) @ v  # Eq. (A1); (B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()

    def qkv_heads(self, x: torch.Tensor, rope: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_heads(x, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd), = explicit_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))

    def attention_map(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nh, T, T) softmax weights, for pictures."""
        q, k, _ = self.qkv_heads(x, rope)
        return (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """W2 (SiLU(W1 x) * W3 x) (Shazeer 2020); hidden = 2/3 of the MLP's so the parameter count matches."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w13 = nn.Linear(dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, C) normalised, then scaled and shifted per sample by (B, C) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c regresses (shift, scale, gate) for attention and MLP; the
    regression is zero-initialised, so every gate is 0 and the block is the identity at initialisation."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1, self.norm2 = make_norm(d, cfg.rmsnorm), make_norm(d, cfg.rmsnorm)
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        self.mlp = (SwiGLU if cfg.swiglu else Mlp)(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        # (beta_1, gamma_1, alpha_1, beta_2, gamma_2, alpha_2) of Eq. (A2), each (B, C)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)  # Eq. (A2)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # Eq. (A2)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear map from each token to its p*p*C patch values."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm = make_norm(d, cfg.rmsnorm)
        self.linear = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def drop_labels(y: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label independently by the null class with probability p (classifier-free guidance)."""
    drop = torch.rand(y.shape, device=y.device) < p  # (B,) one coin per sample
    return torch.where(drop, torch.full_like(y, null_class), y)


# --------------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        assert cfg.image_size % p == 0 and d % cfg.num_heads == 0 and (d // cfg.num_heads) % 4 == 0
        self.x_embedder = nn.Linear(p * p * C, d)  # = a stride-p conv on the image
        self.t_embedder = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)  # +1: the null class
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, cfg.grid)[None], persistent=False)  # (1, T, d)
        if cfg.rope:
            self.register_buffer("rope", rope_2d_angles(d // cfg.num_heads, cfg.grid), persistent=False)
        else:
            self.rope = None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, and zero for every adaLN regression and the
        output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x, t, y):
        """Tokens (B, T, d) and the conditioning vector c = emb(t) + emb(y) (B, d)."""
        tokens = self.x_embedder(patchify(x, self.cfg.patch_size)) + self.pos_embed  # (B, T, d)
        if self.training and self.cfg.class_dropout > 0:
            y = drop_labels(y, self.cfg.class_dropout, self.cfg.num_classes)
        c = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)  # (B, d)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) float time in [0, 1000], y (B,) labels (num_classes = null) -> (B, C, H, W)."""
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c, self.rope)
        out = self.final_layer(h, c)  # (B, T, p*p*C)
        return unpatchify(out, self.cfg.patch_size, self.cfg.in_channels)

    @torch.no_grad()
    def attention_maps(self, x, t, y, block: int) -> torch.Tensor:
        """(B, nh, T, T) attention weights of one block, for the lesson's pictures."""
        h, c = self.embed(x, t, y)
        for b in self.blocks[:block]:
            h = b(h, c, self.rope)
        b = self.blocks[block]
        shift, scale = b.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return b.attn.attention_map(modulate(b.norm1(h), shift, scale), self.rope)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: DiT, batch: int = 1) -> float:
    """Gflops (2 x multiply-adds) of one forward pass on `batch` images, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    x = torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(x, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))
    model.train(was_training)
    return counter.get_total_flops() / 1e9 / batch
