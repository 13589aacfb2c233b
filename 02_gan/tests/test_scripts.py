"""sample.py, figures.py, parzen_blur.py and train.py's flags: each flag reaches the number or picture it names."""

import json

import numpy as np
import pytest
import torch
import train
from model import GANConfig, build_gan, model_config, sample_noise
from test_train import smoke
from train import STAGE, TrainConfig, main, make_optimizer

from shared import UserError
from shared.checkpoint import provenance, save_checkpoint
from shared.data import load_images, to_unit
from shared.images import to_uint8


def gan_checkpoint(path, arch="mlp"):
    """A checkpoint of an untrained tiny generator, as train.py saves it."""
    torch.manual_seed(0)
    G, _ = build_gan(model_config(arch, "tiny"))
    return save_checkpoint({**provenance(STAGE, {"arch": arch, "size": "tiny"}, 0, 0, git=""),
                            "model": G.state_dict()}, path), G.eval()


# ------------------------------------------------------------------------------------------------- sample.py
def test_generate_is_g_of_the_seeds_noise_in_gs_own_value_range():
    """generate(seed): uint8 of G(z), z from a generator seeded with ``seed``, mapped from G's value range
    ([0, 1] for the sigmoid MLP)."""
    import sample

    torch.manual_seed(0)
    G = build_gan(model_config("mlp", "tiny"))[0].eval()
    z = sample_noise(6, G.cfg, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = to_uint8(G(z), (0.0, 1.0))
    assert torch.equal(sample.generate(G, 6, 4, seed=1), expected)
    assert not torch.equal(sample.generate(G, 6, 4, seed=2), expected)


def test_sample_main_follows_the_seed_flag(tmp_path):
    """--seed picks the samples of the .npz."""
    import sample

    ckpt, G = gan_checkpoint(tmp_path / "g.pt")
    run = lambda seed, name: np.load(sample.main(["--ckpt", str(ckpt), "--num-samples", "5", "--seed", str(seed),  # noqa: E731
                                                  "--out", str(tmp_path / name), "--device", "cpu"]))["images"]
    images = run(2, "a.npz")
    assert np.array_equal(images, sample.generate(G, 5, 5, seed=2).numpy())
    assert not np.array_equal(run(3, "b.npz"), images)


def test_load_generator_is_in_eval_mode_so_a_dcgan_sample_does_not_depend_on_its_batch(tmp_path):
    """DCGAN's batch norm uses its running statistics when sampling: the batch size never changes a sample."""
    import sample

    ckpt, _ = gan_checkpoint(tmp_path / "d.pt", "dcgan")
    G = sample.load_generator(ckpt)
    assert not G.training
    one_batch, three = sample.generate(G, 6, 6, seed=0).int(), sample.generate(G, 6, 2, seed=0).int()
    assert (one_batch - three).abs().max() <= 1  # float rounding only (batch statistics would move them ~45 levels)


# ------------------------------------------------------------------------------------------ train.py's flags
def test_noise_z_dim_beta1_seed_and_loss_reach_the_run(tmp_path, monkeypatch):
    """--noise and --z-dim shape every z (and sample.py rebuilds that G), --beta1 is Adam's, --seed orders the data,
    --loss is the logged generator loss (minimax: log(1 - D) < 0 at D ~ 1/2), the MLP's output bias starts at the
    data's mean pixel, the diagnostic rows come only on steps that are multiples of --diag-every and --log-every,
    and the untrained G's samples are saved as step 0."""
    import sample

    noises, seeds, real_noise, real_loader = [], [], train.sample_noise, train.make_loader

    def spy_noise(n, cfg, *args, **kwargs):
        noises.append((cfg.noise, cfg.z_dim))
        return real_noise(n, cfg, *args, **kwargs)

    def spy_loader(dataset, batch_size, seed=0):
        seeds.append(seed)
        return real_loader(dataset, batch_size, seed=seed)

    monkeypatch.setattr(train, "sample_noise", spy_noise)
    monkeypatch.setattr(train, "make_loader", spy_loader)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    main(smoke(run_name="flags", noise="uniform", z_dim=7, beta1=0.3, seed=5, loss="minimax", lr=1e-12, steps=6,
               log_every=2, diag_every=3, sample_every=0, ckpt_every=0))
    assert noises and set(noises) == {("uniform", 7)} and seeds == [5]
    run = tmp_path / STAGE / "flags"
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert tuple(ckpt["opt_g"]["param_groups"][0]["betas"]) == (0.3, 0.999)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "gnorm_minimax" in r] == [6]
    assert all(r["g_loss"] < 0 for r in rows if "g_loss" in r)
    G = sample.load_generator(run / "ckpt.pt")
    assert G.cfg.z_dim == 7 and G.cfg.noise == "uniform"
    mean = to_unit(load_images("synthetic")[0]).mean(0).flatten().clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(G.net[-1].bias, torch.logit(mean), atol=1e-4, rtol=0)
    assert (run / "samples" / "step_000000.png").is_file()


def test_mnist_runs_train_on_the_first_50000_images_and_dcgan_sees_data_in_minus_1_1(tmp_path, monkeypatch):
    """The paper's split: a run on MNIST trains on train[:50000] (the rest picks Parzen's sigma); the tanh DCGAN's
    D sees real images scaled to [-1, 1]."""
    sizes, lows = [], []
    real_images, real_step = train.TensorImages, train.discriminator_step

    def spy_images(images, labels):
        sizes.append(len(images))
        return real_images(images, labels)

    def spy_step(G, D, opt_d, x, *args, **kwargs):
        lows.append(x.min().item())
        return real_step(G, D, opt_d, x, *args, **kwargs)

    monkeypatch.setattr(train, "TensorImages", spy_images)
    monkeypatch.setattr(train, "discriminator_step", spy_step)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    main(smoke(run_name="dc", dataset="mnist", arch="dcgan", size="tiny", batch_size=8, steps=1, sample_every=0,
               ckpt_every=0, diag_every=0))
    assert sizes == [50_000] and lows == [-1.0]


def test_simultaneous_update_gets_the_d_loss_scale(tmp_path, monkeypatch):
    """--d-loss-scale reaches the released code's simultaneous step too."""
    scales, real = [], train.simultaneous_step

    def spy(G, D, opt_g, opt_d, x, gan_cfg, loss_name, scale, *args, **kwargs):
        scales.append((loss_name, scale))
        return real(G, D, opt_g, opt_d, x, gan_cfg, loss_name, scale, *args, **kwargs)

    monkeypatch.setattr(train, "simultaneous_step", spy)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    main(smoke(run_name="sim", update="simultaneous", d_loss_scale=0.5, loss="minimax", steps=2, sample_every=0,
               ckpt_every=0))
    assert scales == [("minimax", 0.5)] * 2


def test_make_optimizer_takes_the_momentum_flag():
    """--momentum is SGD's initial momentum."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.3)).param_groups[0]["momentum"] == 0.3


def test_d_lr_is_the_discriminators_own_learning_rate_and_only_with_adam(tmp_path, monkeypatch):
    """--d-lr reaches D's optimizer and not G's (the checkpoint's optimizer states say so); 0 means --lr; with the
    released SGD schedule, which sets one rate for both players, it is refused."""
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    for name, d_lr in (("two", 5e-5), ("one", 0.0)):
        main(smoke(run_name=name, optimizer="adam", lr=2e-4, d_lr=d_lr, steps=2, sample_every=0, ckpt_every=0))
        ckpt = torch.load(tmp_path / STAGE / name / "ckpt.pt", weights_only=True)
        assert ckpt["opt_d"]["param_groups"][0]["lr"] == (d_lr or 2e-4)
        assert ckpt["opt_g"]["param_groups"][0]["lr"] == 2e-4
    with pytest.raises(UserError, match="--d-lr is for --optimizer adam"):
        main(smoke(optimizer="sgd", d_lr=1e-3))


# ------------------------------------------------------------------------------------------------ figures.py
class ZOut(torch.nn.Module):
    """A stand-in generator: the first z_dim pixels of G(z) are z."""

    cfg = GANConfig(z_dim=3)
    value_range = (-1.0, 1.0)

    def forward(self, z):
        return torch.nn.functional.pad(z, (0, 784 - 3)).view(-1, 1, 28, 28)


def test_interpolation_runs_from_z0_to_z1_in_equal_steps(tmp_path, monkeypatch):
    """Row r of interpolation.png: G((1 - t) z_0 + t z_1), t = 0, 1/9, ..., 1, z_0 and z_1 from the seed."""
    import figures

    grids = []
    monkeypatch.setattr(figures, "save_grid", lambda images, *a, **k: grids.append(images))
    figures.interpolation(ZOut(), tmp_path / "i.png", rows=2, steps=10, seed=4)
    g = torch.Generator().manual_seed(4)
    z0, z1 = sample_noise(2, ZOut.cfg, generator=g), sample_noise(2, ZOut.cfg, generator=g)
    t = torch.arange(10.0)[None, :, None] / 9
    z = grids[0].flatten(1)[:, :3].view(2, 10, 3)
    torch.testing.assert_close(z, (1 - t) * z0[:, None] + t * z1[:, None], atol=1e-6, rtol=0)


class Projection(ZOut):
    """A stand-in generator with distinct samples: tanh of a fixed projection of z."""

    W = torch.randn(3, 784, generator=torch.Generator().manual_seed(0))

    def forward(self, z):
        return torch.tanh(z @ self.W).view(-1, 1, 28, 28)


def test_nearest_neighbours_are_the_closest_of_the_first_50000_training_images(tmp_path, monkeypatch):
    """Each row: the sample, then its 5 nearest images of train[:50000] by distance, closest first; exact copies
    planted beyond image 50,000 (held out for Parzen's sigma) must not be found."""
    import figures

    G = Projection()
    samples = to_uint8(G(sample_noise(2, G.cfg, generator=torch.Generator().manual_seed(0))), G.value_range)
    train_images = torch.randint(0, 256, (50_010, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator())
    for i in range(2):
        for j in range(5):  # sample i's neighbours: copies with a growing offset at images 10 i + j
            train_images[10 * i + j] = (samples[i].int() + 3 * (j + 1)).clamp(0, 255).to(torch.uint8)
        train_images[50_000 + i] = samples[i]  # exact, but outside the paper's training images
    grids = []
    monkeypatch.setattr(figures, "load_images", lambda *a, **k: (train_images, None))
    monkeypatch.setattr(figures, "save_grid", lambda images, *a, **k: grids.append(images))
    figures.nearest_neighbours(G, tmp_path / "n.png", n=2, seed=0)
    rows = grids[0].view(2, 6, 784)
    for i in range(2):
        torch.testing.assert_close(rows[i, 0], to_unit(samples[i]).flatten())
        torch.testing.assert_close(rows[i, 1:], to_unit(train_images[10 * i:10 * i + 5]).flatten(1))


# --------------------------------------------------------------------------------------------- parzen_blur.py
@pytest.mark.parametrize("width", [0.7, 2.0])
def test_blur_is_a_9x9_gaussian_of_std_width(width):
    """blur() of a point is the normalized 9 x 9 Gaussian kernel of std ``width`` pixels around it."""
    from parzen_blur import blur

    point = torch.zeros(1, 1, 28, 28)
    point[0, 0, 14, 14] = 1.0
    k = torch.exp(-0.5 * (torch.arange(-4.0, 5.0) / width) ** 2)
    expected = torch.zeros(28, 28)
    expected[10:19, 10:19] = torch.outer(k, k) / k.sum() ** 2
    torch.testing.assert_close(blur(point, width)[0, 0], expected, atol=1e-6, rtol=0)


def test_blur_table_scores_blurred_samples_and_blurred_real_train_images_against_the_test_set(monkeypatch):
    """Each row's samples and real train[:10000] are both blurred by the row's width before the Parzen estimate,
    with the test split as the data and train[PARZEN_VALIDATION] to pick sigma."""
    import parzen_blur

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(parzen_blur, "REAL_IMAGES", 50)  # train[:50] and train[60:70] stand for the 10,000 and 1,000
    monkeypatch.setattr(parzen_blur, "PARZEN_VALIDATION", slice(60, 70))
    fake_train = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=g)
    fake_test = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=g)
    monkeypatch.setattr(parzen_blur, "load_images",
                        lambda dataset, train=True: (fake_train if train else fake_test, None))
    calls = []
    monkeypatch.setattr(parzen_blur, "parzen_log_likelihood",
                        lambda images, test, validation: calls.append((images, test, validation)) or (0.0, 0.0, 0.1))
    samples = torch.rand(30, 1, 28, 28, generator=g)
    parzen_blur.blur_table(samples, [0.0, 1.5])
    expected = [parzen_blur.blur(images, w) for w in (0.0, 1.5)
                for images in (samples, to_unit(fake_train[:50]))]
    assert len(calls) == 4
    for (images, test, validation), want in zip(calls, expected):
        assert torch.equal(images, want)
        assert torch.equal(test, to_unit(fake_test)) and torch.equal(validation, to_unit(fake_train[60:70]))
