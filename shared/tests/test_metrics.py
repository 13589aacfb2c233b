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
from shared.images import read_metrics
from shared.metrics import (
    REFERENCE,
    SIGMA_GRID,
    _sha256,
    as_images,
    as_labels,
    evaluate,
    frechet_distance,
    gaussian_stats,
    knn_radii,
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

def test_gaussian_stats_are_the_mean_and_unbiased_covariance():
    """The cached reference statistics were made with the unbiased (N - 1) covariance; every FID must use it."""
    mu, sigma = gaussian_stats(torch.tensor([[0.0], [2.0]]))
    assert mu.tolist() == [1.0] and sigma.tolist() == 2.0  # (1 + 1) / (2 - 1), not / 2
    f = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert np.allclose(gaussian_stats(f)[1], np.cov(f.double().numpy().T, ddof=1))


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


def test_frechet_non_commuting_covariances():
    """Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2 (real and positive: S1 S2 is
    similar to S1^1/2 S2 S1^1/2), not Tr(S1^1/2 S2^1/2), which agrees with it only when S1 and S2 commute."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    eig = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eig.imag).max() < 1e-9 * np.abs(eig).max() and eig.real.min() > 0
    expected = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.real).sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # 2x2 by hand: Tr(M^1/2) = sqrt(Tr M + 2 sqrt(det M)); here S1 S2 = [[2, 3], [1, 3]], trace 5, det 3
    s1, s2 = np.array([[2.0, 1.0], [1.0, 1.0]]), np.diag([1.0, 3.0])
    assert frechet_distance([0.0, 0.0], s1, [0.0, 0.0], s2) == pytest.approx(7 - 2 * np.sqrt(5 + 2 * np.sqrt(3)),
                                                                              rel=1e-12)


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
    from shared.classifier import PRESETS, TrainConfig, learning_rate, main, random_shift
    from shared.cli import config_from_preset

    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    shifted = random_shift(x, 2)
    assert torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3))) and not torch.equal(shifted, x)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    (tmp_path / "a_file").write_text("")
    bad = config_from_preset(TrainConfig, PRESETS, "smoke", run_name="bad", export=str(tmp_path / "a_file/clf.pt"))
    with pytest.raises(UserError, match="--export"):
        main(bad)
    assert not (tmp_path / "classifier" / "bad").exists()  # refused before the run began
    out = tmp_path / "clf.pt"
    cfg = config_from_preset(TrainConfig, PRESETS, "smoke", run_name="t", export=str(out))
    result = main(cfg)
    model = load_classifier(path=out)
    assert load_checkpoint(out, "classifier")["test_accuracy"] == result["test_accuracy"]
    assert model.features(torch.rand(2, 1, 28, 28)).shape == (2, 128)
    # it learned: the logged loss falls from ~ln 10 and the 10 synthetic classes are told apart well above chance
    losses = [row["loss"] for row in read_metrics(tmp_path / "classifier" / "t" / "metrics.jsonl") if "loss" in row]
    assert len(losses) == cfg.steps // cfg.log_every and losses[-1] < 0.7 * losses[0]
    assert result["test_accuracy"] > 0.4
    # the optimizer took every step, at the scheduled learning rate
    opt = load_checkpoint(tmp_path / "classifier" / "t" / "ckpt.pt", "classifier")["optimizer"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(learning_rate(cfg, cfg.steps), rel=1e-12)
    assert {int(state["step"]) for state in opt["state"].values()} == {cfg.steps}


def test_classifier_training_step_runs_under_the_amp_flag(tmp_path, monkeypatch):
    """--amp is bf16 autocast on CUDA, a no-op here: a spy checks that every training step asks for it."""
    import shared.classifier as classifier
    from shared.cli import config_from_preset
    from shared.testing import autocast_requests

    asked = autocast_requests(monkeypatch, classifier)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    classifier.main(config_from_preset(classifier.TrainConfig, classifier.PRESETS, "smoke", steps=3, amp=True))
    assert asked == [True] * 3


def test_classifier_trains_on_train_50000_only_and_scores_in_eval_mode(tmp_path, monkeypatch):
    """train[50000:] must stay unseen (Parzen picks its sigma there), and accuracy is measured with dropout off
    and batch norm on its running statistics, whatever mode the model was left in."""
    import copy

    import shared.classifier as classifier
    from shared.cli import config_from_preset
    from shared.experiment import Run

    seen, real_batches = [], Run.batches

    def batches(self, images, labels, batch_size):
        seen.append(len(images))
        return real_batches(self, images, labels, batch_size)

    monkeypatch.setattr(Run, "batches", batches)
    monkeypatch.setenv("SCRATCHGEN_EXPERIMENTS", str(tmp_path))
    classifier.main(config_from_preset(classifier.TrainConfig, classifier.PRESETS, "smoke", dataset="mnist", steps=1))
    assert seen == [50_000]
    model = MNISTClassifier()  # in train mode, as a fresh module is
    x, y = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (64,))
    frozen = copy.deepcopy(model).eval()
    want = (predict(frozen, x)[1].argmax(1) == y).float().mean().item()
    assert classifier.accuracy(model, x, y) == want


def test_classifier_training_resumes_bit_identically(tmp_path):
    from shared.classifier import PRESETS, TrainConfig, main
    from shared.cli import config_from_preset
    from shared.testing import run_interrupted_and_straight, same_training

    cfg = config_from_preset(TrainConfig, PRESETS, "smoke", steps=12, ckpt_every=0, device="cpu")
    straight, resumed = run_interrupted_and_straight(main, cfg, stop_at=5, experiments=tmp_path)
    assert straight["step"] == resumed["step"] == 12 and same_training(straight, resumed) == []


def test_learning_rate_warmup_then_cosine_to_zero():
    from shared.classifier import TrainConfig, learning_rate

    cfg = TrainConfig(steps=1100, warmup=100, lr=3e-3)
    lr = [learning_rate(cfg, step) for step in range(cfg.steps + 1)]
    assert lr[0] == 0 and lr[50] == pytest.approx(1.5e-3, rel=1e-12)  # linear warm-up
    assert lr[100] == pytest.approx(3e-3, rel=1e-12) and max(lr) == lr[100]  # the peak, at the warm-up's end
    assert lr[350] == pytest.approx(1.5e-3 * (1 + np.sqrt(0.5)), rel=1e-12)  # a quarter into the cosine
    assert lr[600] == pytest.approx(1.5e-3, rel=1e-12)  # half-way through the cosine: half the peak
    assert lr[1100] == pytest.approx(0.0, abs=1e-18)  # decayed to 0 at the last step
    assert all(a < b for a, b in zip(lr[:100], lr[1:101])) and all(a > b for a, b in zip(lr[100:], lr[101:]))


def test_random_shift_translates_with_zero_fill():
    from shared.classifier import random_shift

    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 28, 28, generator=g) + 0.5  # every pixel distinct and non-zero, edges included
    s = 2
    torch.manual_seed(0)
    shifted = random_shift(x, s)
    assert shifted.shape == x.shape and random_shift(x, 0) is x

    def translate(img, dy, dx):  # content moves down by dy and right by dx; what comes in is 0
        out = torch.zeros_like(img)
        out[..., max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
            img[..., max(-dy, 0):28 - max(dy, 0), max(-dx, 0):28 - max(dx, 0)]
        return out

    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    seen = []
    for before, after in zip(x, shifted):
        matches = [o for o in offsets if torch.equal(after, translate(before, *o))]
        assert len(matches) == 1  # a zero-filled translate by one offset in [-s, s]^2: nothing wraps around
        seen.append(matches[0])
    assert set(seen) == set(offsets)  # each image draws its own offset, all 25 of them occur


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


def brute_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019, Eqs. (1)-(2), spelled out: each point's ball reaches its k-th nearest neighbour
    in its own set (itself excluded); a point counts when it lies in (or on) some ball of the other set."""
    real, fake = real.double(), fake.double()

    def sq_dists(a, b):
        return (a[:, None] - b[None]).pow(2).sum(-1)

    def kth_radius2(x):
        d2 = sq_dists(x, x)
        d2.fill_diagonal_(float("inf"))
        return d2.sort(1).values[:, k - 1]

    fake_to_real = sq_dists(fake, real)  # (F, R)
    precision = (fake_to_real <= kth_radius2(real)[None, :]).any(1).double().mean().item()
    recall = (fake_to_real <= kth_radius2(fake)[:, None]).any(0).double().mean().item()
    return precision, recall


def test_precision_recall_equals_brute_force():
    # Integer coordinates: every squared distance is exact in float32 and many points sit exactly on a ball's
    # edge, so the k-th neighbour (not the (k+1)-th) and "inside" meaning <= are both pinned down.
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 8, (40, 2), generator=g).float()
    fake = torch.randint(0, 8, (40, 2), generator=g).float() + torch.tensor([2.0, 0.0])  # overlapping in part
    for k in (1, 3):
        expected = brute_precision_recall(real, fake, k)
        assert 0.3 < expected[0] < 1 and 0.3 < expected[1] < 1  # neither trivially 0 nor 1
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-7)
        assert precision_recall(real, fake, k=k, chunk=7) == pytest.approx(expected, abs=1e-7)
        assert precision_recall(real, fake, k=k, real_radii=knn_radii(real, k)) == pytest.approx(expected, abs=1e-7)


def test_recall_uses_the_fake_sets_own_radii():
    # 50 fakes among 1,000 reals from the same Gaussian: the fakes' k-NN balls are wide and cover most of the
    # data (recall ~0.9); balls with the reals' small radii around the fakes would cover ~0.1 of it.
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(1000, 2, generator=g), torch.randn(50, 2, generator=g)
    precision, recall = precision_recall(real, fake)
    assert (precision, recall) == pytest.approx(brute_precision_recall(real, fake, 3), abs=1e-7)
    assert recall > 0.8


def test_precision_recall_count_points_exactly_on_a_ball_edge():
    # The balls are closed (Kynkaanniemi et al.'s code and metrics.py compare with <=): a point exactly at the
    # k-th-neighbour distance is inside. Here every radius^2 is 2, and float32 sqrt(2)^2 = 1.9999999 < 2.
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # each the other's nearest neighbour, radius^2 2
    b = torch.tensor([[2.0, 2.0], [10.0, 10.0]])  # (2, 2) is at distance^2 2 from (1, 1), (10, 10) far away
    assert brute_precision_recall(b, a, 1) == (1.0, 0.5) and brute_precision_recall(a, b, 1) == (0.5, 1.0)
    assert precision_recall(b, a, k=1) == (1.0, 0.5)  # recall: (2, 2) lies on the edge of (1, 1)'s ball
    assert precision_recall(a, b, k=1) == (0.5, 1.0)  # precision: the same point, seen from the other side


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
    # uint8 images are read as pixels in [0, 1], the same as the floats k / 255
    u8 = [torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8) for n in (30, 10, 10)]
    assert parzen_log_likelihood(*u8) == parzen_log_likelihood(*(x.float() / 255 for x in u8))


def test_parzen_sigma_chosen_on_validation_ll_reported_on_test():
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(20, 2, generator=g)
    validation = 1.6 * torch.rand(40, 2, generator=g) - 0.3  # spread wider than the samples: wide windows win
    test = samples.repeat(2, 1)[:30] + 0.1 * torch.randn(30, 2, generator=g)  # hugging the samples: narrow ones

    def mixture_ll(x, sigma):  # log (1/n) sum_i N(x; s_i, sigma^2 I), float64, (M,)
        d2 = (x.double()[:, None] - samples.double()[None]).pow(2).sum(-1)  # (M, n)
        log_normal = -d2 / (2 * sigma ** 2) - 0.5 * x.shape[1] * np.log(2 * np.pi * sigma ** 2)
        return torch.logsumexp(log_normal, 1) - np.log(len(samples))

    val_scores = [mixture_ll(validation, s).mean().item() for s in SIGMA_GRID]
    test_scores = [mixture_ll(test, s).mean().item() for s in SIGMA_GRID]
    best = int(np.argmax(val_scores))
    assert 0 < best < len(SIGMA_GRID) - 1 and best != int(np.argmax(test_scores))  # the case tells them apart
    ll, se, sigma = parzen_log_likelihood(samples, test, validation)
    assert sigma == SIGMA_GRID[best]
    exact = mixture_ll(test, sigma)
    assert ll == pytest.approx(exact.mean().item(), abs=1e-5)
    assert se == pytest.approx(exact.std().item() / np.sqrt(len(test)), rel=1e-4)


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


def test_evaluate_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from shared.evaluate import main

    def no_scoring(*args, **kwargs):
        raise AssertionError("the mistake must be found before any scoring")

    monkeypatch.setattr("shared.metrics.predict", no_scoring)
    said = []
    np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object))
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "one_array.npy", np.zeros((20, 28, 28), dtype=np.uint8))
    np.savez(tmp_path / "whole.npz", images=np.zeros((20, 28, 28), dtype=np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:1000])
    np.savez(tmp_path / "19_labels.npz", images=np.zeros((20, 28, 28), dtype=np.uint8), labels=np.arange(19) % 10)
    np.savez(tmp_path / "word_labels.npz", images=np.zeros((20, 28, 28), dtype=np.uint8), labels=np.array(["7"] * 20))
    np.savez(tmp_path / "minus_one.npz", images=np.zeros((20, 28, 28), dtype=np.uint8),
             labels=np.r_[np.arange(19) % 9, -1])
    np.savez(tmp_path / "pairs.npz", images=np.zeros((20, 28, 28), dtype=np.uint8), labels=np.zeros((20, 2), int))
    (tmp_path / "a_folder").mkdir()
    for argv in (["--device", "tpu"], [], [str(tmp_path / "objects.npz")],
                 [str(tmp_path / "ok.npz"), "--json", str(tmp_path / "a_folder")],
                 [str(tmp_path / "one_array.npy")], [str(tmp_path / "cut.npz")], [str(tmp_path / "19_labels.npz")],
                 [str(tmp_path / "word_labels.npz")], [str(tmp_path / "minus_one.npz")],
                 [str(tmp_path / "pairs.npz")]):
        with pytest.raises(SystemExit) as exit_info:
            run_entry(main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), argv
        said.append(err)
    assert "such as [-1]" in said[-2] and "shape (20, 2)" in said[-1]  # the message names what is wrong


def test_distances_ignore_a_training_runs_tf32_setting(monkeypatch):
    """A Run on CUDA allows TF32 for the whole process (runtime.allow_tf32); the k-NN and Parzen distances are
    still full float32 products, like the CPU values they are compared with."""
    precisions, matmul = [], torch.Tensor.__matmul__

    def recorded(a, b):
        precisions.append(torch.get_float32_matmul_precision())
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", recorded)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        x, y = torch.randn(20, 8), torch.randn(30, 8)
        precision_recall(x, y)
        parzen_log_likelihood(torch.rand(20, 1, 4, 4), torch.rand(10, 1, 4, 4), torch.rand(10, 1, 4, 4))
    finally:
        torch.set_float32_matmul_precision(before)
    assert len(precisions) >= 3 and set(precisions) == {"highest"}


# --------------------------------------------------------------------------------------------------------
# Edges the other tests leave open
# --------------------------------------------------------------------------------------------------------

def test_evaluate_needs_more_than_k_images_and_takes_fractions_of_digits_as_mistakes():
    """k = 3 nearest neighbours need at least 4 images; labels must be whole digits (2.5 is refused, 2.0 is 2)."""
    with pytest.raises(UserError, match="need more than 3 images to evaluate, got 3"):
        as_images(np.zeros((3, 28, 28), np.uint8))
    assert as_images(np.zeros((4, 28, 28), np.uint8)).shape == (4, 1, 28, 28)
    with pytest.raises(UserError, match=r"such as \[2.5\]"):
        as_labels(np.array([1.0, 2.5]), 2)
    assert as_labels(np.array([9.0, 2.0]), 2).tolist() == [9, 2]


def test_histogram_has_ten_bins_and_confidence_is_a_probability(mnist):
    """Samples all of digit 0 still give a 10-bin histogram; the confidence is a mean softmax probability."""
    train, labels, _, _ = mnist
    zeros = train[labels == 0][:8]
    result = evaluate(zeros)
    assert len(result["class_histogram"]) == 10 and result["class_histogram"][0] == 1.0
    assert 0.9 < result["confidence"] <= 1.0


def test_parzen_evaluation_reports_the_real_data_reference():
    """evaluate(parzen=True) reports beside the samples' LL the cached LL of real train[:10000]."""
    noise = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    result = evaluate(noise, parzen=True)
    assert result["parzen_ll_real"] == pytest.approx(float(reference("cpu")["parzen_real"]["ll"]))
    assert result["parzen_ll"] < result["parzen_ll_real"] and result["parzen_sigma"] in SIGMA_GRID


def test_real_features_cache_serves_a_longer_range_anew():
    """A cached shorter range does not cut a longer request short: features of [start:stop] have stop - start rows."""
    short = real_features("test", 1234, 1236)
    longer = real_features("test", 1234, 1240)
    assert short.shape == (2, 128) and longer.shape == (6, 128) and torch.allclose(longer[:2], short, atol=1e-4)


def test_knn_radii_of_duplicates_far_from_the_origin_are_near_zero_not_nan():
    """Points repeated 4 times have their 3rd neighbour at ~0 (float32 cancellation), never NaN where
    |a|^2 + |b|^2 - 2ab rounds below 0."""
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0)) * 100 + 1000  # |x|^2 ~ 1.6e7
    radii = knn_radii(torch.cat([x] * 4))
    assert torch.isfinite(radii).all() and radii.max() < 3


def test_sigma_grid_is_goodfellows_ten_log_spaced_values():
    """Goodfellow et al. 2014's grid: 10 values, log-spaced from 0.1 to 1."""
    assert len(SIGMA_GRID) == 10 and SIGMA_GRID[0] == pytest.approx(0.1) and SIGMA_GRID[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log(SIGMA_GRID)), np.log(10) / 9)


def test_missing_classifier_weights_say_how_to_train_them(tmp_path):
    """A missing weights file is a UserError naming the command that makes it."""
    with pytest.raises(UserError, match="train them with `python -m shared.classifier --export"):
        load_classifier(path=tmp_path / "none.pt")


def test_evaluate_table_and_sources_name_their_edges():
    """mnist-train:A:A is refused (A < B); a sigma at the grid's edge is flagged in the table."""
    from shared.evaluate import format_table, read_samples

    with pytest.raises(UserError, match="0 <= A < B"):
        read_samples("mnist-train:5:5")
    result = {"num_samples": 4, "fid": 1.0, "fid_floor": 1.0, "precision": 1.0, "recall": 1.0, "confidence": 1.0,
              "class_histogram": [0.1] * 10, "parzen_ll": 1.0, "parzen_se": 0.1}
    assert "at the edge of the grid" in format_table({**result, "parzen_sigma": max(SIGMA_GRID)})
    assert "at the edge of the grid" not in format_table({**result, "parzen_sigma": SIGMA_GRID[4]})


def test_frechet_of_identical_gaussians_is_never_negative():
    """Round-off can leave d^2 = -3e-13 for identical statistics (seed 3 here); the distance is clipped to >= 0."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a = rng.normal(size=(8, 8))
        s, m = a @ a.T + 0.1 * np.eye(8), rng.normal(size=8)
        assert 0.0 <= frechet_distance(m, s, m, s) < 1e-8, seed
