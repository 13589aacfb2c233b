"""Device placement: both training phases, the sample grid and sample.py's samplers run with the model on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import copy

import pytest
import torch
from captions import Tokenizer
from flow import guided_velocity, logit_normal_t, rectified_flow_loss
from model import info_nce, zero_shot_logits
from sample import generate, interpolate_prompts
from train import TrainConfig, build, class_prompt_ids, drop_captions, ema_update, sample_grid

from shared.runtime import to_device
from shared.testing import META, on_meta

TOK = Tokenizer()
VARIANTS = {  # the single-digit default, and the two-digit canvas with each kind of text and image positions
    "single": dict(),
    "two-digit": dict(two_digit=True, text_pos="sincos"),
    "two-digit-learned": dict(two_digit=True, text_pos="learned", image_pos="learned"),
}


@pytest.fixture(params=list(VARIANTS))
def cfg(request) -> TrainConfig:
    return TrainConfig(clip_size="tiny", dit_size="tiny", sample_steps=2, **VARIANTS[request.param])


@pytest.fixture
def model(cfg):
    return build(cfg, TOK).to(META)


@pytest.fixture
def ids():
    return TOK.batch(["a thick seven", "a 3 to the left of a small eight"]).to(META)


def test_clip_phase_trains_on_meta(model, ids):
    opt = torch.optim.AdamW(model.clip.parameters(), lr=1e-3, weight_decay=0.01)
    loss = info_nce(model.clip(torch.empty(2, 1, 28, 28, device=META), ids))
    loss.backward()
    opt.step()
    assert on_meta(loss, *(p.grad for p in model.clip.parameters()))


def test_zero_shot_logits_on_meta(model):
    prompt_ids, n_templates = class_prompt_ids(TOK)
    assert on_meta(zero_shot_logits(model.clip, torch.empty(3, 1, 28, 28, device=META), prompt_ids.to(META),
                                    n_templates))


def test_mmdit_phase_trains_on_meta(model, ids):
    """train.py's phase 2: caption dropout, the frozen CLIP's condition, the flow loss, clip, AdamW, EMA."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.dit.parameters(), lr=6e-4, weight_decay=0.0)
    model.clip.eval().requires_grad_(False)
    x = torch.empty(2, 1, 28, model.dit.cfg.width_px, device=META)
    cond = model.condition(drop_captions(ids, 0.5, TOK.batch([""]).to(META)))
    t = to_device(logit_normal_t(len(x)), META)
    loss = rectified_flow_loss(model.velocity, x, cond, t, torch.randn_like(x))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.dit.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, 0.9)
    # the last block's text update feeds nothing and gets no gradient (model.py::MMDiT.forward)
    grads = [p.grad for p in model.dit.parameters() if p.grad is not None]
    assert on_meta(loss, grad_norm, *grads, *ema.parameters()) and len(grads) > 0


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])  # Eq. (8)'s two shortcuts and the batched general case
def test_guided_velocity_on_meta(model, ids, scale):
    z = torch.empty(2, 1, 28, model.dit.cfg.width_px, device=META)
    cond, null = model.condition(ids), model.condition(TOK.batch(["", ""]).to(META))
    assert on_meta(guided_velocity(model.velocity, z, torch.rand(2, device=META), cond, null, scale))


def test_sample_grid_on_meta(model, cfg):
    assert on_meta(sample_grid(model.eval(), TOK, cfg, META))


def test_sample_scripts_samplers_on_meta(model):
    """sample.py: prompts in batches with guidance inside an interval, and the walk between two prompts."""
    noise = torch.empty(3, 1, 28, model.dit.cfg.width_px, device=META)
    prompts = ["a thick seven", "a 3 to the left of a small eight", "a one"]
    assert on_meta(generate(model.eval(), TOK, prompts, noise, 3.0, 2, batch_size=2, interval=(0.0, 0.5)))
    assert on_meta(interpolate_prompts(model, TOK, "a one", "a seven", noise, 3.0, 2, batch_size=2))
