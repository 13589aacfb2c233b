"""The shared yardstick: FID-MNIST, precision/recall, Parzen LL and the frozen classifier behave as claimed."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from shared import UserError
from shared.checkpoint import load_checkpoint
from shared.classifier import WEIGHTS, MNISTClassifier, load_classifier, predict
from shared.cli import run_entry
from shared.data import load_images
from shared.metrics import (
    REFERENCE,
    _sha256,
    evaluate,
    frechet_distance,
    gaussian_stats,
    parzen_log_likelihood,
    precision_recall,
    real_features,
    reference,
)

N = 1000  # images per set: FID is compared between sets of the same size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two contended threads ran these tests 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist():
    train, train_labels = load_images("mnist", train=True)
    test, test_labels = load_images("mnist", train=False)
    return train, train_labels, test, test_labels


@pytest.fixture(scope="module")
def ref():
    return reference("cpu")


def fid_of(images, ref):
    feats = images if images.is_floating_point() else predict(load_classifier(), images)[0]
    return frechet_distance(*gaussian_stats(feats), ref["mu"], ref["sigma"])


def blur(images, sigma):
    return (TF.gaussian_blur(images.float(), kernel_size=9, sigma=sigma).round().clamp(0, 255)).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------
# Fréchet distance: closed forms and identities
# --------------------------------------------------------------------------------------------------------

def test_frechet_1d_and_diagonal_closed_form():
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-10)
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_symmetric_zero_and_rotation_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    d = frechet_distance(m1, s1, m2, s2)
    assert d > 1.0
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(d, rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # the same rotation of both Gaussians changes nothing
    assert frechet_distance(q @ m1, q @ s1 @ q.T, q @ m2, q @ s2 @ q.T) == pytest.approx(d, rel=1e-8)


# --------------------------------------------------------------------------------------------------------
# The frozen classifier
# --------------------------------------------------------------------------------------------------------

def test_classifier_weights_frozen_and_accurate(mnist):
    ckpt = load_checkpoint(WEIGHTS, "classifier")  # weights_only=True inside
    assert ckpt["test_accuracy"] >= 0.993 and "git_hash" in ckpt and "command" in ckpt
    model = load_classifier()
    assert model is load_classifier()  # cached per process
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert isinstance(model, MNISTClassifier)
    _, _, test, test_labels = mnist
    feats, logits = predict(model, test[:N])
    assert feats.shape == (N, MNISTClassifier.feature_dim) and logits.shape == (N, 10)
    assert (logits.argmax(1) == test_labels[:N]).float().mean() >= 0.99
    # the committed reference statistics were made with these very weights
    assert load_checkpoint(REFERENCE, "metrics-reference")["classifier_sha256"] == _sha256(WEIGHTS)


def test_classifier_training_entry_point(tmp_path, monkeypatch):
    from shared.classifier import PRESETS, TrainConfig, main, random_shift
    from shared.cli import config_from_preset

    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    shifted = random_shift(x, 2)
    assert torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3))) and not torch.equal(shifted, x)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    out = tmp_path / "clf.pt"
    cfg = config_from_preset(TrainConfig, PRESETS, "smoke", run_name="t", export=str(out))
    result = main(cfg)
    model = load_classifier(path=out)
    assert load_checkpoint(out, "classifier")["test_accuracy"] == result["test_accuracy"]
    assert model.features(torch.rand(2, 1, 28, 28)).shape == (2, 128)


# --------------------------------------------------------------------------------------------------------
# FID-MNIST orders what it should
# --------------------------------------------------------------------------------------------------------

def test_fid_real_near_floor_noise_and_blur_far_worse(mnist, ref):
    train, _, _, _ = mnist
    floor = fid_of(real_features("train", 0, N), ref)  # seen by the classifier, like the cached floor
    held_out = fid_of(train[50_000:50_000 + N], ref)   # never seen by the classifier
    noise = torch.randint(0, 256, (N, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    light, strong = fid_of(blur(train[:N], 1.0), ref), fid_of(blur(train[:N], 2.0), ref)
    assert held_out < 2 * floor
    assert light > 5 * floor
    assert strong > 1.5 * light
    assert fid_of(noise, ref) > 5 * strong


def test_single_class_shows_collapse(mnist):
    train, labels, _, _ = mnist
    ones = train[labels == 1][:1000]
    result = evaluate(ones, labels=torch.ones(len(ones), dtype=torch.long))
    assert result["class_histogram"][1] > 0.98 and abs(sum(result["class_histogram"]) - 1) < 1e-6
    assert result["recall"] < 0.2 and result["precision"] > 0.8
    assert result["label_accuracy"] > 0.98
    assert result["fid"] > 20 * result["fid_floor"]


def test_evaluate_real_data(mnist):
    train, labels, _, _ = mnist
    result = evaluate(train[50_000:50_000 + N].squeeze(1).numpy(), labels[50_000:50_000 + N])
    assert result["num_samples"] == N
    assert result["fid"] < 2 * result["fid_floor"]
    assert result["label_accuracy"] >= 0.99 and result["confidence"] > 0.97
    assert result["precision"] > 0.6 and result["recall"] > 0.6
    assert max(result["class_histogram"]) < 0.15
    with pytest.raises(UserError):
        evaluate(train[:10].float())


def test_precision_recall_on_gaussians():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 4, generator=g)
    assert precision_recall(real, torch.randn(1000, 4, generator=g)) > (0.6, 0.6)
    precision, recall = precision_recall(real, 0.2 * torch.randn(1000, 4, generator=g))  # a narrow subset
    assert precision > 0.9 and recall < 0.3
    precision, recall = precision_recall(real, torch.randn(1000, 4, generator=g) + 5)  # elsewhere
    assert precision < 0.05 and recall < 0.05


# --------------------------------------------------------------------------------------------------------
# Parzen windows
# --------------------------------------------------------------------------------------------------------

def test_parzen_matches_mixture_density():
    g = torch.Generator().manual_seed(0)
    samples, test = torch.rand(50, 3, generator=g), torch.rand(20, 3, generator=g)
    ll, se, sigma = parzen_log_likelihood(samples, test, validation=test, sigmas=(0.3,))
    comp = torch.distributions.Normal(samples[None], 0.3).log_prob(test[:, None]).sum(-1)  # (20, 50)
    exact = torch.logsumexp(comp, 1) - np.log(50)
    assert sigma == 0.3
    assert ll == pytest.approx(exact.mean().item(), abs=1e-4)
    assert se == pytest.approx(exact.std().item() / np.sqrt(20), rel=1e-3)


def test_parzen_real_beats_noise(mnist):
    train, _, test, _ = mnist
    noise = torch.randint(0, 256, (1000, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    val = train[50_000:50_200]
    real_ll, real_se, _ = parzen_log_likelihood(train[:1000], test[:500], val)
    noise_ll, _, noise_sigma = parzen_log_likelihood(noise, test[:500], val)
    assert real_ll > noise_ll + 100 and real_se > 0
    assert noise_sigma > 0.3  # noise needs wide windows to reach the data at all


# --------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------

def test_evaluate_cli(tmp_path, mnist, capsys):
    from shared.evaluate import main, read_samples

    train, labels, _, _ = mnist
    npz = tmp_path / "s.npz"
    np.savez_compressed(npz, images=train[50_000:50_500].numpy(), labels=labels[50_000:50_500].numpy())
    result = main([str(npz)])
    out = capsys.readouterr().out
    assert "FID-MNIST" in out and "label accuracy" in out
    saved = json.loads((tmp_path / "s.metrics.json").read_text())
    assert saved["fid"] == pytest.approx(result["fid"]) and len(saved["class_histogram"]) == 10
    images, lab, _ = read_samples("mnist-train:50000:50010")
    assert images.shape == (10, 1, 28, 28) and lab.shape == (10,)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros(3))
    for bad in ("mnist-train:5:2", str(tmp_path / "missing.npz"), str(tmp_path / "bad.npz")):
        with pytest.raises(UserError):
            read_samples(bad)
    assert REFERENCE.is_file()


def test_evaluate_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    from shared.evaluate import main

    np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object))
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 28, 28), dtype=np.uint8))
    (tmp_path / "a_folder").mkdir()
    for argv in (["--device", "tpu"], [], [str(tmp_path / "objects.npz")],
                 [str(tmp_path / "ok.npz"), "--json", str(tmp_path / "a_folder")]):
        with pytest.raises(SystemExit) as exit_info:
            run_entry(main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), argv
