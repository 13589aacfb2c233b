"""The game's math: Proposition 1 (optimal D), Theorem 1 (value -log 4 at p_g = p_data), and saturation."""

import math

import pytest
import torch
from gan import (
    LOG4,
    discriminator_loss,
    generator_loss_minimax,
    generator_loss_nonsaturating,
    optimal_discriminator,
    value_function,
    value_on_grid,
    virtual_training_criterion,
)
from model import build_gan, model_config, sample_noise

GRID = torch.linspace(-10, 10, 20001, dtype=torch.float64)
DX = float(GRID[1] - GRID[0])


def normal_pdf(x, mu, sigma):
    return torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


P_DATA = normal_pdf(GRID, 0.0, 1.0)
P_G = 0.5 * normal_pdf(GRID, 2.0, 0.7) + 0.5 * normal_pdf(GRID, -1.0, 0.5)


def test_optimal_discriminator_is_the_pointwise_argmax():
    """Prop. 1: y -> a log y + b log(1 - y) peaks at a / (a + b); brute force over y in (0, 1) agrees."""
    x = GRID[::500]  # 41 points
    a, b = normal_pdf(x, 0.0, 1.0), 0.5 * normal_pdf(x, 2.0, 0.7) + 0.5 * normal_pdf(x, -1.0, 0.5)
    ys = torch.linspace(1e-4, 1 - 1e-4, 99999, dtype=torch.float64)[:, None]  # (Y, 1)
    brute = ys[(a * torch.log(ys) + b * torch.log1p(-ys)).argmax(0), 0]  # (41,)
    assert torch.allclose(brute, optimal_discriminator(a, b), atol=2e-4)


def test_value_at_the_optimum_is_finite_where_one_density_dwarfs_the_other():
    """Far in N(0, 1)'s tails next to N(1.5, 0.7), p_g / p_data < 1e-16: D* = p_data / (p_data + p_g) rounds to 1
    in float64, and log(1 - D*) must still not make V(G, D*) = -inf."""
    p_data, p_g = normal_pdf(GRID, 0.0, 1.0), normal_pdf(GRID, 1.5, 0.7)
    v_star = value_on_grid(optimal_discriminator(p_data, p_g), p_data, p_g, DX)
    assert float(v_star) == pytest.approx(float(virtual_training_criterion(p_data, p_g, DX)), abs=1e-9)


def test_optimal_discriminator_maximises_the_value():
    d_star = optimal_discriminator(P_DATA, P_G)
    v_star = value_on_grid(d_star, P_DATA, P_G, DX)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # any other discriminator does worse
        logit = torch.logit(d_star.clamp(1e-9, 1 - 1e-9)) + 0.5 * torch.randn(1, generator=g, dtype=torch.float64)
        assert value_on_grid(torch.sigmoid(logit), P_DATA, P_G, DX) < v_star
    # and the maximum is C(G) of Eq. (4)-(6), computed independently through the Jensen-Shannon divergence
    assert float(v_star) == pytest.approx(float(virtual_training_criterion(P_DATA, P_G, DX)), abs=1e-6)


def test_disjoint_supports_give_the_largest_value():
    """p_data and p_g that never overlap: D* is 1 on one support, 0 on the other, and C(G) = -log 4 + 2 log 2 = 0,
    the largest the JSD allows (0 log 0 = 0 in V; D* = 1/2 where neither density lives)."""
    p_data = ((GRID >= -2) & (GRID < -1)).double() / 1.0
    p_g = ((GRID >= 1) & (GRID < 2)).double() / 1.0
    d_star = optimal_discriminator(p_data, p_g)
    assert d_star[p_data > 0].eq(1).all() and d_star[p_g > 0].eq(0).all() and d_star[GRID.abs() < 0.5].eq(0.5).all()
    assert float(value_on_grid(d_star, p_data, p_g, DX)) == pytest.approx(0.0, abs=1e-12)
    assert float(virtual_training_criterion(p_data, p_g, DX)) == pytest.approx(-LOG4 + 2 * math.log(2), abs=1e-3)


def test_trained_discriminator_approaches_prop1():
    """A small D trained by Algorithm 1's inner loop on samples of two known 1-D densities finds D*."""
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                            torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    for _ in range(300):
        real = torch.randn(256, 1)
        fake = torch.where(torch.rand(256, 1) < 0.5, 2.0 + 0.7 * torch.randn(256, 1), -1.0 + 0.5 * torch.randn(256, 1))
        loss = discriminator_loss(D(real).squeeze(1), D(fake).squeeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.linspace(-2, 3, 51, dtype=torch.float64)
    d_star = optimal_discriminator(normal_pdf(x, 0, 1), 0.5 * normal_pdf(x, 2, 0.7) + 0.5 * normal_pdf(x, -1, 0.5))
    with torch.no_grad():
        d_learned = torch.sigmoid(D(x[:, None].float())).squeeze(1).double()
    assert (d_learned - d_star).abs().max() < 0.08, (d_learned - d_star).abs().max()


def test_value_is_minus_log4_when_pg_equals_pdata():
    """Theorem 1: at p_g = p_data, D* = 1/2 everywhere and C(G) = -log 4, its global minimum."""
    d_star = optimal_discriminator(P_DATA, P_DATA)
    assert torch.allclose(d_star, torch.full_like(d_star, 0.5))
    assert float(value_on_grid(d_star, P_DATA, P_DATA, DX)) == pytest.approx(-LOG4, abs=1e-6)
    assert float(virtual_training_criterion(P_DATA, P_DATA, DX)) == pytest.approx(-LOG4, abs=1e-9)
    assert float(virtual_training_criterion(P_DATA, P_G, DX)) > -LOG4 + 0.1  # p_g != p_data: strictly above
    # the minibatch estimate of Eq. (1) with D = 1/2 (logit 0) is exactly -log 4, whatever the samples
    zeros = torch.zeros(7)
    assert float(value_function(zeros, zeros)) == pytest.approx(-LOG4, abs=1e-6)


def test_losses_are_finite_for_confident_discriminators():
    logits = torch.tensor([-200.0, 0.0, 200.0])
    for value in (discriminator_loss(logits, logits), generator_loss_minimax(logits),
                  generator_loss_nonsaturating(logits)):
        assert torch.isfinite(value)


def test_minimax_gradient_vanishes_when_d_rejects_but_nonsaturating_does_not():
    """§3: early on D rejects G(z) confidently; log(1 - D(G(z))) then gives G almost no gradient."""
    torch.manual_seed(0)
    G, D = build_gan(model_config("mlp", "tiny"))
    D.eval()
    with torch.no_grad():
        D.net[-1].bias.fill_(-12.0)  # D(G(z)) ~ 6e-6: confident rejection
    z = sample_noise(64, G.cfg)
    fake_logits = D(G(z))
    assert torch.sigmoid(fake_logits).max() < 1e-4
    params = list(G.parameters())
    norm = lambda loss: torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params,  # noqa: E731
                                                                                     retain_graph=True)))
    minimax, nonsat = norm(generator_loss_minimax(fake_logits)), norm(generator_loss_nonsaturating(fake_logits))
    assert minimax < 1e-4 * nonsat  # the ratio is D(G(z)) / (1 - D(G(z))) per sample
    # the same D moved to D(G(z)) = 1/2 (logit 0, same slope): the non-saturating gradient under confident
    # rejection is about twice as large as there, so it does not vanish; the minimax one is ~1e5 times smaller
    fake_half = fake_logits - fake_logits.detach()
    assert nonsat > 1.5 * norm(generator_loss_nonsaturating(fake_half))
    g_mm = torch.autograd.grad(generator_loss_minimax(fake_half), params, retain_graph=True)
    g_ns = torch.autograd.grad(generator_loss_nonsaturating(fake_half), params)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_mm, g_ns))
