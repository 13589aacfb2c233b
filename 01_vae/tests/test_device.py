"""Device placement: every piece train.py and likelihood.py call per step runs with model and data on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import pytest
import torch
from likelihood import posterior_mean_variance
from model import VAE, VAEConfig, elbo, importance_sampled_log_px, log_weights, wake_sleep

from shared.testing import on_meta

CONFIGS = {
    "mlp": VAEConfig(arch="mlp", z_dim=2, hidden=16, layers=1, act="tanh"),
    "conv": VAEConfig(arch="conv", z_dim=2, channels=4, blocks=1),
}


@pytest.fixture(params=["mlp", "conv"])
def model(request) -> VAE:
    return VAE(CONFIGS[request.param]).to("meta")


@pytest.fixture
def x() -> torch.Tensor:
    return torch.empty(4, 1, 28, 28, device="meta")  # binarized images


def train_step(model, loss, optimizer=torch.optim.Adam):
    opt = optimizer(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss.backward()
    opt.step()
    assert on_meta(loss, *(p.grad for p in model.parameters()), *model.parameters())


@pytest.mark.parametrize("samples", [1, 3])
def test_elbo_trains_on_meta(model, x, samples):
    terms = elbo(model, x, beta=0.5, samples=samples)
    assert on_meta(*terms.values())
    train_step(model, -terms["objective"].mean())


def test_wake_sleep_trains_on_meta(model, x):
    terms = wake_sleep(model, x)  # the paper's baseline, trained with Adagrad (--preset paper)
    assert on_meta(*terms.values())
    train_step(model, -(terms["wake"] + terms["sleep"]).mean(), torch.optim.Adagrad)


def test_importance_sampling_runs_on_meta(model, x):
    assert on_meta(log_weights(model, x, k=3))
    assert on_meta(importance_sampled_log_px(model, x, k=5, chunk=2))  # two chunks


def test_decoding_and_posterior_means_run_on_meta(model, x):
    z = torch.randn(3, model.cfg.z_dim, device="meta")  # train.py draws the fixed z on the CPU, then moves it
    assert on_meta(torch.sigmoid(model.decode(z)))
    assert on_meta(posterior_mean_variance(model, x, batch_size=3))
