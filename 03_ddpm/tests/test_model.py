import torch
from model import SIZES, ResBlock, SelfAttention, UNetConfig, build_unet, count_params, timestep_embedding


def test_named_sizes_have_their_parameter_counts():
    counts = {name: count_params(build_unet(name)) for name in SIZES}
    assert counts == {"tiny": 176_849, "small": 686_769, "base": 6_801_409}
    assert UNetConfig() == UNetConfig(**SIZES["small"])  # the dataclass defaults are the default size
    assert build_unet("base").cfg.groups == 8


def test_residual_branch_starts_at_zero():
    """At init a block outputs its skip path: x itself when the width stays, a 1x1 projection of x otherwise."""
    x, temb = torch.randn(2, 8, 7, 7), torch.randn(2, 32)
    same, wider = ResBlock(8, 8, 32, 0.0, 4), ResBlock(8, 16, 32, 0.0, 4)
    assert torch.equal(same(x, temb), x)
    assert torch.equal(wider(x, temb), wider.skip(x)) and wider(x, temb).shape == (2, 16, 7, 7)


def test_shapes_and_zero_init():
    net = build_unet("tiny")
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 1000])
    out = net(x, t)
    assert out.shape == (3, 1, 28, 28)
    assert torch.equal(out, torch.zeros_like(out))  # eps_theta starts at 0; the loss starts at E||eps||^2 = 1
    attn = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert len(attn) >= 2  # self-attention at the low resolution and in the middle


def test_output_depends_on_t_once_trained_weights_move():
    net = build_unet("tiny", dropout=0.0).eval()
    for p in net.parameters():  # undo the zero inits, as training would
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28).expand(2, 1, 28, 28)
    out = net(x, torch.tensor([1, 1000]))
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert e.shape == (3, 16) and torch.equal(e[0, :8], torch.zeros(8)) and e.abs().max() <= 1
    # written out: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/8), from one turn per ~6 steps down to ~1/10^4 of that
    t, i = torch.tensor([0.0, 1.0, 999.0])[:, None], torch.arange(8.0)[None]
    angle = t * 10000 ** (-i / 8)
    assert torch.allclose(e, torch.cat([angle.sin(), angle.cos()], dim=1), atol=1e-4)
