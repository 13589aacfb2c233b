"""The two players of a GAN: the paper's MLP generator and maxout discriminator (Goodfellow et al. 2014, §5),
and the convolutional pair of DCGAN (Radford et al. 2015, §3-4), each at a few named sizes.

Every discriminator returns the *logit* a of D(x) = sigmoid(a); the losses in gan.py take logits so that
log D and log(1 - D) stay finite when D is confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

IMAGE_SHAPE = (1, 28, 28)
IMAGE_DIM = math.prod(IMAGE_SHAPE)  # 784


@dataclass
class GANConfig:
    arch: str = "mlp"          # mlp (the paper) | dcgan (Radford et al.): both players, or G alone with d_arch
    d_arch: str = "same"       # D's architecture when it is not arch's: mlp | dcgan (a mixed pair)
    z_dim: int = 100           # dimension of the noise z ~ p_z
    noise: str = "gaussian"    # p_z: gaussian N(0, I) | uniform U(-sqrt 3, sqrt 3)^d (both unit variance)
    g_hidden: int = 1200       # mlp: width of the generator's two ReLU layers
    d_units: int = 240         # mlp: maxout units per discriminator layer
    d_pieces: int = 5          # mlp: linear pieces per maxout unit
    d_keep_in: float = 0.8     # mlp: dropout keep-probability on the discriminator's input
    d_keep: float = 0.5        # mlp: keep-probability on the inputs of its later layers
    width: int = 64            # dcgan: w; G's widest layer has 4 * w channels, D's 2 * w
    d_width: int = 0           # dcgan: D's own w (0: the same as G's); 2 * width makes D mirror G's channels
    g_upsample: str = "transposed"  # dcgan: how G doubles its resolution (model.py::upsample_2x)
    g_norm: str = "batch"      # dcgan: G's hidden normalisation: batch (Radford et al.) | none
    d_norm: str = "batch"      # dcgan: D's hidden normalisation: batch (Radford et al.) | none
    d_readout: str = "linear"  # dcgan: how D turns its 7x7 map into the logit: linear | conv | fc (readout_layers)


# Named sizes. The MLP's "paper" is the MNIST network of the authors' released configuration (mnist.yaml); the
# DCGAN's "paper" is Radford et al.'s width (w = 64) in this repo's 28x28 adaptation.
SIZES = {
    "mlp": {
        "tiny": dict(g_hidden=64, d_units=32, d_pieces=2),
        "small": dict(g_hidden=512, d_units=128, d_pieces=3),
        "paper": dict(g_hidden=1200, d_units=240, d_pieces=5),
    },
    "dcgan": {
        "tiny": dict(width=4),
        "small": dict(width=16),
        "paper": dict(width=64),
    },
}


def model_config(arch: str, size: str, **overrides) -> GANConfig:
    """The named ``size`` of G's architecture and of D's (a mixed pair takes D's fields from D's row)."""
    d_arch = overrides.get("d_arch", "same")
    d_sizes = SIZES[arch if d_arch == "same" else d_arch][size]
    return GANConfig(arch=arch, **{**d_sizes, **SIZES[arch][size], **overrides})


def discriminator_arch(cfg: GANConfig) -> str:
    return cfg.arch if cfg.d_arch == "same" else cfg.d_arch


def sample_noise(n: int, cfg: GANConfig, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ p_z(z), shape (n, z_dim)."""
    if cfg.noise == "uniform":
        u = torch.rand(n, cfg.z_dim, generator=generator, device=device)
        return (2 * u - 1) * math.sqrt(3)
    return torch.randn(n, cfg.z_dim, generator=generator, device=device)


# --------------------------------------------------------------------------------------------------------
# The paper's MNIST pair: ReLU/sigmoid MLP generator, maxout + dropout discriminator
# --------------------------------------------------------------------------------------------------------

class Maxout(nn.Module):
    """h_i = max_j (W x + b)_{i,j}: each of `units` outputs is the max of `pieces` linear functions."""

    def __init__(self, d_in: int, units: int, pieces: int):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(d_in, units * pieces)

    def forward(self, x):
        h = self.linear(x)  # (B, units * pieces)
        return h.view(-1, self.units, self.pieces).amax(dim=2)  # (B, units)


class MLPGenerator(nn.Module):
    """G(z): z (B, z_dim) -> ReLU -> ReLU -> sigmoid -> images (B, 1, 28, 28) in [0, 1]."""

    value_range = (0.0, 1.0)

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Linear(cfg.z_dim, cfg.g_hidden), nn.ReLU(),
            nn.Linear(cfg.g_hidden, cfg.g_hidden), nn.ReLU(),
            nn.Linear(cfg.g_hidden, IMAGE_DIM),
        )
        for m in self.net:  # the released configuration: uniform(-0.05, 0.05) weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.05, 0.05)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        """Start the sigmoid layer at the data's pixel marginals: b = logit(mean pixel)."""
        p = mean_image.flatten().clamp(1e-3, 1 - 1e-3)
        self.net[-1].bias.copy_(torch.log(p / (1 - p)))

    def forward(self, z):
        return torch.sigmoid(self.net(z)).view(-1, *IMAGE_SHAPE)  # (B, 1, 28, 28)


class MaxoutDiscriminator(nn.Module):
    """D(x): images -> dropout -> maxout -> dropout -> maxout -> dropout -> linear -> logit (B,)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(1 - cfg.d_keep_in), Maxout(IMAGE_DIM, cfg.d_units, cfg.d_pieces),
            nn.Dropout(1 - cfg.d_keep), Maxout(cfg.d_units, cfg.d_units, cfg.d_pieces),
            nn.Dropout(1 - cfg.d_keep), nn.Linear(cfg.d_units, 1),
        )
        for m in self.modules():  # the released configuration: uniform(-0.005, 0.005)
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.005, 0.005)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x).squeeze(1)  # (B,) logits


# --------------------------------------------------------------------------------------------------------
# DCGAN: transposed-conv generator, strided-conv discriminator, batch norm, no pooling, no hidden FC layers
# --------------------------------------------------------------------------------------------------------

def dcgan_init(module: nn.Module) -> None:
    """DCGAN §4: all weights from N(0, 0.02). Batch-norm scales from N(1, 0.02), shifts zero: the paper does not
    say; this is what the authors' released code does."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def norm_2d(channels: int, how: str) -> nn.Module:
    """Batch norm over (B, H, W) per channel, as DCGAN does, or nothing ("none")."""
    if how == "batch":
        return nn.BatchNorm2d(channels)
    if how == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {how!r}")


def upsample_2x(c_in: int, c_out: int, how: str, bias: bool) -> nn.Module:
    """(B, c_in, H, W) -> (B, c_out, 2H, 2W). "transposed": DCGAN's 4x4 stride-2 transposed convolution, whose
    neighbouring output pixels are made by different kernel taps; "resize": nearest-neighbour upsampling, then a
    3x3 convolution that slides the same weights over every output pixel (Odena et al. 2016, "Deconvolution and
    checkerboard artifacts")."""
    if how == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias))
    if how == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)
    raise ValueError(f"unknown upsampling {how!r}")


class DCGANGenerator(nn.Module):
    """G(z): z (B, z_dim) -> (B, 4w, 7, 7) -> (B, 2w, 14, 14) -> (B, 1, 28, 28) in [-1, 1] (tanh)."""

    value_range = (-1.0, 1.0)

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg, w, up, norm = cfg, cfg.width, cfg.g_upsample, cfg.g_norm
        bias = norm == "none"  # batch norm's shift would cancel a bias
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.z_dim, 4 * w, 7, 1, 0, bias=bias), norm_2d(4 * w, norm), nn.ReLU(),  # 7x7
            upsample_2x(4 * w, 2 * w, up, bias=bias), norm_2d(2 * w, norm), nn.ReLU(),                 # 14x14
            upsample_2x(2 * w, 1, up, bias=True), nn.Tanh(),                                            # 28x28
        )
        dcgan_init(self)

    def forward(self, z):
        return self.net(z[:, :, None, None])  # (B, 1, 28, 28)


def readout_layers(c_in: int, w: int, how: str, norm: str) -> list[nn.Module]:
    """D's last layers: its (B, c_in, 7, 7) feature map -> the logit, (B, 1, 1, 1) or (B, 1).

    Each of the 7x7 positions sees a 10x10-pixel window of the image (two 4x4 stride-2 convolutions). "linear" is
    Radford et al.'s last layer, one 7x7 convolution to one channel: the logit is then a *sum* over the 49
    positions of a score of each window alone, so D can weigh strokes only piece by piece. "conv" first adds a
    third stride-2 layer (4w channels, 3x3 positions of 22x22 pixels), as Radford et al.'s four-layer 64x64 D
    reaches most of its image; "fc" puts a hidden fully connected layer of 4w LeakyReLU units between the map and
    the logit, so that every unit weighs all positions together (a DCGAN has no hidden fully connected layer).
    """
    if how == "linear":
        return [nn.Conv2d(c_in, 1, 7, 1, 0)]
    if how == "conv":
        return [nn.Conv2d(c_in, 4 * w, 4, 2, 1, bias=norm == "none"), norm_2d(4 * w, norm), nn.LeakyReLU(0.2),
                nn.Conv2d(4 * w, 1, 3, 1, 0)]
    if how == "fc":
        return [nn.Flatten(), nn.Linear(c_in * 7 * 7, 4 * w), nn.LeakyReLU(0.2), nn.Linear(4 * w, 1)]
    raise ValueError(f"unknown readout {how!r}")


class DCGANDiscriminator(nn.Module):
    """D(x): (B, 1, 28, 28) -> (B, w, 14, 14) -> (B, 2w, 7, 7) -> logit (B,); LeakyReLU(0.2)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        w, norm = cfg.d_width or cfg.width, cfg.d_norm
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.2),                                          # no BN at input
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=norm == "none"), norm_2d(2 * w, norm), nn.LeakyReLU(0.2),
            *readout_layers(2 * w, w, cfg.d_readout, norm),                                       # logit
        )
        dcgan_init(self)

    def forward(self, x):
        return self.net(x).flatten()  # (B,) logits


GENERATORS = {"mlp": MLPGenerator, "dcgan": DCGANGenerator}
DISCRIMINATORS = {"mlp": MaxoutDiscriminator, "dcgan": DCGANDiscriminator}


def build_gan(cfg: GANConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator): G of ``cfg.arch``, D of ``cfg.d_arch`` ("same": of ``cfg.arch`` too)."""
    d_arch = discriminator_arch(cfg)
    if cfg.arch not in GENERATORS or d_arch not in DISCRIMINATORS:
        raise ValueError(f"unknown arch {cfg.arch!r} or d_arch {cfg.d_arch!r}")
    return GENERATORS[cfg.arch](cfg), DISCRIMINATORS[d_arch](cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
