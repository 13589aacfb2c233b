"""The equations of diffusion.py against Monte Carlo, brute force and each other."""

import math

import pytest
import torch
from diffusion import Diffusion, cosine_betas, discretized_gaussian_log_likelihood, normal_kl
from model import build_unet


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(T=1000)


def test_schedule_matches_the_paper(diffusion):
    assert diffusion.beta[1].item() == pytest.approx(1e-4) and diffusion.beta[1000].item() == pytest.approx(0.02)
    assert diffusion.alpha_bar[0] == 1 and diffusion.alpha_bar[1000] < 1e-4  # x_T is nearly pure noise
    cos = Diffusion(T=1000, schedule="cosine")
    assert (cos.alpha_bar[1:] < cos.alpha_bar[:-1]).all() and cos.alpha_bar[500] > diffusion.alpha_bar[500]


@pytest.mark.parametrize("T", [50, 1000])
def test_cosine_schedule_is_nichol_dhariwal_eq_17(T):
    """Nichol & Dhariwal 2021, Eq. (17): alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008,
    and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped at 0.999. The cumulative product of 1 - beta_t is
    f(t) / f(0) up to the first clipped step."""
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    want = torch.tensor([f(t) / f(0) for t in range(T + 1)], dtype=torch.float64)  # (T+1,), Eq. (17)
    betas = cosine_betas(T)  # (T,), beta_1..beta_T
    clipped = (1 - want[1:] / want[:-1]) > 0.999
    assert clipped[-1] and clipped.sum() <= 2  # f(T) = 0: the last beta is 1 before clipping
    assert (betas[clipped] == 0.999).all()
    first = int(clipped.nonzero()[0])  # index of the first clipped beta, i.e. t = first + 1
    got = torch.cumprod(1 - betas, 0)[:first]  # alpha_bar_1..alpha_bar_first
    torch.testing.assert_close(got, want[1:first + 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Diffusion(T=T, schedule="cosine").alpha_bar[:first + 1], want[:first + 1],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [50, 100, 250])
def test_linear_schedule_ends_in_noise_for_any_T(T):
    # beta_1 and beta_T are given for T = 1000 and scaled by 1000/T: the mean of the last step's
    # x_T = sqrt(alpha_bar_T) x_0 + ... stays under 1 % of x_0's scale, as for T = 1000 (0.64 %).
    d = Diffusion(T=T)
    assert d.alpha_bar[T].sqrt() < 1e-2
    assert d.beta[1].item() == pytest.approx(1e-4 * 1000 / T) and d.beta[T].item() == pytest.approx(20 / T)


def test_unknown_schedule_or_variance_is_an_error(diffusion):
    with pytest.raises(ValueError, match="schedule"):
        Diffusion(T=10, schedule="cosin")
    with pytest.raises(ValueError, match="variance"):
        diffusion.sigma2("beta-tilde")
    assert diffusion.sigma2("beta_tilde")[1] == 0 and diffusion.sigma2("beta")[1] > 0  # the two named kinds differ


def test_to_moves_every_table_and_keeps_its_values():
    """Training moves the schedule to the GPU once (Diffusion.to); a table left behind would be copied from the
    host at every a[t]. The meta device stands in for the GPU."""
    d, cpu = Diffusion(T=10).to("meta"), Diffusion(T=10)
    tables = {name: v for name, v in vars(d).items() if isinstance(v, torch.Tensor)}
    assert len(tables) == 5 and all(v.device.type == "meta" for v in tables.values())
    cpu.to("cpu")
    assert all(torch.equal(getattr(cpu, name), getattr(Diffusion(T=10), name)) for name in tables)


def test_q_sample_has_the_moments_of_eq_4(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0]).reshape(4, 1, 1, 1).expand(4, 1, 1, 20000)
    t = torch.tensor([1, 100, 500, 1000])
    xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))  # (4, 1, 1, 20000)
    ab = diffusion.alpha_bar[t].float()
    torch.testing.assert_close(xt.mean(-1).flatten(), ab.sqrt() * x0[:, 0, 0, 0], atol=0.025, rtol=0)
    torch.testing.assert_close(xt.var(-1).flatten(), 1 - ab, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("t", [2, 10, 300, 1000])
def test_posterior_eqs_6_7_equal_bayes_rule_by_brute_force(diffusion, t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), computed on a 1-D grid."""
    x0, xt = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    grid = torch.linspace(-6, 6, 400_001, dtype=torch.float64)  # values of x_{t-1}
    a, ab_prev = diffusion.alpha[t], diffusion.alpha_bar[t - 1]
    log_lik = -(xt - a.sqrt() * grid) ** 2 / (2 * (1 - a))  # q(x_t | x_{t-1}), Eq. (2)
    log_prior = -(grid - ab_prev.sqrt() * x0) ** 2 / (2 * (1 - ab_prev))  # q(x_{t-1} | x_0), Eq. (4)
    w = torch.softmax(log_lik + log_prior, 0)
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    mu, beta_tilde = diffusion.q_posterior(x0.float().reshape(1, 1), xt.float().reshape(1, 1), torch.tensor([t]))
    assert mu.item() == pytest.approx(mean.item(), abs=1e-4)
    assert beta_tilde.item() == pytest.approx(var.item(), rel=1e-3)


def test_perfect_eps_predictor_has_zero_l_simple(diffusion):
    x_star = torch.rand(1, 1, 28, 28) * 2 - 1  # data = one image, so eps is a function of (x_t, t)
    x0 = x_star.expand(16, 1, 28, 28)
    perfect = lambda xt, t: diffusion.predict_eps(xt, t, x0)  # noqa: E731
    assert diffusion.loss_simple(perfect, x0).item() < 1e-8
    assert diffusion.loss_simple(lambda xt, t: torch.zeros_like(xt), x0).item() == pytest.approx(1.0, abs=0.1)


def test_l_simple_draws_t_uniformly_from_1_to_T():
    """Algorithm 1's t ~ U{1, ..., T}: every step, t = T included and t = 0 (no noise) never."""
    d, seen = Diffusion(T=5), []

    def spy(xt, t):
        seen.append(t)
        return torch.zeros_like(xt)

    torch.manual_seed(0)
    d.loss_simple(spy, torch.zeros(20000, 1, 1, 1))
    counts = torch.bincount(seen[0], minlength=6)
    assert counts[0] == 0 and (counts[1:] - 4000).abs().max() < 4 * 3200 ** 0.5, counts  # binomial sd sqrt(3200)


def test_eq_11_is_the_posterior_mean_of_the_predicted_x0(diffusion):
    xt, t = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([2, 40, 900])
    eps_theta = lambda x, t: torch.tanh(x) * 0.5 + 0.01 * t.double()[:, None, None, None]  # noqa: E731
    mu_11, x0_hat = diffusion.p_mean(eps_theta, xt, t, clip=False)
    mu_7, _ = diffusion.q_posterior(x0_hat, xt, t)
    torch.testing.assert_close(mu_11, mu_7, atol=1e-10, rtol=1e-10)
    assert (mu_11 - diffusion.p_mean(eps_theta, xt, t, clip=True)[0]).abs().max() > 0.01  # x_hat_0 was clipped


def _some_eps_theta(d):
    """A cheap, nonlinear, t-dependent stand-in for a network (the sampler identities hold for any eps_theta)."""
    def eps_theta(x, t):
        ab = d.alpha_bar[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * torch.tanh(1.5 * x) + 0.1 * torch.sin(3 * x)
    return eps_theta


def test_ddim_eta_1_with_all_steps_is_the_ancestral_sampler():
    T, shape = 50, (4, 1, 8, 8)
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    a = d.sample_ddpm(eps_theta, shape, sigma="beta_tilde", generator=torch.Generator().manual_seed(1))
    b = d.sample_ddim(eps_theta, shape, S=T, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # float32 round-off over 50 steps
    c = d.sample_ddim(eps_theta, shape, S=T, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert (a - c).abs().max() > 0.05  # eta matters, so the check above could fail
    e = d.sample_ddpm(eps_theta, shape, sigma="beta", generator=torch.Generator().manual_seed(1))
    assert (a - e).abs().max() > 1e-3  # sigma^2 = beta is another sampler


def test_ddim_eta_0_is_deterministic_given_x_T():
    T, shape = 50, (3, 1, 8, 8)
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = d.sample_ddim(eps_theta, shape, S=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = d.sample_ddim(eps_theta, shape, S=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = d.sample_ddim(eps_theta, shape, S=10, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    assert d.ddim_timesteps(10)[0] == 1 and d.ddim_timesteps(10)[-1] == T and len(d.ddim_timesteps(10)) == 10


def _record_randn(monkeypatch):
    """Every z the samplers draw, in order: torch.randn wrapped (diffusion.py draws its noise with torch.randn)."""
    draws, randn = [], torch.randn

    def recording(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(torch, "randn", recording)
    return draws


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_on_a_sub_sequence_adds_eta_times_song_eq_16_noise_and_none_at_the_last_step(monkeypatch, eta):
    """S = 10 of T = 1000, eta = 1: each step t -> s (the next smaller step of tau, 0 after tau_1 = 1) is
    x_s = mean + sigma z with z the sampler's own draw, replayed, mean = sqrt(ab_s) x_hat_0 + sqrt(1 - ab_s - sigma^2)
    eps (Song et al. Eq. 12, eps the one consistent with the clipped x_hat_0) and sigma^2 = (1 - ab_s)/(1 - ab_t)
    (1 - ab_t/ab_s) (Eq. 16), written out here from alpha_bar. sigma uses ab_s of the sub-sequence: the one-step
    posterior's ab_{t-1} would give 0.141 instead of 0.938 at the first step. The step to x_0 adds no noise."""
    T, S, shape = 1000, 10, (2, 1, 8, 8)
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    draws, trace = _record_randn(monkeypatch), []
    x0 = d.sample_ddim(eps_theta, shape, S=S, eta=eta, x_T=x_T, trace=trace,
                       generator=torch.Generator().manual_seed(1))
    taus = [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]
    assert [t for t, _, _ in trace] == [*reversed(taus), 0] and len(draws) >= S - 1
    ab = d.alpha_bar  # float64, alpha_bar_0 = 1
    sigmas = []
    for i, (t, s) in enumerate(zip(reversed(taus), [*reversed(taus[:-1]), 0])):
        x_t, x_s = trace[i][1].double(), trace[i + 1][1].double()
        ab_t, ab_s = ab[t].item(), ab[s].item()
        eps = eps_theta(x_t, torch.full((2,), t))
        x0_hat = ((x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)).clamp(-1, 1)
        eps = (x_t - math.sqrt(ab_t) * x0_hat) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))  # Eq. (16) times eta
        mean = math.sqrt(ab_s) * x0_hat + math.sqrt(1 - ab_s - sigma ** 2) * eps  # Eq. (12)
        if s == 0:  # ab_0 = 1: sigma = 0 and the last step returns x_hat_0 itself
            assert sigma == 0 and torch.equal(x0, trace[i][2]), (x0 - trace[i][2]).abs().max()
            torch.testing.assert_close(x_s, mean, atol=1e-5, rtol=0)
            continue
        sigmas.append(sigma)
        torch.testing.assert_close(x_s - mean, sigma * draws[i].double(), atol=1e-5, rtol=0, msg=f"{t} -> {s}")
    assert sigmas[0] == pytest.approx(0.938 * eta, abs=1e-3)  # t = 1000 -> s = 889
    assert min(sigmas) > 250 * 1e-5  # 112 -> 1 is the quietest (0.0100 eta): still ~500 times the tolerance


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_ancestral_steps_add_sigma_t_z_and_the_last_step_adds_none(monkeypatch, sigma):
    """Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z with z the sampler's own draw, replayed, for t = T..2,
    sigma_t^2 = beta_t or beta_tilde_t (written out here); at t = 1, x_0 = mu_theta(x_1, 1) exactly, for both
    choices (sigma_1^2 = beta_1 = 1e-4 * 1000/T is not 0, so drawing there would show)."""
    T, shape = 50, (2, 1, 8, 8)
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    draws, trace = _record_randn(monkeypatch), []
    x0 = d.sample_ddpm(eps_theta, shape, sigma=sigma, x_T=x_T, trace=trace, generator=torch.Generator().manual_seed(1))
    assert [t for t, _, _ in trace] == list(range(T, -1, -1)) and len(draws) >= T - 1
    beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * 1000 / T  # beta_1..beta_T
    ab = torch.cumprod(1 - beta, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    var = beta if sigma == "beta" else (1 - ab_prev) / (1 - ab) * beta  # Eq. (7)'s beta_tilde
    for i, t in enumerate(range(T, 0, -1)):
        x_t, x_prev = trace[i][1], trace[i + 1][1]
        mu = d.p_mean(eps_theta, x_t, torch.full((2,), t), clip=True)[0]
        if t == 1:
            assert torch.equal(x0, mu), (sigma, (x0 - mu).abs().max())
            continue
        torch.testing.assert_close(x_prev - mu, math.sqrt(var[t - 1]) * draws[i], atol=1e-5, rtol=0,
                                   msg=f"{sigma} t = {t}")
    assert math.sqrt(beta[0]) == pytest.approx(0.0447, abs=1e-4)  # what a draw at t = 1 would add, times z


def test_ddim_timesteps_end_at_T_for_every_S():
    for T in (2, 7, 50, 1000):
        d = Diffusion(T=T)
        for S in range(1, T + 1):
            tau = d.ddim_timesteps(S)
            assert len(tau) == S and tau[-1] == T and tau[0] >= 1, (T, S, tau)
            assert all(a < b for a, b in zip(tau, tau[1:])), (T, S, tau)
        assert d.ddim_timesteps(1) == [T] and d.ddim_timesteps(T) == list(range(1, T + 1))
        for S in (0, T + 1):
            with pytest.raises(ValueError):
                d.ddim_timesteps(S)
    # the sub-sequence the README's DDIM numbers were measured with
    assert Diffusion(T=1000).ddim_timesteps(10) == [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]


def test_one_step_ddim_denoises_from_t_equal_T():
    """S = 1 is one jump T -> 0: the result is x_hat_0 predicted from x_T at t = T (it was t = 1 once)."""
    T = 50
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = d.sample_ddim(eps_theta, x_T.shape, S=1, eta=0.0, clip=False, x_T=x_T)
    tt = torch.full((2,), T, dtype=torch.long)
    torch.testing.assert_close(x0, d.predict_x0(x_T, tt, eps_theta(x_T, tt)))
    t1 = torch.ones(2, dtype=torch.long)
    assert (x0 - d.predict_x0(x_T, t1, eps_theta(x_T, t1))).abs().max() > 0.1  # t = 1 gives another image


def test_traces_pair_each_x_t_with_the_x0_predicted_from_it():
    """Fig. 6's data: (t, x_t, x_hat_0(x_t, t)) from t = T down, then (0, x_0, x_0)."""
    T, shape = 20, (2, 1, 8, 8)
    d = Diffusion(T=T)
    eps_theta = _some_eps_theta(d)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    trace = []
    x0 = d.sample_ddpm(eps_theta, shape, generator=torch.Generator().manual_seed(1), x_T=x_T, trace=trace)
    assert [t for t, _, _ in trace] == list(range(T, -1, -1))
    assert torch.equal(trace[0][1], x_T) and torch.equal(trace[-1][1], x0) and torch.equal(trace[-1][2], x0)
    for t, xt, x0_hat in trace[:-1]:
        torch.testing.assert_close(x0_hat, d.p_mean(eps_theta, xt, torch.full((2,), t), clip=True)[1])
    trace = []
    x0 = d.sample_ddim(eps_theta, shape, S=5, eta=0.0, x_T=x_T, trace=trace)
    assert [t for t, _, _ in trace] == [*reversed(d.ddim_timesteps(5)), 0]
    assert torch.equal(trace[0][1], x_T) and torch.equal(trace[-1][1], x0)
    for t, xt, x0_hat in trace[:-1]:
        tt = torch.full((2,), t)
        torch.testing.assert_close(x0_hat, d.predict_x0(xt, tt, eps_theta(xt, tt)).clamp(-1, 1))


def test_ddim_inversion_then_decoding_reconstructs_x0(diffusion):
    """With the exact eps-predictor of Gaussian data N(m, s^2), E[eps | x_t] in closed form, the deterministic
    DDIM map is smooth and invertible: encoding x_0 -> x_T and decoding back must land on x_0."""
    m, s2 = 0.2, 0.1

    def eps_theta(xt, t):
        ab = diffusion.alpha_bar[t].float().reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * m) / (ab * s2 + 1 - ab)

    x0 = m + math.sqrt(s2) * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for S in (250, 1000):  # inversion is the Euler step run backwards: exact as the steps shrink
        x_T = diffusion.ddim_invert(eps_theta, x0, S=S)
        assert 0.5 < x_T.std() < 1.5  # an encoding at the noise scale, not x_0 itself
        x0_rec = diffusion.sample_ddim(eps_theta, x0.shape, S=S, eta=0.0, clip=False, x_T=x_T)
        errors.append((x0_rec - x0).abs().max().item())
    assert errors[1] < 0.02 and errors[1] < 0.5 * errors[0], errors


def test_ddim_inversion_is_the_eta_0_update_run_forwards():
    """Written out on T = S = 10: x_s = sqrt(ab_s) x_hat_0 + sqrt(1 - ab_s) eps_theta(x_t, max(t, 1)), from
    x_hat_0 = x_0 itself on the first step (t = 0, where there is no noise to remove) and Eq. (4) solved for x_0
    after it."""
    d = Diffusion(T=10)
    eps_theta = _some_eps_theta(d)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    ab, x = d.alpha_bar.tolist(), x0
    for t in range(10):
        eps = eps_theta(x, torch.full((3,), max(t, 1)))
        x0_hat = x0 if t == 0 else (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        x = math.sqrt(ab[t + 1]) * x0_hat + math.sqrt(1 - ab[t + 1]) * eps
    torch.testing.assert_close(d.ddim_invert(eps_theta, x0, S=10), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mean1, logvar1, mean2, logvar2", [
    (0.3, math.log(0.5), -0.4, math.log(2.0)), (1.2, math.log(0.02), 1.0, math.log(0.03)),
    (-0.5, math.log(3.0), 0.5, 0.0), (0.0, math.log(1e-4), 0.01, math.log(2e-4))])
def test_normal_kl_matches_monte_carlo(mean1, logvar1, mean2, logvar2):
    """KL(q || p) = E_q[log q(x) - log p(x)], estimated from 200,000 draws of q: the closed form behind the bound's
    terms (Eq. 5) lies within 4 standard errors of the estimate."""
    torch.manual_seed(0)
    q = torch.distributions.Normal(torch.tensor(mean1, dtype=torch.float64), math.exp(0.5 * logvar1))
    p = torch.distributions.Normal(torch.tensor(mean2, dtype=torch.float64), math.exp(0.5 * logvar2))
    x = q.sample((200_000,))
    log_ratio = q.log_prob(x) - p.log_prob(x)  # (200000,)
    mc, se = log_ratio.mean().item(), (log_ratio.std() / math.sqrt(len(x))).item()
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    m1, m2 = f64(mean1), f64(mean2)
    kl = normal_kl(m1, f64(logvar1), m2, f64(logvar2)).item()
    assert se < 0.01 and abs(kl - mc) < 4 * se, (kl, mc, se)
    assert normal_kl(m1, logvar1, m2, logvar2).item() == pytest.approx(kl, rel=1e-12)  # float logvars, as for L_T
    assert normal_kl(m1, logvar1, m1, logvar1).item() == 0  # KL(q || q) = 0


def test_discretized_decoder_is_a_distribution_over_256_levels():
    x = (torch.arange(256).float() / 127.5 - 1).reshape(256, 1)
    for mean, logvar in [(0.0, math.log(1e-4)), (0.93, math.log(0.05)), (-1.2, math.log(0.5))]:
        p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), logvar).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_bits_per_dim_is_positive_and_finite():
    from shared.data import load_images, to_symmetric

    T = 10
    d, net = Diffusion(T=T), build_unet("tiny", dropout=0.0).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # not the zero init: a non-trivial eps_theta
    eps_theta = lambda x, t: net(x, t * 100)  # noqa: E731
    x0 = to_symmetric(load_images("synthetic")[0][:4])
    for sigma in ("beta", "beta_tilde"):
        bpd = d.bits_per_dim(eps_theta, x0, sigma=sigma, generator=torch.Generator().manual_seed(0))  # (4,)
        assert bpd.shape == (4,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    est = d.bits_per_dim(eps_theta, x0, num_t=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(est).all() and (est > 0).all()


def test_the_random_t_bound_is_unbiased_for_the_full_sum():
    """E over t-draws and noise of the num_t estimate = E over noise of the sum of all T terms (Eq. 5)."""
    T, n = 10, 4000
    d = Diffusion(T=T)
    eps_theta = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)  # noqa: E731, a fixed imperfect predictor
    x0 = torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 1, 4, 4).repeat(n, 1, 1, 1)  # n copies of 2 images
    g = torch.Generator().manual_seed(0)
    full = d.bits_per_dim(eps_theta, x0, generator=g).view(n, 2)
    est = d.bits_per_dim(eps_theta, x0, num_t=2, generator=g).view(n, 2)
    se = (full.var(0) / n + est.var(0) / n).sqrt()
    assert ((est.mean(0) - full.mean(0)).abs() < 4 * se).all(), (est.mean(0), full.mean(0), se)
    assert (est.std(0) > 2 * full.std(0)).all()  # the t-draws add their own noise to each image's estimate


def test_discretized_decoder_masses_are_normal_cdf_differences_over_the_8_bit_bins():
    """Eq. (13): level x gets N(m, s^2)'s mass on [x - 1/255, x + 1/255]; the bin of x = -1 reaches down to -inf
    and that of x = 1 up to +inf. Summing to 1 alone holds for any monotone cdf (e.g. a std off by sqrt 2)."""
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).reshape(256, 1)  # the 256 levels in [-1, 1]
    for mean, logvar in [(0.0, math.log(1e-4)), (0.31, math.log(0.01)), (0.93, math.log(0.05)),
                         (-0.97, math.log(0.2)), (-1.2, math.log(0.5))]:
        p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), logvar).exp().flatten()  # (256,)
        N = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), math.exp(0.5 * logvar))
        want = N.cdf(x.flatten() + 1 / 255) - N.cdf(x.flatten() - 1 / 255)  # interior levels
        want[0] = N.cdf(torch.tensor(-1 + 1 / 255, dtype=torch.float64))  # (-inf, -1 + 1/255]
        want[-1] = 1 - N.cdf(torch.tensor(1 - 1 / 255, dtype=torch.float64))  # [1 - 1/255, inf)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-11)
        assert want.max() > 0.01  # some bin carries real mass, so the comparison is not one of zeros


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bits_per_dim_of_a_perfect_predictor_is_the_closed_form_bound(sigma, seed):
    """With data = one fixed x_0 and the exact eps_theta, mu_theta(x_t, t) = mu_tilde_t(x_t, x_0) for every x_t
    draw, so each term of Eq. (5) is known in closed form (per pixel, computed here without diffusion.py):
      L_T = KL(N(sqrt(ab_T) x_0, 1 - ab_T) || N(0, 1)),
      L_{t-1} = KL(N(0, beta_tilde_t) || N(0, sigma_t^2)) for t = 2..T (0 when sigma_t^2 = beta_tilde_t),
      L_0 = -log of N(x_0, beta_1)'s mass on x_0's bin: 2 Phi(c) - 1 inside, Phi(c) at x_0 = +-1,
            c = 1/(255 sqrt(beta_1)),
    and the bound is their sum over t and pixels divided by D ln 2. A schedule with ab_T = 0.32 keeps L_T visible."""
    T = 10
    d = Diffusion(T=T, beta_1=1e-4, beta_T=2e-3)  # betas 0.01 .. 0.2 (both scaled by 1000/T)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (2, 1, 4, 8), generator=g)
    k[0, 0, 0, :3] = torch.tensor([0, 255, 127])
    k[1, 0, 3, -2:] = torch.tensor([255, 0])
    x0 = k.float() / 127.5 - 1  # (2, 1, 4, 8), 8-bit levels in [-1, 1] with both edges in each image
    perfect = lambda xt, t: d.predict_eps(xt, t, x0)  # noqa: E731
    bpd = d.bits_per_dim(perfect, x0, sigma=sigma, generator=g)  # (2,)

    beta = torch.linspace(0.01, 0.2, T, dtype=torch.float64)  # beta_1..beta_T
    ab = torch.cumprod(1 - beta, 0)  # alpha_bar_1..alpha_bar_T
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta  # Eq. (7); beta_tilde_1 = 0
    Nd = torch.distributions.Normal
    x = x0.double().flatten(1)  # (2, 32)
    D = x.shape[1]
    L_T = torch.distributions.kl_divergence(Nd(ab[-1].sqrt() * x, (1 - ab[-1]).sqrt()), Nd(0.0, 1.0)).sum(1)
    s2 = beta if sigma == "beta" else beta_tilde
    L_mid = D * torch.distributions.kl_divergence(Nd(0.0, beta_tilde[1:].sqrt()), Nd(0.0, s2[1:].sqrt())).sum()
    Phi_c = Nd(0.0, 1.0).cdf(torch.tensor(1 / (255 * math.sqrt(beta[0].item())), dtype=torch.float64))
    edge = (x == -1) | (x == 1)
    L_0 = -torch.where(edge, Phi_c.log(), (2 * Phi_c - 1).log()).sum(1)
    want = (L_T + L_mid + L_0) / (D * math.log(2))
    torch.testing.assert_close(bpd.double(), want, rtol=1e-5, atol=0)
    assert (L_T / (L_T + L_mid + L_0) > 1e-3).all()  # every term weighs enough for the tolerance to see it
    if sigma == "beta":
        assert (L_mid / (L_T + L_mid + L_0) > 1e-3).all()


def test_bits_per_dim_scores_the_unclipped_mean():
    """The bound is a statement about the model p_theta of Eq. (11), so x_hat_0 is not clipped there (sampling
    clips it). With eps_theta = 0, Eq. (11) is mu_theta = x_t / sqrt(alpha_t), often far outside [-1, 1]; the
    terms are written out here with the sampler's own draws, replayed from the same generator."""
    T, seed = 10, 3
    d = Diffusion(T=T)
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    x0 = torch.linspace(-1, 1, 32).view(1, 1, 4, 8)
    bpd = d.bits_per_dim(zero, x0, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    ab, alpha, beta = d.alpha_bar, d.alpha, d.beta
    L_T = normal_kl(ab[T].sqrt() * x0, (1 - ab[T]).log(), torch.zeros_like(x0), 0.0).sum()
    total = L_T
    for t in range(2, T + 1):
        xt = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * torch.randn(x0.shape, generator=g)
        mu_tilde = (ab[t - 1].sqrt() * beta[t] * x0 + alpha[t].sqrt() * (1 - ab[t - 1]) * xt) / (1 - ab[t])  # Eq. 7
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * beta[t]
        total = total + normal_kl(mu_tilde, beta_tilde.log(), xt / alpha[t].sqrt(), beta[t].log()).sum()
    x1 = ab[1].sqrt() * x0 + (1 - ab[1]).sqrt() * torch.randn(x0.shape, generator=g)
    total = total - discretized_gaussian_log_likelihood(x0, x1 / alpha[1].sqrt(), beta[1].log().item()).sum()
    torch.testing.assert_close(bpd.double(), (total / (32 * math.log(2))).double().view(1), rtol=1e-5, atol=0)
