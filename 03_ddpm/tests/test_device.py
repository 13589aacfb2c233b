"""Device placement: Algorithm 1's step, the samplers, DDIM inversion and the bound run with the U-Net on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import copy
from pathlib import Path

import pytest
import torch
from diffusion import Diffusion
from model import build_unet
from sample import load_model
from train import update_ema

from shared.testing import META, on_meta

SHAPE = (2, 1, 28, 28)


@pytest.fixture
def net():
    return build_unet("tiny").to(META)


@pytest.fixture
def diffusion():
    """The schedule's tables on the CPU: the samplers first copy the numbers they need to the host (.tolist()),
    which meta cannot do (on CUDA it is one wait per sampler call, not one per step)."""
    return Diffusion(T=10)


@pytest.mark.parametrize("tables", ["cpu", "meta"])
def test_training_step_on_meta(net, tables):
    diffusion = Diffusion(T=10).to(tables)  # train.py: diffusion.to(run.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = diffusion.loss_simple(net, torch.empty(SHAPE, device=META))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    update_ema(ema, net, 0.9)
    assert on_meta(loss, grad_norm, *(p.grad for p in net.parameters()), *ema.parameters())


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_sample_ddpm_on_meta(net, diffusion, sigma):
    assert on_meta(diffusion.sample_ddpm(net, SHAPE, sigma=sigma, device=META))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_on_meta(net, diffusion, eta):
    assert on_meta(diffusion.sample_ddim(net, SHAPE, S=3, eta=eta, device=META))


def test_ddim_invert_on_meta(net, diffusion):
    assert on_meta(diffusion.ddim_invert(net, torch.empty(SHAPE, device=META), S=3))


@pytest.mark.parametrize("num_t", [0, 2])  # every term, or two random draws of t per image
def test_bits_per_dim_on_meta(net, diffusion, num_t):
    assert on_meta(diffusion.bits_per_dim(net, torch.empty(SHAPE, device=META), num_t=num_t))


def test_sample_py_puts_the_schedule_beside_the_network():
    model, diffusion, _ = load_model(Path(__file__).parents[1] / "pretrained" / "mnist.pt", META)
    tables = [v for v in vars(diffusion).values() if isinstance(v, torch.Tensor)]
    assert on_meta(*model.parameters(), *tables) and len(tables) == 5
