"""The two training objectives and their samplers, re-derived briefly (the full DDPM lesson is 03_ddpm):

* DDPM (Ho et al. 2020), as DiT trains: eps-prediction with L_simple on a linear beta schedule; ancestral
  (DDPM) and deterministic (DDIM) sampling on a respaced subsequence of the 1000 steps.
* Rectified flow (Liu et al. 2022; Esser et al. 2024), as LightningDiT trains: x_t = (1-t) x_0 + t eps,
  velocity v = eps - x_0, logit-normal t, an optional cosine (velocity-direction) loss; Euler and Heun ODE
  samplers.

Both use classifier-free guidance on every output channel. Equation numbers refer to the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.runtime import to_device

T_STEPS = 1000  # DDPM's T; flow time t in [0, 1] is shown to the network as 1000 t


# --------------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)
# --------------------------------------------------------------------------------------------------------

def guided_prediction(model, x, t, y, scale: float, null_class: int, guide: bool = True) -> torch.Tensor:
    """out = out(x, null) + s (out(x, y) - out(x, null)) on ALL channels (Eq. 6); one batched forward."""
    if not guide or scale == 1.0:
        return model(x, t, y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)  # Eq. (6)


def in_interval(t_unit: float, interval: tuple[float, float]) -> bool:
    """Guidance interval (Kynkaanniemi et al. 2024): guide only while the normalised time is inside it."""
    return interval[0] <= t_unit <= interval[1]


# --------------------------------------------------------------------------------------------------------
# DDPM: eps-prediction
# --------------------------------------------------------------------------------------------------------

def linear_alpha_bar(T: int = T_STEPS, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """(T,) alpha_bar_t = prod_{s<=t} (1 - beta_s) for DDPM's linear schedule (Eq. 1), in float64."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)  # Eq. (1)


def q_sample(x0, t, eps, alpha_bar):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 2); t (B,) integer steps."""
    ab = alpha_bar.to(x0.device)[t].float()[:, None, None, None]  # (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Eq. (2)


def ddpm_loss(model, x0, y, alpha_bar) -> dict:
    """L_simple = E || eps - eps_theta(x_t, t, y) ||^2 (Eq. 3), t uniform on {0..T-1}."""
    t = torch.randint(0, len(alpha_bar), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    eps_theta = model(q_sample(x0, t, eps, alpha_bar), t.float(), y)
    mse = F.mse_loss(eps_theta, eps)  # Eq. (3)
    return {"loss": mse, "mse": mse}


@torch.no_grad()
def ddim_sample(model, noise, y, steps: int, cfg_scale: float, null_class: int, eta: float = 0.0,
                interval=(0.0, 1.0), alpha_bar=None, generator=None, trajectory=None, clip: bool = True):
    """Sample on `steps` evenly spaced steps of the T-step chain (Eq. 4-5).

    eta = 1 is ancestral DDPM sampling on the respaced chain (sigma_t^2 = posterior variance beta~_t);
    eta = 0 is deterministic DDIM. x_0 is clipped to [-1, 1] as DiT's sampler does for pixels (clip=False for
    latents, which have no such range).
    """
    alpha_bar = linear_alpha_bar() if alpha_bar is None else alpha_bar
    ts = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist()  # T-1 ... 0
    x = noise
    for i, t in enumerate(ts):
        ab = float(alpha_bar[t])
        ab_prev = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        eps = guided_prediction(model, x, tt, y, cfg_scale, null_class, in_interval(t / len(alpha_bar), interval))
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5  # Eq. (2) solved for x_0
        x0 = x0.clamp(-1, 1) if clip else x0
        eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5  # the eps consistent with the clipped x_0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5  # Eq. (5)
        x = ab_prev ** 0.5 * x0 + (1 - ab_prev - sigma ** 2) ** 0.5 * eps  # Eq. (4)
        if sigma > 0:
            # Drawn where the generator lives (sample.py's is a CPU one, which CUDA/MPS cannot draw from), then
            # moved without blocking: the same seed gives the same noise on every device.
            where = generator.device if generator is not None else x.device
            x = x + sigma * to_device(torch.randn(x.shape, generator=generator, device=where), x.device)
        if trajectory is not None:
            trajectory.append(x.clone())
    return x


# --------------------------------------------------------------------------------------------------------
# Rectified flow: velocity prediction (LightningDiT)
# --------------------------------------------------------------------------------------------------------

def rf_interpolate(x0, eps, t):
    """x_t = (1 - t) x_0 + t eps (Eq. 7) and its velocity dx_t/dt = eps - x_0 (Eq. 8); t (B,) in [0, 1]."""
    tb = t[:, None, None, None]
    return (1 - tb) * x0 + tb * eps, eps - x0  # Eq. (7), Eq. (8)


def sample_t(n: int, logit_normal: bool, device, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t ~ U(0, 1), or logit-normal t = sigmoid(N(mean, std^2)) (Eq. 9), which favours mid-range t."""
    if logit_normal:
        return torch.sigmoid(mean + std * torch.randn(n, device=device))  # Eq. (9)
    return torch.rand(n, device=device)


def rf_loss(model, x0, y, logit_normal: bool = True, cos_weight: float = 0.0) -> dict:
    """|| v_theta - v ||^2 (Eq. 10) plus cos_weight x (1 - cos(v_theta, v)) per sample (Eq. 11)."""
    t = sample_t(x0.shape[0], logit_normal, x0.device)
    eps = torch.randn_like(x0)
    x_t, v = rf_interpolate(x0, eps, t)
    v_theta = model(x_t, T_STEPS * t, y)
    mse = F.mse_loss(v_theta, v)  # Eq. (10)
    # One cosine per sample, over the whole flattened (C, H, W) velocity. LightningDiT takes it per position along
    # the channels (dim=1), which suits its 32-channel latents; on 1-channel pixels that cosine of two numbers is
    # only the agreement of their signs (+-1, no gradient), so here the direction is that of the whole sample.
    cos = 1 - F.cosine_similarity(v_theta.flatten(1), v.flatten(1), dim=1).mean()  # Eq. (11)
    loss = mse + cos_weight * cos if cos_weight > 0 else mse
    return {"loss": loss, "mse": mse, "cos": cos}


@torch.no_grad()
def ode_sample(model, noise, y, steps: int, cfg_scale: float, null_class: int, method: str = "euler",
               interval=(0.0, 1.0), trajectory=None):
    """Integrate dx/dt = v_theta(x, t) from t = 1 (noise) to t = 0 (data) on `steps` uniform steps (Eq. 12).

    Heun (Eq. 13) averages the slope at both ends of a step (2 evaluations; the last step is Euler).
    """
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise

    def v(x, t):
        tt = torch.full((x.shape[0],), T_STEPS * t, device=x.device)
        return guided_prediction(model, x, tt, y, cfg_scale, null_class, in_interval(t, interval))

    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t  # negative
        d = v(x, t)
        x_euler = x + h * d  # Eq. (12)
        if method == "heun" and t_next > 0:
            x = x + h * 0.5 * (d + v(x_euler, t_next))  # Eq. (13)
        else:
            x = x_euler
        if trajectory is not None:
            trajectory.append(x.clone())
    return x


# Each sampler and the objective it fits: ddpm/ddim step an eps-model's chain, euler/heun a velocity model's ODE.
SAMPLERS = {"ddpm": "ddpm", "ddim": "ddpm", "euler": "flow", "heun": "flow"}


def sample(model, noise, y, objective: str, sampler: str, steps: int, cfg_scale: float, null_class: int,
           interval=(0.0, 1.0), generator=None, trajectory=None, clip: bool = True):
    """Dispatch to the sampler for this objective: ddpm/ddim for eps-models, euler/heun for velocity models."""
    if SAMPLERS[sampler] != objective:
        raise ValueError(f"sampler {sampler} does not fit a model trained with objective {objective}")
    if objective == "ddpm":
        return ddim_sample(model, noise, y, steps, cfg_scale, null_class, eta=1.0 if sampler == "ddpm" else 0.0,
                           interval=interval, generator=generator, trajectory=trajectory, clip=clip)
    return ode_sample(model, noise, y, steps, cfg_scale, null_class, method=sampler, interval=interval,
                      trajectory=trajectory)
