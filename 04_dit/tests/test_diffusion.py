import torch
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


def test_q_sample_matches_closed_form_moments():
    alpha_bar = linear_alpha_bar()
    assert abs(alpha_bar[0] - (1 - 1e-4)) < 1e-12 and 0 < alpha_bar[-1] < 1e-4
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = q_sample(x0, t, torch.randn_like(x0), alpha_bar)
    ab = float(alpha_bar[300])
    assert abs(xt.mean() - ab ** 0.5 * 0.7) < 0.02 and abs(xt.var() - (1 - ab)) < 0.02


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


def test_losses_fall_on_a_tiny_batch():
    from shared.data import load_images, to_symmetric

    images, labels = load_images("synthetic")
    x0, y = to_symmetric(images[:16]), labels[:16]
    for objective in ("ddpm", "flow"):
        torch.manual_seed(0)
        model = DiT(dit_config("micro", swiglu=objective == "flow", rope=objective == "flow"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        alpha_bar = linear_alpha_bar()
        losses = []
        for _ in range(60):
            out = ddpm_loss(model, x0, y, alpha_bar) if objective == "ddpm" else rf_loss(model, x0, y, True, 1.0)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["mse"].item())
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.7 * first, (objective, first, last)


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
