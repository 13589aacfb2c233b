"""A mini-CLIP (text transformer + conv image encoder) and an MMDiT (two-stream joint-attention transformer).

CLIP (Radford et al. 2021) learns a shared embedding of captions and images with the symmetric InfoNCE loss;
its frozen text transformer then reads prompts for the generator. The MMDiT (Esser et al. 2024, SD3) keeps
separate weights for text tokens and image patches and lets both attend to each other in one attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Configurations and named sizes
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CLIPConfig:
    vocab_size: int = 55
    max_len: int = 16
    width: int = 64          # text transformer width (also the width of the token states the MMDiT reads)
    depth: int = 2
    heads: int = 4
    embed_dim: int = 64      # shared text/image embedding
    conv_width: int = 16     # image encoder: conv_width, 2x, 4x channels


@dataclass
class MMDiTConfig:
    height: int = 28
    width_px: int = 28       # 56 for the two-digit canvas
    channels: int = 1
    patch: int = 4
    width: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 4
    text_width: int = 64     # = CLIPConfig.width
    text_len: int = 16       # = CLIPConfig.max_len
    text_pos: str = "none"   # positions on the text tokens: none | learned | sincos (the two-digit canvas needs them)
    image_pos: str = "sincos"  # positions on the image patches: sincos | learned


CLIP_SIZES = {"tiny": dict(width=32, depth=1, heads=2, embed_dim=32, conv_width=8),
              "S": dict(width=64, depth=2, heads=4, embed_dim=64, conv_width=16),
              "B": dict(width=256, depth=4, heads=8, embed_dim=128, conv_width=64)}
MMDIT_SIZES = {"tiny": dict(width=32, depth=1, heads=2),
               "S": dict(width=64, depth=3, heads=4),
               "M": dict(width=128, depth=4, heads=4),  # 04_dit's DiT-tiny width and depth, for longer CPU runs
               "B": dict(width=384, depth=8, heads=6)}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# Mini-CLIP
# ---------------------------------------------------------------------------------------------------------

class TextBlock(nn.Module):
    """Pre-LN transformer block; padded keys are masked out of attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, nh, L, hs)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return h + self.mlp(self.ln2(h))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> token states (B, L, width) and the pooled state at ``<eos>`` (B, width)."""

    def __init__(self, cfg: CLIPConfig, eos_id: int = 2, pad_id: int = 0):
        super().__init__()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, cfg.max_len, cfg.width))
        self.blocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ids != self.pad_id  # (B, L)
        h = self.tok_emb(ids) + self.pos_emb[:, : ids.shape[1]]  # (B, L, width)
        for block in self.blocks:
            h = block(h, keep)
        h = self.ln_f(h)
        eos = (ids == self.eos_id).int().argmax(1)  # (B,) first <eos>
        return h, h[torch.arange(len(ids), device=ids.device), eos]  # index on the device: no host copy


class ImageEncoder(nn.Module):
    """(B, 1, H, W) in [-1, 1] -> (B, embed_dim): four 3x3 convs (the middle two strided), global average pool,
    a linear map."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        c = cfg.conv_width
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, 1, 1), nn.GroupNorm(8, c), nn.GELU(),              # (B, c, 28, 28)
            nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GroupNorm(8, 2 * c), nn.GELU(),      # (B, 2c, 14, 14)
            nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.GroupNorm(8, 4 * c), nn.GELU(),  # (B, 4c, 7, 7)
            nn.Conv2d(4 * c, 4 * c, 3, 1, 1), nn.GroupNorm(8, 4 * c), nn.GELU(),
        )
        self.head = nn.Linear(4 * c, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg)
        self.image = ImageEncoder(cfg)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learnable temperature, 1/tau = e^s

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids)[1]), dim=-1)  # (B, embed_dim), unit length

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Eq. (1): image-text similarity matrix S_ij = <f(x_i), g(y_j)> / tau, shape (B_img, B_txt)."""
        scale = self.log_scale.clamp(max=math.log(100)).exp()
        return scale * self.embed_image(x) @ self.embed_text(ids).T  # Eq. (1)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Eq. (2): symmetric InfoNCE, the mean of the image->text and text->image cross-entropies with the
    matching pairs on the diagonal."""
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))  # Eq. (2)


@torch.no_grad()
def zero_shot_logits(clip: CLIP, x: torch.Tensor, prompt_ids: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Eq. (3): class scores from prompts: ``prompt_ids`` holds n_templates prompts per class (class-major);
    each class embedding is the normalized mean of its prompts' embeddings. Returns (B, n_classes)."""
    z = clip.embed_text(prompt_ids).view(-1, n_templates, clip.cfg.embed_dim)
    classes = F.normalize(z.mean(1), dim=-1)  # (n_classes, embed_dim)
    return clip.embed_image(x) @ classes.T  # Eq. (3)


# ---------------------------------------------------------------------------------------------------------
# MMDiT
# ---------------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as for integer diffusion steps): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    """Eq. (12): fixed positions 0..n-1 as sinusoids (Vaswani et al. 2017): (n, dim), each row of norm
    sqrt(dim / 2), about the norm of the token states they are added to, so position is heard from the first step."""
    return timestep_embedding(torch.arange(n) / 1000, dim)  # Eq. (12); n goes in as n/1000, as it scales by 1000


def sincos_positions_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Eq. (12), 2-D: half the channels encode the row, half the column: (1, rows * cols, dim)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([timestep_embedding(r.flatten() / 1000, dim // 2),
                      timestep_embedding(c.flatten() / 1000, dim // 2)], dim=-1)[None]  # Eq. (12): [P(r), P(c)]


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's modulation h * (1 + scale) + shift of an already normalised h (the callers apply the LayerNorm),
    with (B, D) shift/scale broadcast over tokens."""
    return h * (1 + scale[:, None]) + shift[:, None]


class QKNorm(nn.RMSNorm):
    """SD3's QK-norm on one stream: each head's queries or keys RMS-normalised with a learned gain, which bounds the
    joint attention's logits. It runs in float32: under bf16 autocast the stream's qkv is bf16 and the gain
    float32, which torch's fused kernel refuses with a warning, falling back to separate ops."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Stream(nn.Module):
    """One modality's weights inside an MMDiT block: adaLN-Zero modulation, qkv with QK-norm, out, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.ln1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ln2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = QKNorm(width // heads)  # bounded attention logits
        self.k_norm = QKNorm(width // heads)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def pre_attention(self, h: torch.Tensor, c: torch.Tensor):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (B, D)
        B, L, D = h.shape
        q, k, v = self.qkv(modulate(self.ln1(h), shift1, scale1)).view(B, L, 3, self.heads, D // self.heads) \
            .permute(2, 0, 3, 1, 4)  # each (B, nh, L, hs)
        return self.q_norm(q), self.k_norm(k), v, (gate1, shift2, scale2, gate2)

    def post_attention(self, h: torch.Tensor, a: torch.Tensor, mods) -> torch.Tensor:
        gate1, shift2, scale2, gate2 = mods
        h = h + gate1[:, None] * self.proj(a)
        return h + gate2[:, None] * self.mlp(modulate(self.ln2(h), shift2, scale2))


class MMDiTBlock(nn.Module):
    """Eq. (7): text and image tokens each through their own weights, one attention over the concatenation."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.text, self.image = Stream(width, heads, mlp_ratio), Stream(width, heads, mlp_ratio)

    def forward(self, h_txt, h_img, c, keep):
        """h_txt (B, Lt, D), h_img (B, N, D), c (B, D), keep (B, Lt + N) bool (False: a padding key)."""
        qt, kt, vt, mods_t = self.text.pre_attention(h_txt, c)
        qi, ki, vi, mods_i = self.image.pre_attention(h_img, c)
        q, k, v = torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)  # (B, nh, Lt+N, hs)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # Eq. (7)
        a = a.transpose(1, 2).flatten(2)  # (B, Lt+N, D)
        Lt = h_txt.shape[1]
        return (self.text.post_attention(h_txt, a[:, :Lt], mods_t),
                self.image.post_attention(h_img, a[:, Lt:], mods_i))


class MMDiT(nn.Module):
    """v_theta(z_t, t, text): the velocity field of rectified flow, conditioned on CLIP token states."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch
        self.grid = (cfg.height // p, cfg.width_px // p)
        n_patches = self.grid[0] * self.grid[1]
        self.patchify = nn.Conv2d(cfg.channels, D, p, p)  # (B, C, H, W) -> (B, D, H/p, W/p)
        if cfg.image_pos == "sincos":
            self.register_buffer("pos_emb", sincos_positions_2d(*self.grid, D), persistent=False)
        else:
            self.pos_emb = nn.Parameter(0.02 * torch.randn(1, n_patches, D))
        self.text_in = nn.Linear(cfg.text_width, D)
        if cfg.text_pos == "sincos":
            self.register_buffer("text_pos", sincos_positions(cfg.text_len, D)[None], persistent=False)
        elif cfg.text_pos == "learned":
            self.text_pos = nn.Parameter(0.02 * torch.randn(1, cfg.text_len, D))
        else:
            self.text_pos = None
        self.t_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_mlp = nn.Sequential(nn.Linear(cfg.text_width, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(MMDiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_ln = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(D, p * p * cfg.channels)
        for layer in (self.final_ada[1], self.final):  # the network starts by predicting v = 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, states: torch.Tensor, keep_text: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """z (B, C, H, W), t (B,), states (B, Lt, text_width), keep_text (B, Lt) bool, pooled (B, text_width)."""
        B = z.shape[0]
        h_img = self.patchify(z).flatten(2).transpose(1, 2) + self.pos_emb  # Eq. (12) when sin-cos; (B, N, D)
        h_txt = self.text_in(states)  # (B, Lt, D)
        if self.text_pos is not None:  # which word came first: our mini-CLIP's states hardly say (README)
            h_txt = h_txt + self.text_pos[:, : h_txt.shape[1]]  # Eq. (12) when sin-cos
        c = self.t_mlp(timestep_embedding(t, 256)) + self.y_mlp(pooled)  # adaLN input: timestep + pooled text
        keep = torch.cat([keep_text, keep_text.new_ones(B, h_img.shape[1])], dim=1)  # (B, Lt + N)
        for block in self.blocks:
            h_txt, h_img = block(h_txt, h_img, c, keep)
        # Only h_img is read out: the last block's text update (its text queries, proj, MLP, and 4 of its 6 adaLN
        # chunks) feeds nothing and gets no gradient; SD3 leaves that part out. README, sections 4 and 7.
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_ln(h_img), shift, scale))  # (B, N, p*p*C)
        return self.unpatchify(out)

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        p, (gh, gw), C = self.cfg.patch, self.grid, self.cfg.channels
        out = out.view(-1, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return out.reshape(-1, C, gh * p, gw * p)


class TextToImage(nn.Module):
    """The frozen mini-CLIP's text side feeding the MMDiT: everything a checkpoint must hold to sample."""

    def __init__(self, clip_cfg: CLIPConfig, dit_cfg: MMDiTConfig):
        super().__init__()
        self.clip = CLIP(clip_cfg)
        self.dit = MMDiT(dit_cfg)

    @torch.no_grad()
    def condition(self, ids: torch.Tensor):
        """Prompt ids (B, L) -> (token states, keep mask, pooled state): the MMDiT's text input."""
        states, pooled = self.clip.text(ids)
        return states, ids != self.clip.text.pad_id, pooled

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        states, keep, pooled = cond
        return self.dit(z, t, states, keep, pooled)
