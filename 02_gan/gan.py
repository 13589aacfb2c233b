"""The adversarial game of Goodfellow et al. (2014), written on discriminator logits a, D = sigmoid(a).

log D = logsigmoid(a) and log(1 - D) = logsigmoid(-a) are exact and finite for any logit, which is what
lets the tests evaluate every loss at logits of +-200 (where sigmoid(a) rounds to 0 or 1 in float32) and probe
the saturated regime (D(G(z)) ~ 6e-6) without NaNs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG4 = math.log(4.0)


def log_d(logits: torch.Tensor) -> torch.Tensor:
    """log D(x) = log sigmoid(a)."""
    return F.logsigmoid(logits)


def log_one_minus_d(logits: torch.Tensor) -> torch.Tensor:
    """log(1 - D(x)) = log sigmoid(-a)."""
    return F.logsigmoid(-logits)


def value_function(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Minibatch estimate of V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]."""
    return log_d(real_logits).mean() + log_one_minus_d(fake_logits).mean()  # Eq. (1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's D update *ascends* V; we descend -V.

    -V is the mean binary cross-entropy on the real minibatch (label 1) *plus* the mean one on the fake
    minibatch (label 0): twice the BCE over the pooled, equal-sized batch. Hence -V = log 4 at D = 1/2.
    """
    return -value_function(real_logits, fake_logits)  # Eq. (1), max over D


def generator_loss_minimax(fake_logits: torch.Tensor) -> torch.Tensor:
    """The G player of Eq. (1): minimise E_z[log(1 - D(G(z)))]. Saturates when D rejects G(z) confidently."""
    return log_one_minus_d(fake_logits).mean()  # Eq. (1), min over G


def generator_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """§3: instead maximise E_z[log D(G(z))] -- same fixed point, strong gradients early in learning."""
    return -log_d(fake_logits).mean()  # §3, "maximize log D(G(z))"


GENERATOR_LOSSES = {"minimax": generator_loss_minimax, "nonsaturating": generator_loss_nonsaturating}


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Proposition 1: for fixed G the best D is D*_G(x) = p_data(x) / (p_data(x) + p_g(x)); where both
    densities are 0 any D is optimal, and 1/2 is returned.

    Where both densities are positive D* lies strictly inside (0, 1), and it is kept inside [eps, 1 - eps] (eps:
    the dtype's machine epsilon): where one density is below eps times the other the quotient rounds to exactly 1
    (or 0), and log(1 - D*) would be -inf although p_g > 0 there. The clamp changes V by less than 37 eps per unit
    of probability mass. D* stays exactly 1 (or 0) where only p_data (or only p_g) lives."""
    total = p_data + p_g
    eps = torch.finfo(total.dtype).eps
    d = torch.where(total > 0, p_data / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)  # Eq. (2)
    return torch.where((p_data > 0) & (p_g > 0), d.clamp(eps, 1 - eps), d)


def value_on_grid(d: torch.Tensor, p_data: torch.Tensor, p_g: torch.Tensor, dx: float) -> torch.Tensor:
    """V(G, D) = integral of p_data log D + p_g log(1 - D) dx, by the rectangle rule on a 1-D grid; 0 log 0 = 0,
    so D* of two densities that do not overlap (D = 1 or 0 there) gets a finite value."""
    return ((torch.xlogy(p_data, d) + torch.xlogy(p_g, 1 - d)) * dx).sum()  # Eq. (3)


def virtual_training_criterion(p_data: torch.Tensor, p_g: torch.Tensor, dx: float) -> torch.Tensor:
    """C(G) = max_D V(G, D) = -log 4 + 2 JSD(p_data || p_g) >= -log 4, equality iff p_g = p_data (Theorem 1)."""
    m = (p_data + p_g) / 2
    kl = lambda p, q: (torch.where(p > 0, p * (torch.log(p) - torch.log(q)), 0.0) * dx).sum()  # noqa: E731
    return -LOG4 + kl(p_data, m) + kl(p_g, m)  # Eq. (5) = Eq. (6)
