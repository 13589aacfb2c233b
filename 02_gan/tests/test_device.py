"""Device placement: the steps of Algorithm 1 that train.py takes, and sampling, run with both players on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import pytest
import torch
from model import build_gan, model_config, sample_noise
from train import discriminator_step, generator_step, simultaneous_step

from shared.testing import META, on_meta


def grads_on_meta(module) -> bool:
    return on_meta(*(p.grad for p in module.parameters()))


@pytest.fixture(params=["mlp", "dcgan"])
def players(request):
    G, D = build_gan(model_config(request.param, "tiny", z_dim=8))
    return G.to(META), D.to(META)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.empty(4, 1, 28, 28, device=META)  # a batch of data images


def test_discriminator_step_on_meta(players, x):
    G, D = players
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    stats = discriminator_step(G, D, opt_d, x, G.cfg, scale=0.5)
    assert on_meta(*stats.values()) and grads_on_meta(D)


@pytest.mark.parametrize("loss_name", ["minimax", "nonsaturating"])
def test_generator_step_on_meta(players, loss_name):
    G, D = players
    opt_g = torch.optim.SGD(G.parameters(), lr=0.1, momentum=0.5)  # --optimizer sgd, the paper's
    stats = generator_step(G, D, opt_g, 4, G.cfg, loss_name, META, measure=True)  # with both gradient norms
    assert set(stats) == {"g_loss", "gnorm_minimax", "gnorm_nonsaturating"}
    assert on_meta(*stats.values()) and grads_on_meta(G)


def test_simultaneous_step_on_meta(x):
    G, D = (m.to(META) for m in build_gan(model_config("mlp", "tiny", z_dim=8)))  # --update simultaneous: mlp only
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    stats = simultaneous_step(G, D, opt_g, opt_d, x, G.cfg, "nonsaturating", scale=0.5)
    assert on_meta(*stats.values()) and grads_on_meta(G) and grads_on_meta(D)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_noise_and_samples_on_meta(players, noise):
    G, _ = players
    z = sample_noise(4, model_config("mlp", "tiny", z_dim=8, noise=noise), device=META)
    with torch.no_grad():
        assert on_meta(z, G.eval()(z))
