"""VA-VAE at toy scale (Yao, Yang & Wang 2025, "Reconstruction vs. Generation", arXiv:2501.01423, Sec. 3): a small
KL-regularised autoencoder 28x28x1 -> 7x7x4 whose latents are aligned to a frozen "vision foundation model" by the
VF loss (marginal cosine + marginal distance-matrix similarity, adaptively weighted). The shared MNIST classifier
stands in for DINOv2. Also what the latent DiT needs: encode a dataset, normalise latents, decode samples.

Equation numbers (14)-(22) refer to the README's VA-VAE section; "paper Eq. n" is the paper's own numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.checkpoint import load_checkpoint
from shared.data import to_symmetric

AE_STAGE = "04_dit-vavae"  # train_vavae.py's runs live in experiments/04_dit-vavae/, apart from the DiT's


@dataclass
class AEConfig:
    width: int = 16  # channels of the first conv; 2x width at 14x14 and 7x7
    z_channels: int = 4  # latent 7x7 x z_channels
    feature_channels: int = 64  # channels of the frozen feature map the latent is projected to (W in Eq. 17)


# --------------------------------------------------------------------------------------------------------
# The autoencoder: 28x28x1 -> (mu, log sigma^2) at 7x7x4 -> 28x28x1
# --------------------------------------------------------------------------------------------------------

class Autoencoder(nn.Module):
    """KL autoencoder (as LDM's, minus attention and the GAN): a diagonal Gaussian posterior q(z|x) per latent
    pixel (Eq. 14). ``latent_mean``/``latent_std`` are per-channel statistics set by :func:`set_latent_stats`
    (identity until then); ``proj`` is the VF loss's W (Eq. 17), used only while training with alignment."""

    def __init__(self, cfg: AEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        w, z = cfg.width, cfg.z_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),                  # (B, w, 28, 28)
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),    # (B, 2w, 14, 14)
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),  # (B, 2w, 7, 7)
        )
        self.conv_out = nn.Conv2d(2 * w, 2 * z, 3, padding=1)  # (B, 2z, 7, 7): mu and log sigma^2; "last encoder layer"
        self.decoder = nn.Sequential(
            nn.Conv2d(z, 2 * w, 3, padding=1), nn.SiLU(),                        # (B, 2w, 7, 7)
            nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),  # (B, 2w, 14, 14)
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),      # (B, w, 28, 28)
            nn.Conv2d(w, 1, 3, padding=1),                                       # (B, 1, 28, 28), in [-1, 1] ideally
        )
        self.proj = nn.Conv2d(z, cfg.feature_channels, 1, bias=False)  # Eq. (17): Z' = W Z, per latent pixel
        self.register_buffer("latent_mean", torch.zeros(z))
        self.register_buffer("latent_std", torch.ones(z))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, 28, 28) in [-1, 1] -> (mu, logvar), each (B, z, 7, 7)."""
        mu, logvar = self.conv_out(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z, 7, 7) -> x_hat (B, 1, 28, 28)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> dict:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return {"x_hat": self.decode(z), "z": z, "mu": mu, "logvar": logvar}


def ae_from_state_dict(state: dict) -> Autoencoder:
    """Rebuild an :class:`Autoencoder` from its weights alone (the sizes are read off the tensors)."""
    cfg = AEConfig(width=state["encoder.0.weight"].shape[0], z_channels=state["conv_out.weight"].shape[0] // 2,
                   feature_channels=state["proj.weight"].shape[0])
    ae = Autoencoder(cfg)
    ae.load_state_dict(state)
    return ae


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) (Eq. 14): a sample of q(z|x) that gradients flow through."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # Eq. (14)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) KL(N(mu, sigma^2) || N(0, I)) summed over the latent, in closed form (Eq. 15)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)  # Eq. (15)


def ae_losses(out: dict, x: torch.Tensor, beta: float) -> dict:
    """L_AE = L_rec + beta L_KL (Eq. 16): L_rec the mean squared error per pixel, L_KL the KL per image divided by
    the pixels per image, so that beta weighs the two per pixel."""
    rec = F.mse_loss(out["x_hat"], x)
    kl = kl_divergence(out["mu"], out["logvar"]).mean() / x[0].numel()
    return {"rec": rec, "kl": kl, "ae": rec + beta * kl}  # Eq. (16)


# --------------------------------------------------------------------------------------------------------
# The frozen feature network (DINOv2's stand-in) and the VF loss
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def foundation_features(classifier: nn.Module, x: torch.Tensor, grid: int = 7) -> torch.Tensor:
    """F (B, 64, grid, grid): the shared classifier's third conv block (after its ReLU; natively 7x7) on x in
    [-1, 1], average-pooled to the latent grid if it differs. The classifier is frozen (eval, no gradients)."""
    f = classifier.body[:3]((x + 1) / 2)  # the classifier reads [0, 1] images; (B, 64, 7, 7)
    return F.adaptive_avg_pool2d(f, grid)


def marginal_cosine_loss(z_proj: torch.Tensor, f: torch.Tensor, m1: float) -> torch.Tensor:
    """L_mcos = 1/(hw) sum_ij ReLU(1 - m1 - cos(z'_ij, f_ij)) (Eq. 18; paper Eq. 2), averaged over the batch.
    z_proj, f: (B, C, h, w). Pairs already more similar than 1 - m1 contribute nothing."""
    cos = F.cosine_similarity(z_proj, f, dim=1, eps=1e-8)  # (B, h, w)
    return F.relu(1 - m1 - cos).mean()  # Eq. (18)


def cosine_matrix(v: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, N) cosine similarities between all N = hw spatial positions."""
    n = F.normalize(v.flatten(2), dim=1, eps=1e-8)  # (B, C, N), unit columns
    return n.transpose(1, 2) @ n  # (B, N, N)


def marginal_distance_matrix_loss(z_proj: torch.Tensor, f: torch.Tensor, m2: float) -> torch.Tensor:
    """L_mdms = 1/N^2 sum_ij ReLU(|cos(z_i, z_j) - cos(f_i, f_j)| - m2) (Eq. 19; paper Eq. 3), batch mean.

    The relative structure: latent positions should be as similar to each other as the features at those
    positions are. Computed on the projected latent Z', as the authors' code does."""
    return F.relu((cosine_matrix(z_proj) - cosine_matrix(f)).abs() - m2).mean()  # Eq. (19)


def adaptive_weight(rec_loss: torch.Tensor, vf_loss: torch.Tensor, last_layer: torch.Tensor,
                    eps: float = 1e-12) -> torch.Tensor:
    """w_adaptive = ||grad_W_last L_rec|| / ||grad_W_last L_vf|| (Eq. 20; the paper's adaptive weighting, §3),
    W_last the encoder's last conv weight: the VF loss then pushes on the encoder as hard as reconstruction does.
    A constant (detached).
    eps only avoids 0/0 when the VF loss is flat (zero inside both margins); the authors' code uses 1e-4, which
    here, with per-pixel means and gradient norms ~1e-5 at initialisation, would swamp the ratio."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_vf_norm = g_vf.norm() if g_vf is not None else torch.zeros((), device=last_layer.device)
    return (g_rec.norm() / (g_vf_norm + eps)).detach()  # Eq. (20)


def vf_loss(ae: Autoencoder, z: torch.Tensor, f: torch.Tensor, rec_loss: torch.Tensor, m1: float, m2: float,
            w_hyper: float) -> dict:
    """L_vf = w_hyper * w_adaptive * (L_mcos + L_mdms) (Eq. 21; the paper's total VF loss, §3) for the latent
    sample z (B, 4, 7, 7) and the frozen features f (B, 64, 7, 7)."""
    z_proj = ae.proj(z)  # Eq. (17): (B, 64, 7, 7)
    mcos = marginal_cosine_loss(z_proj, f, m1)
    mdms = marginal_distance_matrix_loss(z_proj, f, m2)
    w = adaptive_weight(rec_loss, mcos + mdms, ae.conv_out.weight)
    return {"vf": w_hyper * w * (mcos + mdms), "mcos": mcos, "mdms": mdms, "w_adaptive": w}  # Eq. (21)


# --------------------------------------------------------------------------------------------------------
# Latents for the DiT
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_images(ae: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """uint8 images (N, 1, 28, 28) -> posterior means mu (N, z, 7, 7), unnormalised (eval mode, no noise)."""
    device = next(ae.parameters()).device
    out = [ae.encode(to_symmetric(images[i:i + batch_size]).to(device))[0].cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def set_latent_stats(ae: Autoencoder, mu: torch.Tensor) -> None:
    """Measure the per-channel mean and std of encoded latents (N, z, 7, 7) and store them in the autoencoder's
    buffers, so that normalize() gives the DiT latents of ~zero mean and unit variance (Eq. 22)."""
    ae.latent_mean.copy_(mu.mean(dim=(0, 2, 3)))
    ae.latent_std.copy_(mu.std(dim=(0, 2, 3)))


def normalize(ae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """z_tilde = (z - m) / s per channel (Eq. 22): what the DiT trains on."""
    return (z - ae.latent_mean[:, None, None]) / ae.latent_std[:, None, None]  # Eq. (22)


def prepare_latents(path: str, images: torch.Tensor) -> tuple[Autoencoder, torch.Tensor]:
    """Load a train_vavae.py checkpoint (frozen), encode uint8 images to posterior means, measure their per-channel
    statistics into the autoencoder's buffers and return (autoencoder, normalised latents (N, z, 7, 7))."""
    ae = ae_from_state_dict(load_checkpoint(path, AE_STAGE)["model"]).eval().requires_grad_(False)
    mu = encode_images(ae, images)
    set_latent_stats(ae, mu)
    return ae, normalize(ae, mu)


@torch.no_grad()
def decode_latents(ae: Autoencoder, z_tilde: torch.Tensor) -> torch.Tensor:
    """Inverse of Eq. (22), then the decoder: DiT samples (B, z, 7, 7) -> images (B, 1, 28, 28) in [-1, 1]."""
    z = z_tilde * ae.latent_std[:, None, None] + ae.latent_mean[:, None, None]
    return ae.decode(z).clamp(-1, 1)
