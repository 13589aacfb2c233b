"""Rectified flow with logit-normal timesteps (Esser et al. 2024) and classifier-free guidance (Ho & Salimans 2022).

Equation numbers are the README's. Time runs from data (t = 0) to noise (t = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_normal_t(n: int, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (5): t = sigmoid(m + s * u), u ~ N(0, 1): more training steps at mid t, where v is hardest."""
    return torch.sigmoid(m + s * torch.randn(n, generator=generator))  # Eq. (5)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. (4): the straight path z_t = (1 - t) x0 + t eps."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * eps  # Eq. (4)


def rectified_flow_loss(velocity, x0: torch.Tensor, cond, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. (6): || v_theta(z_t, t, y) - (eps - x0) ||^2, the conditional flow-matching loss."""
    z_t = interpolate(x0, eps, t)
    return F.mse_loss(velocity(z_t, t, cond), eps - x0)  # Eq. (6)


def guided_velocity(velocity, z: torch.Tensor, t: torch.Tensor, cond, null_cond, scale: float) -> torch.Tensor:
    """Eq. (8): v = v(z, t, null) + w (v(z, t, y) - v(z, t, null)), both halves in one batched forward.

    At w = 0 and w = 1 Eq. (8) is one of its two terms, so one forward pass of half the batch gives it; a test
    checks that these shortcuts lie on the line the general case computes.
    """
    if scale == 0:
        return velocity(z, t, null_cond)  # Eq. (8) at w = 0
    if scale == 1:
        return velocity(z, t, cond)  # Eq. (8) at w = 1: v_null + (v_cond - v_null)
    both = tuple(torch.cat([c, n]) for c, n in zip(cond, null_cond))
    v_cond, v_null = velocity(torch.cat([z, z]), torch.cat([t, t]), both).chunk(2)
    return v_null + scale * (v_cond - v_null)  # Eq. (8)


@torch.no_grad()
def sample(velocity, noise: torch.Tensor, cond, null_cond, scale: float, steps: int = 30,
           return_path: bool = False, interval: tuple[float, float] = (0.0, 1.0)):
    """Eq. (9): Euler steps of dz/dt = v from t = 1 (noise) down to t = 0 (data).

    Guidance interval (Kynkaanniemi et al. 2024): the scale applies only to steps that start at a t inside
    ``interval``; the other steps use the plain conditional velocity (scale 1).
    """
    z, path = noise, [noise]
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((len(z),), float(ts[i]), device=z.device)
        guide = interval[0] <= float(ts[i]) <= interval[1]
        v = guided_velocity(velocity, z, t, cond, null_cond, scale if guide else 1.0)
        z = z + (ts[i + 1] - ts[i]) * v  # Eq. (9), a negative step in t
        path.append(z)
    return (z, path) if return_path else z
