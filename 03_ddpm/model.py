"""The noise-prediction network eps_theta(x_t, t) of DDPM (Ho et al. 2020, §4 and Appendix B), sized for 28x28.

A U-Net in the PixelCNN++/Wide-ResNet style the paper uses: residual blocks with GroupNorm, the timestep
fed to every block through a sinusoidal embedding (the Transformer's), self-attention at the low
resolutions, dropout inside the blocks. 28 -> 14 -> 7 instead of the paper's 32 -> 16 -> 8 -> 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    """The defaults are the "small" size of ``SIZES``, the one the default preset trains."""

    in_channels: int = 1
    image_size: int = 28
    ch: int = 16  # channels at full resolution
    ch_mult: tuple[int, ...] = (1, 2, 4)  # per resolution: 28, 14, 7
    num_res_blocks: int = 1  # residual blocks per resolution on the way down (one more on the way up)
    attn_resolutions: tuple[int, ...] = (7,)  # self-attention after the blocks at these sizes
    num_heads: int = 1
    dropout: float = 0.1
    groups: int = 4  # GroupNorm groups


# Named sizes. "small" is the CPU default; "base" is the GPU preset (the paper's CIFAR-10 net, 35.7M
# parameters, is ch=128, ch_mult=(1,2,2,2), 2 blocks, attention at 16x16).
SIZES = {
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), groups=4),  # tests
    "small": dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(7,), groups=4),
    "base": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14, 7), num_heads=4, groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the time embedding, GroupNorm -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # The residual branch starts at zero (as in the official code), so each block starts as its skip path:
        # the identity when c_in == c_out, a 1x1 projection otherwise.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):  # x (B, c_in, H, W), temb (B, t_dim)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, c: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hs)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, 1, 28, 28) noisy images and (B,) integer timesteps -> (B, 1, 28, 28) noise."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, t_dim, g, p = cfg.ch, 4 * cfg.ch, cfg.groups, cfg.dropout
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # ---- down: blocks at each resolution, then a stride-2 conv (28 -> 14 -> 7) -------------------------
        self.down = nn.ModuleList()
        skips, c, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._block(c, ch * mult, res))
                c = ch * mult
                skips.append(c)
            if level < len(cfg.ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2

        # ---- middle: block, attention, block at the lowest resolution ---------------------------------------
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, p, g), SelfAttention(c, cfg.num_heads, g),
                                  ResBlock(c, c, t_dim, p, g)])

        # ---- up: one more block per resolution, each eating one skip, then nearest upsampling + conv ------
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(self._block(c + skips.pop(), ch * mult, res))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # eps_theta = 0 at init
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, c_in: int, c_out: int, res: int) -> nn.Module:
        cfg = self.cfg
        block = ResBlock(c_in, c_out, 4 * cfg.ch, cfg.dropout, cfg.groups)
        if res in cfg.attn_resolutions:
            return nn.ModuleList([block, SelfAttention(c_out, cfg.num_heads, cfg.groups)])
        return nn.ModuleList([block])

    def forward(self, x, t):  # x (B, 1, 28, 28), t (B,) in 1..T
        temb = self.time_mlp(timestep_embedding(t, self.cfg.ch))  # (B, 4ch)
        h = self.conv_in(x)  # (B, ch, 28, 28)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):  # [ResBlock, (SelfAttention)]
                h = layer[0](h, temb)
                for attn in layer[1:]:
                    h = attn(h)
            else:  # downsampling conv: (B, C, H, W) -> (B, C, H/2, W/2)
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)  # (B, C, 7, 7); (B, C, 14, 14) for tiny
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, hs.pop()], dim=1), temb)
                for attn in layer[1:]:
                    h = attn(h)
            else:  # upsampling: (B, C, H, W) -> (B, C, 2H, 2W)
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 1, 28, 28)


def build_unet(size: str = "small", dropout: float | None = None) -> UNet:
    """A U-Net of one of the named ``SIZES``, optionally with another dropout rate."""
    extra = {} if dropout is None else {"dropout": dropout}
    return UNet(UNetConfig(**SIZES[size], **extra))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
