"""Networks: shapes, output ranges, parameter counts of the named sizes, maxout, dropout, MLP and DCGAN init."""

import pytest
import torch
from model import (
    SIZES,
    DCGANDiscriminator,
    DCGANGenerator,
    Maxout,
    MaxoutDiscriminator,
    MLPGenerator,
    build_gan,
    count_params,
    model_config,
    sample_noise,
    upsample_2x,
)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_shapes_and_ranges(arch, size):
    cfg = model_config(arch, size)
    G, D = build_gan(cfg)
    x = G(sample_noise(5, cfg))
    assert x.shape == (5, 1, 28, 28)
    lo, hi = G.value_range
    assert x.min() >= lo and x.max() <= hi
    assert D(x).shape == (5,)


def test_paper_mlp_parameter_counts():
    G, D = build_gan(model_config("mlp", "paper"))
    # G: 100 -> 1200 -> 1200 -> 784; D: maxout 784 -> 240x5, maxout 240 -> 240x5, 240 -> 1
    assert count_params(G) == (100 * 1200 + 1200) + (1200 * 1200 + 1200) + (1200 * 784 + 784) == 2_503_984
    assert count_params(D) == (784 * 1200 + 1200) + (240 * 1200 + 1200) + (240 + 1) == 1_231_441


def test_dcgan_parameter_counts_and_init():
    w = SIZES["dcgan"]["paper"]["width"]
    G, D = build_gan(model_config("dcgan", "paper"))
    assert count_params(G) == (100 * 4 * w * 49 + 2 * 4 * w) + (4 * w * 2 * w * 16 + 2 * 2 * w) + (2 * w * 16 + 1)
    assert count_params(D) == (16 * w + w) + (w * 2 * w * 16 + 2 * 2 * w) + (2 * w * 49 + 1)
    conv = G.net[3].weight
    assert abs(conv.std().item() - 0.02) < 0.002 and abs(conv.mean().item()) < 0.002  # N(0, 0.02), DCGAN §4
    bn = G.net[1].weight
    assert abs(bn.mean().item() - 1) < 0.01 and bn.std().item() < 0.05


def test_d_width_sizes_the_discriminator_alone():
    """--d-width changes D's channels (w and 2w) and leaves G as --size made it; twice G's width makes D mirror G
    (2w channels at 14x14, 4w at 7x7)."""
    w = SIZES["dcgan"]["tiny"]["width"]
    G0, D0 = build_gan(model_config("dcgan", "tiny"))
    G, D = build_gan(model_config("dcgan", "tiny", d_width=2 * w))
    assert count_params(G) == count_params(G0)
    assert [D0.net[i].out_channels for i in (0, 2)] == [w, 2 * w]
    assert [D.net[i].out_channels for i in (0, 2)] == [G.net[3].out_channels, G.net[0].out_channels] == [2 * w, 4 * w]
    assert D(G(sample_noise(3, G.cfg))).shape == (3,)


def test_a_mixed_pair_takes_each_players_size_from_its_own_architecture():
    """--d-arch pairs one architecture's G with the other's D; each player is what --size makes of it in a pair of
    its own kind, so a mixed pair changes one player and keeps the other."""
    for g_arch, d_arch in (("dcgan", "mlp"), ("mlp", "dcgan")):
        G, D = build_gan(model_config(g_arch, "small", d_arch=d_arch))
        G_own, _ = build_gan(model_config(g_arch, "small"))
        _, D_own = build_gan(model_config(d_arch, "small"))
        assert type(G) is type(G_own) is {"dcgan": DCGANGenerator, "mlp": MLPGenerator}[g_arch]
        assert type(D) is type(D_own) is {"dcgan": DCGANDiscriminator, "mlp": MaxoutDiscriminator}[d_arch]
        assert (count_params(G), count_params(D)) == (count_params(G_own), count_params(D_own))
        assert D(G(sample_noise(3, G.cfg))).shape == (3,)


def test_keep_probability_one_turns_the_maxout_discriminators_dropout_off():
    """In train mode the maxout D drops units, so two passes over one batch differ; with both keep-probabilities at
    1 (--d-keep-in 1 --d-keep 1) nothing is dropped and they agree."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    for keep, deterministic in ((dict(), False), (dict(d_keep_in=1.0, d_keep=1.0), True)):
        _, D = build_gan(model_config("mlp", "tiny", **keep))  # train mode
        assert torch.equal(D(x), D(x)) == deterministic


def test_norm_none_makes_each_player_treat_each_image_on_its_own():
    """In train mode DCGAN's batch norm makes a player's output for one image depend on the rest of its batch: D
    judges each image against its batch's statistics, and G draws each z against its batch's. --d-norm none and
    --g-norm none take every batch norm out of that player alone, and each output then depends on its input only."""
    torch.manual_seed(0)
    for g_norm, d_norm in (("batch", "batch"), ("none", "batch"), ("batch", "none")):
        G, D = build_gan(model_config("dcgan", "tiny", g_norm=g_norm, d_norm=d_norm))  # train mode
        assert [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (G, D)] == \
            [2 * (g_norm == "batch"), d_norm == "batch"]
        z, x = sample_noise(4, G.cfg), torch.rand(4, 1, 28, 28) * 2 - 1
        z_other, x_other = torch.cat([z[:1], sample_noise(3, G.cfg)]), torch.cat([x[:1], torch.rand(3, 1, 28, 28)])
        with torch.no_grad():  # the first image is the same in both batches; the other three are not
            g_change = (G(z)[0] - G(z_other)[0]).abs().max().item()
            d_change = (D(x)[0] - D(x_other)[0]).abs().item()
        assert (g_change < 1e-6) == (g_norm == "none") and (g_change > 1e-4) == (g_norm == "batch"), g_change
        assert (d_change < 1e-6) == (d_norm == "none") and (d_change > 1e-4) == (d_norm == "batch"), d_change


def test_readout_parameter_counts():
    """--d-readout conv adds a 4x4 stride-2 layer to 4w channels (batch norm, no bias) and reads the 3x3 map with
    one 3x3 convolution; fc flattens the 2w x 7 x 7 map into 4w LeakyReLU units, then one logit."""
    w = SIZES["dcgan"]["tiny"]["width"]
    stem = (16 * w + w) + (w * 2 * w * 16 + 2 * 2 * w)  # the two layers every readout shares
    counts = {how: count_params(build_gan(model_config("dcgan", "tiny", d_readout=how))[1])
              for how in ("linear", "conv", "fc")}
    assert counts == {"linear": stem + 2 * w * 49 + 1,
                      "conv": stem + 2 * w * 4 * w * 16 + 2 * 4 * w + 4 * w * 9 + 1,
                      "fc": stem + (2 * w * 49 * 4 * w + 4 * w) + (4 * w + 1)}


def test_the_linear_readout_makes_the_conv_discriminators_logit_a_sum_over_image_windows():
    """Each position of the conv D's 7x7 map sees a 10x10-pixel window, and the "linear" readout (DCGAN's last
    layer) adds up one score per position. So two changes to the image far enough apart that no window holds both
    (opposite 8x8 corners) change the logit by the sum of what each does alone: their interaction
    D(x+a+b) - D(x+a) - D(x+b) + D(x) is zero. A readout that mixes positions ("conv", "fc") or the maxout D, whose
    every unit weighs all 784 pixels, can make it anything. (Eval mode and float64: batch norm on fixed statistics,
    no dropout, no rounding.)"""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64) * 2 - 1
    a, b = torch.zeros_like(x), torch.zeros_like(x)
    a[..., :8, :8] = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    b[..., 20:, 20:] = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    for d_arch, readout in (("dcgan", "linear"), ("dcgan", "conv"), ("dcgan", "fc"), ("mlp", "linear")):
        _, D = build_gan(model_config("dcgan", "small", d_arch=d_arch, d_readout=readout))
        D = D.double().eval()
        with torch.no_grad():
            interaction = (D(x + a + b) - D(x + a) - D(x + b) + D(x)).abs().max().item()
            alone = min((D(x + a) - D(x)).abs().min().item(), (D(x + b) - D(x)).abs().min().item())
        assert alone > 1e-9, (d_arch, readout, alone)  # each change does move the logit
        additive = d_arch == "dcgan" and readout == "linear"
        assert (interaction < 1e-14) == additive and (interaction > 1e-9) == (not additive), (d_arch, readout,
                                                                                            interaction)


def test_resize_upsampling_keeps_a_flat_image_flat_where_the_transposed_convolution_makes_a_checkerboard():
    """Odena et al. 2016: the four output pixels of a 2x2 cell of a stride-2 transposed convolution are made by four
    different sets of kernel taps, so even a constant input comes out as a period-2 pattern; nearest-neighbour
    upsampling then one 3x3 convolution applies the same weights everywhere and keeps it constant (away from the
    zero-padded border)."""
    torch.manual_seed(0)
    flat = torch.ones(1, 3, 6, 6)
    for how, periodic in (("transposed", True), ("resize", False)):
        out = upsample_2x(3, 2, how, bias=True)(flat)[:, :, 2:-2, 2:-2]  # (1, 2, 8, 8) interior of (1, 2, 12, 12)
        cells = out.unflatten(2, (4, 2)).unflatten(4, (4, 2))          # (1, 2, 4, 2, 4, 2): 2x2 cells
        torch.testing.assert_close(cells, cells[:, :, :1, :, :1, :].expand_as(cells))  # each cell is the same
        assert (cells.std(dim=(3, 5)) > 1e-3).all() == periodic, how  # ... and varies inside only if transposed
    x = torch.randn(2, 3, 5, 5)
    up = upsample_2x(3, 4, "resize", bias=False)
    torch.testing.assert_close(up(x), torch.nn.functional.conv2d(x.repeat_interleave(2, 2).repeat_interleave(2, 3),
                                                                  up[1].weight, padding=1))
    G, D = build_gan(model_config("dcgan", "tiny", g_upsample="resize"))
    assert G(sample_noise(3, G.cfg)).shape == (3, 1, 28, 28) and D(G(sample_noise(3, G.cfg))).shape == (3,)


def test_paper_mlp_init_is_the_released_uniform():
    """The released configuration: G's weights U(-0.05, 0.05), D's (maxout pieces too) U(-0.005, 0.005), biases 0."""
    torch.manual_seed(0)
    G, D = build_gan(model_config("mlp", "paper"))
    for net, bound in ((G, 0.05), (D, 0.005)):
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 3
        for m in linears:
            w = m.weight
            assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # fills the interval, no further
            assert abs(w.std().item() - bound / 3 ** 0.5) < 0.05 * bound  # U(-b, b) has std b / sqrt(3)
            assert abs(w.mean().item()) < 0.05 * bound
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_init_output_bias_starts_g_at_the_mean_pixel():
    """b = logit(mean pixel): sigmoid(b) is the data's mean image, which G draws whenever its last layer's
    weights contribute nothing. Pixels that are always 0 or 1 are clamped to [1e-3, 1 - 1e-3] (finite logits)."""
    G, _ = build_gan(model_config("mlp", "tiny"))
    mean = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    mean[0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    G.init_output_bias(mean)
    bias = G.net[-1].bias
    assert bias.shape == (784,) and torch.isfinite(bias).all()
    torch.testing.assert_close(torch.sigmoid(bias), mean.flatten().clamp(1e-3, 1 - 1e-3), rtol=0, atol=1e-6)
    with torch.no_grad():
        G.net[-1].weight.zero_()
        x = G(sample_noise(3, G.cfg))  # (3, 1, 28, 28)
    torch.testing.assert_close(x, mean.clamp(1e-3, 1 - 1e-3).expand(3, 1, 28, 28), rtol=0, atol=1e-6)


def test_maxout_is_max_of_pieces():
    layer = Maxout(6, units=4, pieces=3)
    x = torch.randn(2, 6)
    pieces = (x @ layer.linear.weight.T + layer.linear.bias).view(2, 4, 3)
    assert torch.equal(layer(x), pieces.max(dim=2).values)


def test_discriminator_dropout_only_in_training():
    cfg = model_config("mlp", "tiny")
    _, D = build_gan(cfg)
    torch.nn.init.normal_(D.net[2].linear.weight)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.equal(D(x), D(x))  # dropout: two passes differ
    D.eval()
    assert torch.equal(D(x), D(x))


def test_noise_priors_have_unit_variance():
    for noise in ("gaussian", "uniform"):
        z = sample_noise(20000, model_config("mlp", "tiny", noise=noise), generator=torch.Generator().manual_seed(0))
        assert abs(z.var().item() - 1) < 0.03 and abs(z.mean().item()) < 0.02
    u = sample_noise(1000, model_config("mlp", "tiny", noise="uniform"))
    assert u.abs().max() <= 3 ** 0.5
