import math

import torch
import torch.nn.functional as F
from diffusion import (
    ddim_sample,
    ddpm_loss,
    guided_prediction,
    in_interval,
    linear_alpha_bar,
    ode_sample,
    q_sample,
    rf_interpolate,
    rf_loss,
    sample,
    sample_t,
)
from model import DiT, DiTConfig, dit_config
from test_model import randomize


def test_cfg_scale_one_is_conditional_and_guides_all_channels():
    model = randomize(DiT(DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2))).eval()
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 28, 28), torch.tensor([5.0, 400.0, 900.0]), torch.tensor([1, 4, 7])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert torch.allclose(guided_prediction(model, x, t, y, 1.0, 10), cond, atol=1e-6)
    assert torch.allclose(guided_prediction(model, x, t, y, 0.0, 10), uncond, atol=1e-5)
    guided = guided_prediction(model, x, t, y, 3.0, 10)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
    for ch in range(4):  # every channel is guided (DiT's official code guides only 3 of 4)
        assert not torch.allclose(guided[:, ch], cond[:, ch], atol=1e-3)
    assert torch.allclose(guided_prediction(model, x, t, y, 3.0, 10, guide=False), cond, atol=1e-6)


def test_cfg_is_a_line_in_the_scale_through_both_predictions():
    """Eq. (6) is affine in s: s = 0 gives the unconditional, s = 1 the conditional prediction. guided_prediction
    answers s = 1 by a shortcut (one unguided forward), so s = 1 is checked on the batched line itself, as the
    midpoint of s = 0.5 and s = 1.5."""
    model = randomize(DiT(DiTConfig(in_channels=2, hidden_size=32, depth=1, num_heads=2)), seed=1).eval()
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 2, 28, 28), torch.tensor([20.0, 500.0, 990.0]), torch.tensor([0, 3, 9])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the line is not a point
    g = {s: guided_prediction(model, x, t, y, s, 10) for s in (0.0, 0.5, 1.5, 2.5)}
    assert torch.allclose(g[0.0], uncond, atol=1e-5)
    assert torch.allclose((g[0.5] + g[1.5]) / 2, cond, atol=1e-5)  # s = 1 on the line is the conditional output
    assert torch.allclose(g[2.5] - g[1.5], g[1.5] - g[0.5], atol=1e-5)  # equal steps in s, equal steps out


def test_q_sample_matches_closed_form_moments():
    alpha_bar = linear_alpha_bar()
    assert abs(alpha_bar[0] - (1 - 1e-4)) < 1e-12 and 0 < alpha_bar[-1] < 1e-4
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = q_sample(x0, t, torch.randn_like(x0), alpha_bar)
    ab = float(alpha_bar[300])
    assert abs(xt.mean() - ab ** 0.5 * 0.7) < 0.02 and abs(xt.var() - (1 - ab)) < 0.02


def test_ddpm_step_draws_from_the_true_posterior_of_the_respaced_chain():
    """eta = 1 (Eq. 4-5): each step from t to the next grid time s draws x_s ~ q(x_s | x_t, x0_hat). Its mean and
    variance are written out here by conditioning the joint Gaussian of (x_s, x_t) given x_0 (x_s from Eq. 2;
    x_t = sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) noise), not from Eq. (5). On the full 1000-step chain
    the variance must be DDPM's beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t with the schedule's own beta_t."""
    alpha_bar = linear_alpha_bar()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # Eq. (1)'s schedule, written out again

    def eps_hat(x):  # any eps-prediction will do (clip=False below: x0_hat is used as predicted)
        return 0.3 * x + 0.1

    times = []

    def model(x, t, y):
        times.append(int(t[0]))
        return eps_hat(x)

    y = torch.zeros(2, dtype=torch.long)
    for steps in (1000, 10, 7):  # adjacent steps, then two respaced grids
        times.clear()
        noise, traj = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(steps)), []
        sample(model, noise, y, "ddpm", "ddpm", steps, 1.0, 10, generator=torch.Generator().manual_seed(1),
               trajectory=traj, clip=False)
        assert len(times) == steps and times[0] == 999 and times[-1] == 0
        replay = torch.Generator().manual_seed(1)  # the sampler's z, drawn again in the same order
        xs = [noise.double()] + [x.double() for x in traj]
        for i, t in enumerate(times):
            ab_t = float(alpha_bar[t])
            ab_s = float(alpha_bar[times[i + 1]]) if i + 1 < steps else 1.0  # the last step lands on x_0
            x_t = xs[i]
            x0 = (x_t - (1 - ab_t) ** 0.5 * eps_hat(x_t)) / ab_t ** 0.5
            cov = (ab_t / ab_s) ** 0.5 * (1 - ab_s)  # Cov(x_s, x_t | x_0), per coordinate
            mean = ab_s ** 0.5 * x0 + cov / (1 - ab_t) * (x_t - ab_t ** 0.5 * x0)
            var = (1 - ab_s) - cov ** 2 / (1 - ab_t)
            if i + 1 == steps:
                assert var == 0 and torch.allclose(xs[i + 1], mean, atol=1e-4)
                continue
            z = torch.randn(x_t.shape, generator=replay).double()
            r = xs[i + 1] - mean
            sigma = float((r * z).sum() / (z * z).sum())  # the noise scale the sampler used (least squares)
            assert torch.allclose(r, sigma * z, atol=1e-4), (steps, t)  # the mean is the posterior mean
            assert math.isclose(sigma ** 2, var, rel_tol=1e-3), (steps, t, sigma ** 2, var)
            if steps == 1000:
                assert times[i + 1] == t - 1
                beta_tilde = (1 - ab_s) / (1 - ab_t) * float(betas[t])
                assert math.isclose(sigma ** 2, beta_tilde, rel_tol=1e-3), (t, sigma ** 2, beta_tilde)


def test_clipped_ddim_steps_from_the_clipped_x0():
    """clip=True (README section 7): an x0_hat outside [-1, 1] is clipped, and the step (eta = 0, Eq. 4) uses the
    eps that the clipped x0 and x_t imply, eps' = (x_t - sqrt(abar_t) clip(x0_hat)) / sqrt(1 - abar_t), not the
    network's eps."""
    alpha_bar = linear_alpha_bar().double()
    times = []

    def model(x, t, y):  # x0_hat = x_t (1 + 2 sqrt(1 - abar)) / sqrt(abar): far outside [-1, 1] at high noise
        times.append(int(t[0]))
        return -2 * x

    noise, traj = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double(), []
    ddim_sample(model, noise, torch.zeros(2, dtype=torch.long), 5, 1.0, 10, eta=0.0, alpha_bar=alpha_bar,
                trajectory=traj, clip=True)
    xs, clipped = [noise] + traj, 0
    for i, t in enumerate(times):
        ab_t = float(alpha_bar[t])
        ab_s = float(alpha_bar[times[i + 1]]) if i + 1 < len(times) else 1.0
        x0_hat = (xs[i] + 2 * (1 - ab_t) ** 0.5 * xs[i]) / ab_t ** 0.5
        clipped += int((x0_hat.abs() > 1).sum())
        x0 = x0_hat.clamp(-1, 1)
        eps = (xs[i] - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
        assert torch.allclose(xs[i + 1], ab_s ** 0.5 * x0 + (1 - ab_s) ** 0.5 * eps, atol=1e-6), t
    assert clipped > 100  # the clip did act


def test_rectified_flow_interpolant_and_velocity():
    torch.manual_seed(0)
    x0, eps, t = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.rand(4)
    x_t, v = rf_interpolate(x0, eps, t)
    tb = t[:, None, None, None]
    assert torch.allclose(x_t, (1 - tb) * x0 + tb * eps) and torch.allclose(v, eps - x0)
    assert torch.allclose(rf_interpolate(x0, eps, torch.zeros(4))[0], x0)  # t = 0: data
    assert torch.allclose(rf_interpolate(x0, eps, torch.ones(4))[0], eps)  # t = 1: noise
    h = 1e-3  # v is the time derivative of the path
    fd = (rf_interpolate(x0, eps, t + h)[0] - rf_interpolate(x0, eps, t - h)[0]) / (2 * h)
    assert torch.allclose(fd, v, atol=1e-2)


def test_logit_normal_t():
    torch.manual_seed(0)
    t = sample_t(20000, True, "cpu")
    logit = torch.log(t / (1 - t))
    assert (t > 0).all() and (t < 1).all()
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    u = sample_t(20000, False, "cpu")
    assert abs(u.std() - (1 / 12) ** 0.5) < 0.01  # uniform's std is wider than the logit-normal's
    assert t.std() < u.std() - 0.05
    shifted = torch.logit(sample_t(20000, True, "cpu", mean=1.0, std=0.5))  # Eq. (9)'s two knobs
    assert abs(shifted.mean() - 1) < 0.02 and abs(shifted.std() - 0.5) < 0.02


def test_rf_loss_terms_match_a_brute_force_per_sample_computation():
    """Eq. (10) and (11): the MSE over all coordinates and 1 - (mean over samples of the cosine between the whole
    flattened predicted and true velocities), written out with loops over the numbers."""
    torch.manual_seed(0)
    x0, y = torch.randn(5, 2, 4, 4), torch.zeros(5, dtype=torch.long)
    w = torch.randn(2, 4, 4)
    seen = {}

    def model(x_t, t, y):
        seen["v_theta"] = 0.5 * x_t + w
        return seen["v_theta"]

    torch.manual_seed(1)
    out = rf_loss(model, x0, y, logit_normal=True, cos_weight=0.7)
    torch.manual_seed(1)  # replay rf_loss's draws: t, then eps
    t = sample_t(5, True, "cpu")
    v = torch.randn_like(x0) - x0  # Eq. (8)
    assert torch.allclose(seen["v_theta"], 0.5 * rf_interpolate(x0, v + x0, t)[0] + w)  # the same draws
    sq, cosines = 0.0, []
    for a, b in zip(seen["v_theta"].flatten(1).tolist(), v.flatten(1).tolist()):  # one sample at a time
        sq += sum((p - q) ** 2 for p, q in zip(a, b))
        dot, na, nb = sum(p * q for p, q in zip(a, b)), sum(p * p for p in a), sum(q * q for q in b)
        cosines.append(dot / math.sqrt(na * nb))
    mse, cos = sq / x0.numel(), 1 - sum(cosines) / len(cosines)
    assert math.isclose(out["mse"].item(), mse, rel_tol=1e-5)
    assert math.isclose(out["cos"].item(), cos, rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), mse + 0.7 * cos, rel_tol=1e-5)
    # per sample, over all channels: LightningDiT's per-position cosine across channels is a different number
    per_position = 1 - F.cosine_similarity(seen["v_theta"], v, dim=1).mean().item()
    assert abs(per_position - cos) > 1e-2
    # the direction alone: each sample's v scaled by its own positive factor costs nothing; -v costs 2
    scales = torch.tensor([0.1, 1.0, 5.0, 20.0, 0.01])[:, None, None, None]
    for factor, expected in ((scales, 0.0), (-scales, 2.0)):
        torch.manual_seed(1)
        out = rf_loss(lambda x_t, t, y, f=factor: f * v, x0, y, logit_normal=True, cos_weight=1.0)
        assert abs(out["cos"].item() - expected) < 1e-5 and out["mse"] > 0


def test_ddpm_loss_feeds_the_network_the_step_the_samplers_feed():
    """Eq. (3): t is uniform on {0..T-1}, the same integer steps ddim_sample feeds the network (as floats), and x_t
    is noised at alpha_bar[t] for that very t. So every step of the full 1000-step chain is trained (min 0, max 999)
    and the eps-oracle for a single data point, indexed by the t it receives, has zero loss, as it does in the
    samplers (test_samplers_recover_a_single_data_point_with_the_exact_model). A 1..T convention (t + 1) shifts the
    noise level by one step and costs ~3e-4 (measured; exact: ~1e-14); t drawn from {0..T-2} leaves step 999, where
    sampling starts, untrained."""
    alpha_bar = linear_alpha_bar()
    torch.manual_seed(0)
    x_star = torch.rand(1, 1, 2, 2) * 2 - 1
    seen = []

    def eps_oracle(x, t, y):  # eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab), at the step the network is told
        seen.append(t)
        ab = alpha_bar[t.long().clamp(0, len(alpha_bar) - 1)].float()[:, None, None, None]
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()

    n = 20000  # P(a given step is never drawn) = (1 - 1/1000)^20000 ~ 2e-9
    out = ddpm_loss(eps_oracle, x_star.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), alpha_bar)
    (t_train,) = seen
    assert t_train.dtype == torch.float32 and t_train.shape == (n,) and torch.equal(t_train, t_train.round())
    assert t_train.min().item() == 0 and t_train.max().item() == len(alpha_bar) - 1
    assert out["loss"].item() < 1e-8, out["loss"].item()
    seen.clear()  # the full chain: the sampler's steps are exactly the trained steps
    ddim_sample(lambda x, t, y: seen.append(t) or torch.zeros_like(x), torch.randn(1, 1, 1, 1),
                torch.zeros(1, dtype=torch.long), len(alpha_bar), 1.0, 10, alpha_bar=alpha_bar)
    t_sample = torch.cat(seen)
    assert t_sample.dtype == t_train.dtype and t_sample[0].item() == len(alpha_bar) - 1
    assert set(t_sample.tolist()) == set(t_train.tolist()) == set(map(float, range(len(alpha_bar))))


def test_rf_loss_feeds_the_network_the_time_the_ode_sampler_feeds(monkeypatch):
    """Eq. (10): the network sees flow time t in [0, 1] as T_STEPS t, and ode_sample must feed the same number for
    the same t. Checked three ways: the sampled t replayed from the seed, exactly T_STEPS t; the ODE grid's times
    pushed through rf_loss give the very tensors ode_sample fed; the velocity oracle of a single data point,
    which lands the samplers on it, has zero training loss."""
    import diffusion

    torch.manual_seed(0)
    x_star = torch.rand(1, 1, 2, 2) * 2 - 1
    seen = []

    def v_oracle(x, t, y):  # v = eps - x* = (x_t - x*) / t, with t read back as the samplers' oracle reads it
        seen.append(t)
        return (x - x_star) / (t / 1000)[:, None, None, None]

    n = 4096
    x0, y = x_star.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long)
    for logit_normal in (True, False):
        seen.clear()
        torch.manual_seed(3)
        out = rf_loss(v_oracle, x0, y, logit_normal=logit_normal)
        torch.manual_seed(3)  # replay rf_loss's first draw
        t = sample_t(n, logit_normal, "cpu")
        assert torch.equal(seen[0], diffusion.T_STEPS * t) and diffusion.T_STEPS == 1000
        assert out["mse"].item() < 1e-8, (logit_normal, out["mse"].item())
    # the ODE grid's times, t = 1, 6/7, ..., 1/7, through rf_loss: the very inputs ode_sample gives the network
    grid = torch.linspace(1.0, 0.0, 8)[:-1]
    monkeypatch.setattr(diffusion, "sample_t", lambda *args, **kwargs: grid)
    seen.clear()
    rf_loss(lambda x, t, y: seen.append(t) or torch.zeros_like(x), torch.zeros(7, 1, 2, 2),
            torch.zeros(7, dtype=torch.long))
    (t_train,) = seen
    assert t_train[0].item() == 1000.0
    for method in ("euler", "heun"):  # Heun also evaluates at each step's end, which is the next step's start
        seen.clear()
        ode_sample(lambda x, t, y: seen.append(t) or torch.zeros_like(x), torch.randn(1, 1, 2, 2),
                   torch.zeros(1, dtype=torch.long), 7, 1.0, 10, method=method)
        t_sample = torch.cat(seen)
        assert t_sample.dtype == t_train.dtype and torch.equal(t_sample.unique(), t_train.unique()), method
        if method == "euler":
            assert torch.equal(t_sample, t_train)  # one evaluation per step, in the grid's order


def test_samplers_recover_a_single_data_point_with_the_exact_model():
    """For data = one point x*, the optimal predictions are known in closed form; the samplers must land on x*."""
    torch.manual_seed(0)
    x_star = torch.rand(1, 1, 28, 28) * 2 - 1
    alpha_bar = linear_alpha_bar()

    def eps_oracle(x, t, y):  # eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)
        ab = alpha_bar[t.long()].float()[:, None, None, None]
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()

    def v_oracle(x, t, y):  # v = eps - x* = (x_t - x*) / t
        return (x - x_star) / (t / 1000)[:, None, None, None]

    noise, y = torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    for eta in (0.0, 1.0):
        out = ddim_sample(eps_oracle, noise, y, 20, 1.0, 10, eta=eta, alpha_bar=alpha_bar)
        assert torch.allclose(out, x_star.expand(2, -1, -1, -1), atol=1e-4)
    for method in ("euler", "heun"):
        out = ode_sample(v_oracle, noise, y, 4, 1.0, 10, method=method)
        assert torch.allclose(out, x_star.expand(2, -1, -1, -1), atol=1e-4)


def test_heun_is_more_accurate_than_euler_on_a_curved_field():
    def field(x, t, y):  # dx/dt = x  ->  x(0) = x(1) e^{-1}
        return x

    x1 = torch.ones(1, 1, 28, 28)
    y = torch.zeros(1, dtype=torch.long)
    exact = torch.exp(torch.tensor(-1.0))
    err = {m: (ode_sample(field, x1, y, 8, 1.0, 10, method=m) - exact).abs().max() for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 3


def test_heun_evaluates_its_corrector_at_the_end_of_the_step_on_a_time_dependent_field():
    """dx/dt = 2 t x, with t read back from the network's input 1000 t: x(0) = x(1) e^{-1} exactly. A field that
    ignores t (as dx/dt = x above) cannot tell v(x_euler, t_next) in Eq. (13) from v(x_euler, t); this one can.
    Measured at 8 steps: Heun 0.0041, the corrector at t instead of t_next 0.041, Euler 0.079; from 8 to 16 steps
    Heun's error falls 4.2-fold (second order), the wrong-time corrector's 1.9-fold and Euler's 2.0-fold."""
    def field(x, t, y):
        return 2 * (t / 1000)[:, None, None, None] * x

    x1, y = torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long)
    exact = math.exp(-1.0)
    err = {(m, n): (ode_sample(field, x1, y, n, 1.0, 10, method=m) - exact).abs().max().item()
           for m in ("euler", "heun") for n in (8, 16)}
    assert err["heun", 8] < 0.012 < err["euler", 8], err
    assert err["heun", 8] / err["heun", 16] > 3.5, err  # second order: halving h quarters the error
    assert 1.6 < err["euler", 8] / err["euler", 16] < 2.4, err  # first order, for contrast


def test_losses_fall_on_a_tiny_batch():
    """A few hundred steps on 8 images: the objective's MSE, averaged over the first and the last 30 steps, falls by
    more than half for both objectives (measured: to ~0.27 of its start for DDPM, ~0.43 for the flow)."""
    from shared.data import load_images, to_symmetric

    images, labels = load_images("synthetic")
    x0, y = to_symmetric(images[:8]), labels[:8]
    for objective in ("ddpm", "flow"):
        torch.manual_seed(0)
        model = DiT(dit_config("micro", swiglu=objective == "flow", rope=objective == "flow"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        alpha_bar = linear_alpha_bar()
        losses = []
        for _ in range(300):
            out = ddpm_loss(model, x0, y, alpha_bar) if objective == "ddpm" else rf_loss(model, x0, y, True, 1.0)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["mse"].item())
        first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
        assert last < 0.5 * first, (objective, first, last)


def test_guidance_only_inside_the_interval():
    """A guided step runs the batch twice (label and null class); it must happen exactly at the steps whose
    normalised time t/T lies in [LO, HI], where t/T = 1 is pure noise in both samplers."""
    assert in_interval(0.5, (0.3, 1.0)) and not in_interval(0.2, (0.3, 1.0)) and not in_interval(0.5, (0.0, 0.4))
    calls = []

    def model(x, t, y):
        calls.append((float(t[0]) / 1000, x.shape[0]))  # (t/T, batch): batch 4 = guided, 2 = not
        return torch.zeros_like(x)

    noise, y = torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    for draw in (lambda iv: ode_sample(model, noise, y, 10, 3.0, 10, method="euler", interval=iv),
                 lambda iv: ddim_sample(model, noise, y, 10, 3.0, 10, interval=iv)):
        calls.clear()
        draw((0.45, 1.0))  # guide at high noise only
        guided, plain = [t for t, b in calls if b == 4], [t for t, b in calls if b == 2]
        assert len(guided) + len(plain) == len(calls) and guided and plain
        assert min(guided) >= 0.45 and max(plain) < 0.45
        assert calls[0] == (max(t for t, _ in calls), 4)  # the first step, nearest to noise, is guided
        calls.clear()
        draw((0.0, 1.0))  # the default: every step guided
        assert all(b == 4 for _, b in calls)


def test_sample_runs_the_named_sampler_with_its_steps_scale_interval_and_clip():
    """sample() is the sampler it names, called with the given steps, guidance scale, interval and clip: equal to
    a direct call, and not to the other sampler of the same objective (on a label-dependent field, where guidance,
    the step count and Heun's corrector all change the result)."""

    def model(x, t, y):  # nonlinear in x, dependent on t and on the label, so that nothing is a no-op
        return torch.sin(3 * x) * (1 + y.float())[:, None, None, None] * (0.5 + t / 1000)[:, None, None, None]

    noise, y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 7])
    common = dict(steps=4, cfg_scale=2.5, null_class=10, interval=(0.1, 0.9))
    for method in ("euler", "heun"):
        got = sample(model, noise, y, "flow", method, 4, 2.5, 10, interval=(0.1, 0.9))
        assert torch.equal(got, ode_sample(model, noise, y, method=method, **common))
    assert not torch.equal(sample(model, noise, y, "flow", "heun", 4, 2.5, 10),
                           sample(model, noise, y, "flow", "euler", 4, 2.5, 10))
    for name, eta in (("ddpm", 1.0), ("ddim", 0.0)):
        for clip in (True, False):
            got = sample(model, noise, y, "ddpm", name, 4, 2.5, 10, interval=(0.1, 0.9),
                         generator=torch.Generator().manual_seed(1), clip=clip)
            assert torch.equal(got, ddim_sample(model, noise, y, eta=eta, generator=torch.Generator().manual_seed(1),
                                                clip=clip, **common))
    assert not torch.equal(sample(model, noise, y, "ddpm", "ddim", 4, 2.5, 10, clip=False),
                           sample(model, noise, y, "ddpm", "ddim", 4, 2.5, 10))
