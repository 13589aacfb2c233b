"""Auto-Encoding Variational Bayes (Kingma & Welling 2013): the networks and the SGVB math.

Equation numbers are those of arXiv:1312.6114v10. The encoder is q_phi(z|x) = N(z; mu, sigma^2 I) (Eq. 9), the
decoder p_theta(x|z) is a product of Bernoullis over the 784 pixels (Appendix C.1), the prior p(z) = N(0, I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------

@dataclass
class VAEConfig:
    arch: str = "mlp"     # "mlp": the paper's Appendix C networks; "conv": residual conv nets (not in the paper)
    z_dim: int = 32       # N_z, the latent size
    hidden: int = 512     # mlp: units per hidden layer (the paper: 500)
    layers: int = 2       # mlp: hidden layers in the encoder and in the decoder (the paper: 1)
    act: str = "elu"      # mlp: hidden nonlinearity, "tanh" (the paper) | "relu" | "elu"
    channels: int = 32    # conv: width at 28x28; 14x14 and 7x7 use twice this
    blocks: int = 1       # conv: residual blocks per resolution


SIZES = {  # named model sizes, as --model
    "mlp-paper": VAEConfig(arch="mlp", z_dim=20, hidden=500, layers=1, act="tanh"),  # Appendix C, MNIST
    "mlp": VAEConfig(arch="mlp", z_dim=32, hidden=512, layers=2, act="elu"),           # default preset
    "conv": VAEConfig(arch="conv", z_dim=32, channels=64, blocks=2),                   # full preset
}
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def vae_config(size: str, z_dim: int = 0) -> VAEConfig:
    """A named size, with its latent size replaced when ``z_dim`` > 0."""
    cfg = SIZES[size]
    return replace(cfg, z_dim=z_dim) if z_dim > 0 else cfg


def mlp(n_in: int, n_hidden: int, n_out: int, layers: int, act: str) -> nn.Sequential:
    dims = [n_in] + [n_hidden] * layers
    mods = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), ACTS[act]()]
    return nn.Sequential(*mods, nn.Linear(dims[-1], n_out))


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): a pre-activation residual block that keeps the shape.

    The second conv starts at zero, so each block starts as the identity and a deep stack stays stable.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class ConvEncoder(nn.Module):
    def __init__(self, c: int, blocks: int, n_out: int):
        super().__init__()
        res = lambda ch: [ResBlock(ch) for _ in range(blocks)]  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), *res(c),                       # (B, c, 28, 28)
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), *res(2 * c),     # (B, 2c, 14, 14)
            nn.Conv2d(2 * c, 2 * c, 4, stride=2, padding=1), *res(2 * c),  # (B, 2c, 7, 7)
            nn.ELU(), nn.Conv2d(2 * c, 16, 1), nn.ELU(),                   # (B, 16, 7, 7): a narrow head
            nn.Flatten(), nn.Linear(16 * 49, n_out))                       # (B, n_out)

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, c: int, blocks: int, z_dim: int):
        super().__init__()
        res = lambda ch: [ResBlock(ch) for _ in range(blocks)]  # noqa: E731
        self.fc = nn.Linear(z_dim, 16 * 49)
        self.net = nn.Sequential(
            nn.Conv2d(16, 2 * c, 1), *res(2 * c),                                  # (B, 2c, 7, 7)
            nn.ELU(), nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1), *res(2 * c),  # (B, 2c, 14, 14)
            nn.ELU(), nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), *res(c),          # (B, c, 28, 28)
            nn.ELU(), nn.Conv2d(c, 1, 3, padding=1))                               # (B, 1, 28, 28) logits

    def forward(self, z):
        return self.net(F.elu(self.fc(z)).view(-1, 16, 7, 7))


class VAE(nn.Module):
    """Encoder q_phi(z|x) -> (mu, log sigma^2); decoder p_theta(x|z) -> Bernoulli logits, both on (B, 1, 28, 28)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "mlp":  # Appendix C: x -> h -> (mu, log sigma^2);  z -> h -> y = sigmoid(logits)
            self.encoder = nn.Sequential(nn.Flatten(), mlp(784, cfg.hidden, 2 * cfg.z_dim, cfg.layers, cfg.act))
            self.decoder = nn.Sequential(mlp(cfg.z_dim, cfg.hidden, 784, cfg.layers, cfg.act),
                                         nn.Unflatten(1, (1, 28, 28)))
        elif cfg.arch == "conv":
            self.encoder = ConvEncoder(cfg.channels, cfg.blocks, 2 * cfg.z_dim)
            self.decoder = ConvDecoder(cfg.channels, cfg.blocks, cfg.z_dim)
        else:
            raise ValueError(f"unknown arch {cfg.arch!r}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, N_z) each
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, 1, 28, 28) logits of p_theta(x|z)

    def forward(self, x: torch.Tensor, samples: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (logits of p(x|z), mu, logvar) with ``samples`` draws z = mu + sigma * eps per datapoint; the
        logits are (samples * B, 1, 28, 28), draw-major: rows l*B .. l*B + B - 1 are draw l of the whole batch."""
        mu, logvar = self.encode(x)                                               # (B, N_z) each
        eps = torch.randn(samples, *mu.shape, device=mu.device, dtype=mu.dtype)  # (L, B, N_z)
        return self.decode(reparameterize(mu, logvar, eps).flatten(0, 1)), mu, logvar


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def init_normal_(model: nn.Module, std: float) -> nn.Module:
    """Redraw every weight and bias from N(0, std^2): the paper's §5 initialization.

    The paper writes N(0, 0.01); we read 0.01 as the standard deviation. Used by the `paper` preset only: the
    other presets keep PyTorch's fan-in scaled default (a layer's output scale then does not depend on its
    width; the two were not compared on the deeper ELU and conv networks).
    """
    for p in model.parameters():
        p.normal_(0.0, std)
    return model


# --------------------------------------------------------------------------------------------------------
# The SGVB math
# --------------------------------------------------------------------------------------------------------

def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = g_phi(eps, x) = mu + sigma * eps with eps ~ N(0, I): a differentiable sample of q_phi(z|x) (§2.4)."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * eps  # Eq. (4), Eq. (10): z = mu + sigma ⊙ eps


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q_phi(z|x) || N(0, I)) in closed form, summed over N_z: (B,) (Appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)  # Eq. (10) first term (App. B), negated


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)  # Eq. (9)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log p(z) for the prior N(0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p_theta(x|z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i), y = sigmoid(logits): (B,) (Appendix C.1)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)  # Eq. (C.1)


def elbo(model: VAE, x: torch.Tensor, beta: float = 1.0, samples: int = 1) -> dict[str, torch.Tensor]:
    """The SGVB estimator L~B with L = ``samples`` draws of z per datapoint, per datapoint: (B,) tensors (Eq. 7,
    Eq. 10). The paper uses L = 1 "as long as the minibatch size M was large enough, e.g. M = 100" (§2.3).

    ``beta`` weights the KL term (beta-VAE, Higgins et al. 2017): NOT IN THE PAPER, which is beta = 1.
    """
    logits, mu, logvar = model(x, samples)           # z = mu + sigma * eps inside, Eq. (4); (L*B, 1, 28, 28)
    x_rep = x.expand(samples, *x.shape).flatten(0, 1)                     # (L*B, 1, 28, 28)
    rec = bernoulli_log_likelihood(x_rep, logits).view(samples, -1).mean(0)  # (B,) (1/L) sum_l log p(x|z_l), Eq. (7)
    kl = gaussian_kl(mu, logvar)                     # (B,) analytic, Appendix B
    return {"elbo": rec - kl, "objective": rec - beta * kl, "rec": rec, "kl": kl}  # Eq. (7)


def wake_sleep(model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The wake-sleep losses (Hinton et al. 1995; README (WS-w), (WS-s)), the paper's baseline in §5 and Fig. 2.

    Wake: for data x, draw z ~ q_phi(z|x) and hold it fixed (no gradient through the sample); the decoder learns
    to explain x from it, maximizing log p_theta(x|z) (log p(z) is constant in theta). Sleep: the model dreams,
    z ~ p(z) and x ~ p_theta(x|z), and the encoder learns to recover the dream's z, maximizing log q_phi(z|x).
    The encoder is fitted by KL(p||q) on dreams, not by KL(q||p) on data, so no single bound is being ascended:
    the paper's point is that AEVB, which ascends one, does better. Each phase reaches only its own network, so
    one step on the sum of the two is the wake step and the sleep step taken from the same weights (the
    original alternates them). "elbo" is the SGVB estimate of Eq. (7) on the wake batch, for the comparison;
    every value is a (B,) tensor.
    """
    mu, logvar = model.encode(x)                          # (B, N_z)
    z = reparameterize(mu, logvar).detach()               # (B, N_z) a sample of q, held fixed
    wake = bernoulli_log_likelihood(x, model.decode(z))   # (B,) log p_theta(x|z), (WS-w): reaches theta only
    with torch.no_grad():                                 # the dreams are data for the encoder, nothing more
        z_dream = torch.randn_like(mu)                                    # (B, N_z) ~ p(z)
        probs = torch.sigmoid(model.decode(z_dream)).nan_to_num()        # (B, 1, 28, 28); a diverged decoder's
        x_dream = torch.bernoulli(probs)                                  # NaN fails in the loss, not here
    sleep = log_normal(z_dream, *model.encode(x_dream))  # (B,) log q_phi(z|x) on dreams, (WS-s): reaches phi only
    kl = gaussian_kl(mu, logvar).detach()
    return {"elbo": wake.detach() - kl, "rec": wake.detach(), "kl": kl, "wake": wake, "sleep": sleep}


def log_weights(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """log w_j = log p(x, z_j) - log q(z_j|x) for k samples z_j ~ q(z|x): (k, B).

    Each log w_j alone is the SGVB estimator L~A of Eq. (6) with L = 1.
    """
    mu, logvar = model.encode(x)                          # (B, N_z)
    eps = torch.randn(k, *mu.shape, device=mu.device)     # (k, B, N_z)
    z = reparameterize(mu, logvar, eps)                   # (k, B, N_z)
    logits = model.decode(z.flatten(0, 1))                # (k*B, 1, 28, 28)
    x_rep = x.expand(k, *x.shape).flatten(0, 1)           # (k*B, 1, 28, 28)
    log_px_z = bernoulli_log_likelihood(x_rep, logits).view(k, -1)  # (k, B)
    return log_px_z + log_standard_normal(z) - log_normal(z, mu, logvar)  # Eq. (6)


@torch.no_grad()
def importance_sampled_log_px(model: VAE, x: torch.Tensor, k: int, chunk: int = 500) -> torch.Tensor:
    """log p(x) ≈ log (1/k) sum_j p(x, z_j) / q(z_j|x), z_j ~ q(z|x): (B,) (Rezende et al. 2014; Burda et al. 2015).

    A lower bound in expectation that tightens as k grows (k = 1: the ELBO); the k samples are drawn in chunks.
    """
    parts = [log_weights(model, x, min(chunk, k - start)) for start in range(0, k, chunk)]
    return torch.logsumexp(torch.cat(parts), dim=0) - math.log(k)  # Eq. (IS): (B,) logmeanexp over k
