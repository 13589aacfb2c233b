"""Gaussian diffusion, the lesson's core: DDPM (Ho et al. 2020) and the DDIM sampler (Song et al. 2021).

Indexing follows the paper: t = 1..T, and every schedule tensor has T+1 entries with index 0 meaning "no
noise" (beta_0 = 0, alpha_bar_0 = 1), so ``alpha_bar[t]`` reads as the paper's alpha-bar_t. Images live
in [-1, 1]. ``eps_theta`` is any callable ``(x_t, t) -> eps`` (the U-Net, or a closed form in the tests).
DDIM's alpha_t is our alpha_bar_t.
"""

from __future__ import annotations

import math

import torch

# ------------------------------------------------------------------------------------------------------------
# Noise schedules
# ------------------------------------------------------------------------------------------------------------


def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """The paper's schedule: beta_t rising linearly from 1e-4 to 0.02 over T = 1000 steps (§4).

    beta_1 and beta_T are the values for T = 1000. For another T both ends are scaled by 1000/T (as Nichol &
    Dhariwal 2021 do), so that x_T is still noise: alpha_bar_T = 4.0e-5 at T = 1000, 2.0e-5 at T = 100, smaller
    still below (unscaled, T = 100 would end at alpha_bar_T = 0.36, far from the N(0, I) the samplers start
    from). beta_T = 20/T reaches the 0.999 cap only for T <= 20."""
    scale = 1000 / T
    return torch.linspace(beta_1 * scale, beta_T * scale, T, dtype=torch.float64).clamp(max=0.999)  # (T,)


def cosine_betas(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    """EXTENSION (Nichol & Dhariwal 2021, Eq. 17): alpha_bar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    which destroys information more evenly over t than the linear schedule; betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # (T,)


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] for a batch of timesteps, shaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
    return a.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """The fixed forward process q and everything derived from it; the network is passed to each method."""

    def __init__(self, T: int = 1000, schedule: str = "linear", beta_1: float = 1e-4, beta_T: float = 0.02):
        if schedule == "linear":
            betas = linear_betas(T, beta_1, beta_T)
        elif schedule == "cosine":
            betas = cosine_betas(T)
        else:
            raise ValueError(f"unknown schedule {schedule!r}; expected 'linear' or 'cosine'")
        self.T = T
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # (T+1,), beta_0 = 0
        self.alpha = 1 - self.beta  # alpha_0 = 1: index 0 is "no noise" in every table
        self.alpha_bar = torch.cumprod(self.alpha, 0)  # alpha_bar_t = prod_{s<=t} alpha_s; alpha_bar_0 = 1
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])  # alpha_bar_{t-1}
        self.beta_tilde = (1 - ab_prev) / (1 - self.alpha_bar).clamp(min=1e-20) * self.beta  # Eq. (7)
        self.alpha_bar_prev = ab_prev

    def to(self, device) -> Diffusion:
        """Moves the tables to ``device``, once: otherwise every a[t] for timesteps on a GPU copies a table from
        the host, and such a copy makes the host wait for the GPU to finish its queued work."""
        for name in ("beta", "alpha", "alpha_bar", "alpha_bar_prev", "beta_tilde"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sigma2(self, kind: str = "beta") -> torch.Tensor:
        """The reverse-process variance sigma_t^2 (§3.2): beta_t (optimal for x_0 ~ N(0, I)) or beta_tilde_t
        (optimal for one fixed x_0); the two bound the true one, and Ho et al. saw similar samples with both."""
        if kind == "beta":
            return self.beta
        if kind == "beta_tilde":
            return self.beta_tilde
        raise ValueError(f"unknown reverse variance {kind!r}; expected 'beta' or 'beta_tilde'")

    # --------------------------------------------------------------------------------------------------------
    # The forward process
    # --------------------------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), reparameterized with eps."""
        ab = _gather(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Eq. (4)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I): returns (mu_tilde, beta_tilde)."""
        ab, ab_prev = _gather(self.alpha_bar, t, xt), _gather(self.alpha_bar_prev, t, xt)
        beta, alpha = _gather(self.beta, t, xt), _gather(self.alpha, t, xt)
        mu = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * xt  # Eq. (7)
        return mu, _gather(self.beta_tilde, t, xt)  # Eq. (6)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_hat_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): Eq. (4) solved for x_0."""
        ab = _gather(self.alpha_bar, t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that maps x_0 to x_t under Eq. (4)."""
        ab = _gather(self.alpha_bar, t, xt)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    # --------------------------------------------------------------------------------------------------------
    # Training (Algorithm 1)
    # --------------------------------------------------------------------------------------------------------

    def loss_simple(self, eps_theta, x0: torch.Tensor, t: torch.Tensor | None = None,
                    eps: torch.Tensor | None = None) -> torch.Tensor:
        """L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2,
        with t ~ Uniform{1..T}, eps ~ N(0, I); the squared error is averaged over pixels (a constant factor)."""
        if t is None:
            t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)  # (B,)
        if eps is None:
            eps = torch.randn_like(x0)
        return (eps - eps_theta(self.q_sample(x0, t, eps), t)).pow(2).mean()  # Eq. (14)

    # --------------------------------------------------------------------------------------------------------
    # The reverse process p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)
    # --------------------------------------------------------------------------------------------------------

    def p_mean(self, eps_theta, xt: torch.Tensor, t: torch.Tensor, clip: bool = True):
        """mu_theta(x_t, t) and the x_hat_0 it implies. Unclipped, mu_theta is Eq. (11); with ``clip`` (as the
        official code does) x_hat_0 is clamped to [-1, 1] first and put into the posterior mean, Eq. (7)."""
        eps = eps_theta(xt, t)
        if not clip:
            alpha, ab = _gather(self.alpha, t, xt), _gather(self.alpha_bar, t, xt)
            mu = (xt - (1 - alpha) / (1 - ab).sqrt() * eps) / alpha.sqrt()  # Eq. (11)
            return mu, self.predict_x0(xt, t, eps)
        x0_hat = self.predict_x0(xt, t, eps).clamp(-1, 1)
        return self.q_posterior(x0_hat, xt, t)[0], x0_hat

    @torch.no_grad()
    def sample_ddpm(self, eps_theta, shape, sigma: str = "beta", clip: bool = True, generator=None,
                    device="cpu", x_T: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
        """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 1.

        ``trace`` (a list), when given, receives (t, x_t, x_hat_0 predicted from x_t) for t = T..1, then
        (0, x_0, x_0): every entry pairs a state with the network's guess made from that same state (Fig. 6)."""
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
        sigmas = self.sigma2(sigma).sqrt().tolist()  # numbers on the host: reading a GPU table waits for the GPU
        for t in range(self.T, 0, -1):
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            mu, x0_hat = self.p_mean(eps_theta, x, tt, clip)
            if trace is not None:
                trace.append((t, x, x0_hat))
            z = torch.randn(shape, generator=generator, device=device) if t > 1 else torch.zeros_like(x)
            x = mu + sigmas[t] * z
        if trace is not None:
            trace.append((0, x, x))
        return x

    # --------------------------------------------------------------------------------------------------------
    # DDIM (Song et al. 2021): the same network, a non-Markovian process with the same marginals Eq. (4)
    # --------------------------------------------------------------------------------------------------------

    def ddim_timesteps(self, S: int) -> list[int]:
        """A sub-sequence tau of S steps: evenly spaced in 1..T, from 1 to T (a variant of
        the 'linear' choice of Song et al.'s Appendix D.2, which spaces tau_i = floor(c i) and need not end at T).

        S = 1 is the single step T -> 0: the sampler's x_T ~ N(0, I) is only noise at t = T, so tau must end
        there however short it is."""
        if not 1 <= S <= self.T:
            raise ValueError(f"S must be in 1..{self.T}, got {S}")
        if S == 1:
            return [self.T]
        return [round(1 + i * (self.T - 1) / (S - 1)) for i in range(S)]  # spacing >= 1: S distinct steps

    @torch.no_grad()
    def sample_ddim(self, eps_theta, shape, S: int = 50, eta: float = 0.0, clip: bool = True, generator=None,
                    device="cpu", x_T: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
        """Song et al. Eq. (12) along tau_S > ... > tau_1 > 0, with sigma from their Eq. (16) scaled by eta:
        eta = 0 is the deterministic DDIM, eta = 1 with S = T is DDPM's ancestral sampler with sigma^2 = beta_tilde.

        x_{t-1} = sqrt(ab_{t-1}) x_hat_0 + sqrt(1 - ab_{t-1} - sigma_t^2) eps_theta + sigma_t z  (ab = alpha_bar)
        """
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
        taus = self.ddim_timesteps(S)
        alpha_bar = self.alpha_bar.tolist()  # numbers on the host: reading a GPU table waits for the GPU
        for t, s in zip(reversed(taus), [*reversed(taus[:-1]), 0]):  # t -> s, the next smaller step
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            ab_t, ab_s = alpha_bar[t], alpha_bar[s]
            eps = eps_theta(x, tt)
            x0_hat = self.predict_x0(x, tt, eps)
            if clip:  # clamp x_hat_0 and keep (x_hat_0, eps) consistent with x_t
                x0_hat = x0_hat.clamp(-1, 1)
                eps = self.predict_eps(x, tt, x0_hat)
            if trace is not None:
                trace.append((t, x, x0_hat))
            sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))  # Song et al. Eq. (16)
            x = math.sqrt(ab_s) * x0_hat + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps  # Song et al. Eq. (12)
            if s > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        if trace is not None:
            trace.append((0, x, x))
        return x

    @torch.no_grad()
    def ddim_invert(self, eps_theta, x0: torch.Tensor, S: int = 50) -> torch.Tensor:
        """Encode x_0 -> x_T by running the eta = 0 update forwards in time (Song et al. §4.3, the Euler step of
        their ODE Eq. (14)): x_s = sqrt(ab_s) x_hat_0 + sqrt(1 - ab_s) eps_theta(x_t, t) for t < s."""
        x = x0
        taus = [0, *self.ddim_timesteps(S)]
        alpha_bar = self.alpha_bar.tolist()
        for t, s in zip(taus[:-1], taus[1:]):
            tt = torch.full((x.shape[0],), max(t, 1), device=x.device, dtype=torch.long)  # eps_theta at t=0 ~ t=1
            eps = eps_theta(x, tt)
            x0_hat = x if t == 0 else self.predict_x0(x, tt, eps)
            x = math.sqrt(alpha_bar[s]) * x0_hat + math.sqrt(1 - alpha_bar[s]) * eps
        return x

    # --------------------------------------------------------------------------------------------------------
    # The variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 (Eq. 5), in bits per dimension
    # --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def bits_per_dim(self, eps_theta, x0: torch.Tensor, sigma: str = "beta", num_t: int = 0,
                     generator=None) -> torch.Tensor:
        """-log p_theta(x_0) <= L in bits/dim, per image: (B,). x_0 holds 8-bit images scaled to [-1, 1].

        ``num_t = 0`` sums all T terms; ``num_t = k`` estimates the sum over t = 2..T from k uniform draws
        of t per image (unbiased; each image draws its own t's, so the spread over images includes the noise
        of drawing them). sigma_1^2 = beta_1 in the decoder, since beta_tilde_1 = 0."""
        B, D = x0.shape[0], x0[0].numel()
        sigma2 = self.sigma2(sigma).clone()
        sigma2[1] = self.beta[1]
        # L_T = KL(q(x_T | x_0) || N(0, I)), ~0 for both schedules (alpha_bar_T ~ 4e-5 or less)
        ab_T = self.alpha_bar[self.T].item()
        L_T = normal_kl(math.sqrt(ab_T) * x0, math.log(1 - ab_T), torch.zeros_like(x0), 0.0).flatten(1).sum(1)
        # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t = 2..T (Eq. 5)
        if num_t == 0:
            draws = [torch.full((B,), t, dtype=torch.long) for t in range(2, self.T + 1)]
        else:
            draws = torch.randint(2, self.T + 1, (num_t, B), generator=generator).unbind(0)  # (B,) each
        L_mid = torch.zeros(B, device=x0.device)
        for tt in draws:
            tt = tt.to(x0.device)
            xt = self.q_sample(x0, tt, torch.randn(x0.shape, generator=generator, device=x0.device))
            mu_tilde, beta_tilde = self.q_posterior(x0, xt, tt)
            mu_theta, _ = self.p_mean(eps_theta, xt, tt, clip=False)
            L_mid += normal_kl(mu_tilde, beta_tilde.log(), mu_theta, _gather(sigma2, tt, xt).log()).flatten(1).sum(1)
        if num_t:
            L_mid *= (self.T - 1) / num_t
        # L_0 = -log p_theta(x_0 | x_1), the discretized Gaussian decoder (Eq. 13)
        t1 = torch.ones(B, device=x0.device, dtype=torch.long)
        x1 = self.q_sample(x0, t1, torch.randn(x0.shape, generator=generator, device=x0.device))
        mu_1, _ = self.p_mean(eps_theta, x1, t1, clip=False)
        L_0 = -discretized_gaussian_log_likelihood(x0, mu_1, math.log(sigma2[1])).flatten(1).sum(1)
        return (L_T + L_mid + L_0) / (D * math.log(2))  # nats per image -> bits per dimension


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element; logvars may be tensors or floats."""
    logvar1, logvar2 = torch.as_tensor(logvar1, dtype=mean1.dtype), torch.as_tensor(logvar2, dtype=mean1.dtype)
    return 0.5 * (logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2).pow(2) * (-logvar2).exp() - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, logvar: float) -> torch.Tensor:
    """log of the mass N(mean, e^logvar) puts on the 8-bit bin of each pixel of x in [-1, 1] (Eq. 13):
    bins [x - 1/255, x + 1/255], with the edge bins extended to -inf at x = -1 and +inf at x = 1."""
    inv_std = math.exp(-0.5 * logvar)
    cdf = lambda v: 0.5 * (1 + torch.erf(v * inv_std / math.sqrt(2)))  # noqa: E731, Phi((v - mean) / std)
    centred = x - mean
    cdf_plus = torch.where(x > 0.999, torch.ones_like(x), cdf(centred + 1 / 255))
    cdf_minus = torch.where(x < -0.999, torch.zeros_like(x), cdf(centred - 1 / 255))
    return (cdf_plus - cdf_minus).clamp(min=1e-12).log()
