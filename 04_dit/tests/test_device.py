"""Device placement: both objectives, every sampler, the training grids and the VA-VAE step run on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import copy
import dataclasses

import pytest
import torch
from diffusion import SAMPLERS, ddim_sample, ddpm_loss, linear_alpha_bar, rf_loss, sample
from train import TrainConfig, build_model, sample_grid, update_ema
from vavae import AEConfig, Autoencoder, ae_losses, foundation_features, vf_loss

from shared.classifier import MNISTClassifier
from shared.testing import META, on_meta

VANILLA = dict(swiglu=False, rmsnorm=False, rope=False, qk_norm=False)  # DiT: GELU MLP, LayerNorm, sin-cos only


@pytest.fixture(params=["lightning", "vanilla"])
def cfg(request) -> TrainConfig:
    flags = VANILLA if request.param == "vanilla" else {}  # TrainConfig's defaults: SwiGLU, RMSNorm, RoPE, QK-norm
    return TrainConfig(size="micro", sample_steps=2, **flags)


@pytest.fixture
def model(cfg):
    return build_model(cfg).to(META)  # train mode: labels are dropped to the null class at random


@pytest.fixture
def batch():
    return torch.empty(4, 1, 28, 28, device=META), torch.zeros(4, dtype=torch.long, device=META)


def train_step(model, loss):
    """train.py's step after the loss: backward, clip, AdamW, EMA."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    update_ema(ema, model, 0.9)
    assert on_meta(loss, *(p.grad for p in model.parameters()), *ema.parameters())


def test_ddpm_loss_trains_on_meta(model, batch):
    losses = ddpm_loss(model, *batch, linear_alpha_bar().to(META))  # train.py moves alpha_bar to the device
    train_step(model, losses["loss"])


@pytest.mark.parametrize("logit_normal, cos_weight", [(True, 1.0), (False, 0.0)])
def test_rf_loss_trains_on_meta(model, batch, logit_normal, cos_weight):
    losses = rf_loss(model, *batch, logit_normal, cos_weight)
    assert on_meta(*losses.values())
    train_step(model, losses["loss"])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guided_samplers_on_meta(model, batch, sampler):
    """As sample.py calls them: a CPU generator, guidance 2, and an interval, so some steps are unguided."""
    x = sample(model.eval(), *batch, SAMPLERS[sampler], sampler, 3, 2.0, model.cfg.num_classes, interval=(0.0, 0.5),
               generator=torch.Generator().manual_seed(0))
    assert on_meta(x)


def test_ancestral_noise_without_a_generator_on_meta(model, batch):
    assert on_meta(ddim_sample(model.eval(), *batch, steps=3, cfg_scale=2.0, null_class=model.cfg.num_classes,
                               eta=1.0))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sample_grid_on_meta(cfg, objective):
    cfg = dataclasses.replace(cfg, objective=objective)
    assert on_meta(sample_grid(build_model(cfg).to(META).eval(), cfg, META, per_class=1))


def test_latent_sample_grid_on_meta(cfg):
    ae = Autoencoder(AEConfig(width=4)).to(META).eval()  # its latent statistics are buffers
    ema = build_model(cfg, ae).to(META).eval()  # 7x7x4 latents, patch size 1
    assert on_meta(sample_grid(ema, cfg, META, per_class=1, ae=ae))


@pytest.mark.parametrize("align", [True, False])
def test_vavae_training_step_on_meta(batch, align):
    """train_vavae.py's step: L_AE, and with alignment the VF loss against the frozen classifier's features."""
    ae = Autoencoder(AEConfig(width=4)).to(META)
    classifier = MNISTClassifier().to(META).eval().requires_grad_(False)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    x = batch[0]
    out = ae(x)
    losses = ae_losses(out, x, beta=1e-3)
    loss = losses["ae"]
    if align:
        losses.update(vf_loss(ae, out["z"], foundation_features(classifier, x), losses["rec"], 0.5, 0.25, 0.5))
        loss = loss + losses["vf"]
    loss.backward()
    opt.step()
    grads = [p.grad for p in ae.parameters() if p.grad is not None]  # without alignment, proj gets none
    assert on_meta(*losses.values(), *grads) and len(grads) >= len(list(ae.parameters())) - 1
