"""One yardstick for every stage: sample-quality metrics on MNIST, in the frozen classifier's feature space.

``evaluate(images)`` takes uint8 images ``(N, 1, 28, 28)`` or ``(N, 28, 28)`` and returns a dict:

- ``fid``: FID-MNIST, the Fréchet distance between Gaussian fits of the classifier's 128-d penultimate
  features of the samples and of the 10,000 MNIST test images (Heusel et al. 2017). The recipe is FID's,
  the network is not Inception-v3: these numbers are NOT comparable to the Inception FID of papers.
- ``fid_floor``: the same FID for ``N`` real training images (``train[:N]``): what a generator that copies
  training digits scores at this sample size (FID is biased upwards for small N; held-out real images score a
  little above it). Cached for N = 10,000.
- ``precision`` / ``recall``: Kynkäänniemi et al. 2019, k = 3, same feature space, between ``test[:m]`` and the
  first ``m`` samples, m = min(N, 10,000).
- ``confidence``: mean max softmax probability; ``class_histogram``: fraction of samples per predicted
  class (mode collapse shows here); ``label_accuracy``: predicted class == the requested label.
- ``parzen_ll`` / ``parzen_se`` (``parzen=True``): Gaussian Parzen-window log-likelihood of the 10,000
  test images under the samples, in nats, as Goodfellow et al. 2014 measured it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from functools import cache

import numpy as np
import torch

from shared import REPO_ROOT, UserError
from shared.checkpoint import load_checkpoint, provenance, save_checkpoint
from shared.classifier import WEIGHTS, load_classifier, predict
from shared.data import load_images, to_unit
from shared.runtime import full_float32

REFERENCE = REPO_ROOT / "shared" / "weights" / "mnist_reference.pt"
REFERENCE_STAGE = "metrics-reference"
FLOOR_N = 10_000
K_NEAREST = 3
SIGMA_GRID = tuple(np.logspace(-1.0, 0.0, 10).tolist())  # Goodfellow et al. 2014: 10 values, 0.1 .. 1
PARZEN_VALIDATION = slice(50_000, 51_000)  # 1,000 images of train[50000:60000]


def as_images(images) -> torch.Tensor:
    """uint8 ``(N, 1, 28, 28)`` from a tensor or array of shape ``(N, 28, 28)`` or ``(N, 1, 28, 28)``."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype != torch.uint8:
        raise UserError(f"images must be uint8 in [0, 255], got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise UserError(f"images must have shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(x.shape)}")
    if len(x) <= K_NEAREST:
        raise UserError(f"need more than {K_NEAREST} images to evaluate, got {len(x)}")
    return x.cpu().contiguous()


# --------------------------------------------------------------------------------------------------------
# FID (Heusel et al. 2017)
# --------------------------------------------------------------------------------------------------------

def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), as in FID.

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", Eq. (6) (Dowson & Landau 1982 for the closed form):

        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

    Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}); the inner matrix is symmetric PSD, so its square
    root's trace is the sum of the square roots of its eigenvalues: no complex sqrtm, no scipy.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh(sigma1)
    s1_half = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^{1/2}
    inner = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(d2, 0.0))  # round-off can leave -1e-12 for identical statistics


# --------------------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019)
# --------------------------------------------------------------------------------------------------------

def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))``, in full float32 even after a training run on CUDA allowed
    TF32 (its 10-bit mantissa would move k-NN radii and Parzen densities off the CPU's values)."""
    with full_float32():
        return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def knn_radii(features: torch.Tensor, k: int = K_NEAREST, chunk: int = 1000) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded), ``(N,)``."""
    radii = [_sq_dists(features[i:i + chunk], features).topk(k + 1, dim=1, largest=False).values[:, k]
             for i in range(0, len(features), chunk)]
    return torch.cat(radii).sqrt()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEAREST,
                     real_radii: torch.Tensor | None = None, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 (NeurIPS), Eqs. (1)-(2).

    Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
    nearest neighbour. Precision: the fraction of fake points inside the real manifold (are samples
    realistic?). Recall: the fraction of real points inside the fake manifold (is the data covered?).
    ``real`` and ``fake`` are ``(N, D)`` features; both sets should have the same size.
    """
    real, fake = real.float(), fake.float()
    r_real = knn_radii(real, k) if real_radii is None else real_radii  # (R,)
    r_fake = knn_radii(fake, k)  # (F,)
    fake_inside, real_inside = [], torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for i in range(0, len(fake), chunk):
        # Distances, not squares: a radius squared again can round below the very distance it came from
        # (sqrt(2)^2 < 2 in float32), which would leave a point on a ball's edge outside it
        d = _sq_dists(fake[i:i + chunk], real).sqrt()  # (c, R), used for both directions
        fake_inside.append((d <= r_real[None, :]).any(1))
        real_inside |= (d <= r_fake[i:i + chunk, None]).any(0)
    return torch.cat(fake_inside).float().mean().item(), real_inside.float().mean().item()


# --------------------------------------------------------------------------------------------------------
# Parzen-window log-likelihood (Goodfellow et al. 2014, after Breuleux et al. 2011)
# --------------------------------------------------------------------------------------------------------

def _flat_unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return (to_unit(x) if x.dtype == torch.uint8 else x.float()).flatten(1)  # (N, D) in [0, 1]


def _parzen_ll(sq_dists: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """log (1/n) sum_i N(x; s_i, sigma^2 I) for each row of ``sq_dists`` = ||x - s_i||^2, ``(M, n)``."""
    n = sq_dists.shape[1]
    return (torch.logsumexp(-sq_dists / (2 * sigma ** 2), dim=1) - math.log(n)
            - 0.5 * dim * math.log(2 * math.pi * sigma ** 2))


def parzen_log_likelihood(samples, test, validation, sigmas=SIGMA_GRID, chunk: int = 500) -> tuple[float, float, float]:
    """Mean Parzen-window log-likelihood of ``test`` under ``samples`` with its standard error, and the sigma.

    Goodfellow et al. 2014, "Generative Adversarial Nets", Table 1 (method of Breuleux et al. 2011): put an
    isotropic Gaussian of width sigma on each of the (10,000) samples, pick sigma from a log-spaced grid by
    the mean log-likelihood of a validation set (1,000 images of train[50000:60000]), then report the mean
    log-likelihood of the test images, +- std / sqrt(M). Pixels are in [0, 1], D = 784; units are nats.
    Images may be uint8 or float in [0, 1], any shape ``(N, ...)``.
    """
    samples, test, validation = _flat_unit(samples), _flat_unit(test), _flat_unit(validation)
    dim = samples.shape[1]
    val_d2 = torch.cat([_sq_dists(validation[i:i + chunk], samples) for i in range(0, len(validation), chunk)])
    scores = [_parzen_ll(val_d2, s, dim).mean().item() for s in sigmas]
    sigma = float(sigmas[int(np.argmax(scores))])
    ll = torch.cat([_parzen_ll(_sq_dists(test[i:i + chunk], samples), sigma, dim) for i in range(0, len(test), chunk)])
    return ll.mean().item(), (ll.std() / math.sqrt(len(ll))).item(), sigma


# --------------------------------------------------------------------------------------------------------
# Reference statistics (MNIST test set) and the floor, cached in shared/weights/mnist_reference.pt
# --------------------------------------------------------------------------------------------------------

def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_FEATURES: dict[tuple[str, int, str], torch.Tensor] = {}


def real_features(split: str, start: int, stop: int, device="cpu") -> torch.Tensor:
    """Classifier features ``(stop - start, 128)`` of ``mnist-<split>[start:stop]``, cached per process
    (a longer range computed before serves a shorter one with the same start)."""
    key = (split, start, str(torch.device(device)))
    if key not in _FEATURES or len(_FEATURES[key]) < stop - start:
        images, _ = load_images("mnist", train=split == "train")
        _FEATURES[key] = predict(load_classifier(device), images[start:stop])[0]
    return _FEATURES[key][:stop - start]


@cache
def _test_radii(m: int, device: str) -> torch.Tensor:
    return knn_radii(real_features("test", 0, m, device).to(device))


def build_reference(device="cpu", parzen: bool = True) -> dict:
    """Test-set feature statistics, the FID floor at N = 10,000 and (optionally) real data's Parzen LL."""
    mu, sigma = gaussian_stats(real_features("test", 0, 10_000, device))
    floor = frechet_distance(*gaussian_stats(real_features("train", 0, FLOOR_N, device)), mu, sigma)
    ref = {**provenance(REFERENCE_STAGE, {"floor_images": f"train[:{FLOOR_N}]", "reference_images": "test"}, 0, 0),
           "classifier_sha256": _sha256(WEIGHTS), "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
           "fid_floor": {str(FLOOR_N): floor}}
    if parzen:
        train, _ = load_images("mnist", train=True)
        test, _ = load_images("mnist", train=False)
        ll, se, s = parzen_log_likelihood(train[:FLOOR_N], test, train[PARZEN_VALIDATION])
        ref["parzen_real"] = {"images": f"train[:{FLOOR_N}]", "ll": ll, "se": se, "sigma": s}
    return ref


@cache
def reference(device: str = "cpu") -> dict:
    """The cached reference (rebuilt in memory, without Parzen, if it was made for other classifier weights)."""
    if REFERENCE.is_file():
        ref = load_checkpoint(REFERENCE, REFERENCE_STAGE)
        if ref["classifier_sha256"] == _sha256(WEIGHTS):
            return ref
        warnings.warn(f"{REFERENCE} was made for other classifier weights; recomputing it (rebuild the file "
                      "with `python -m shared.evaluate --rebuild-reference`)", stacklevel=2)
    return build_reference(device, parzen=False)


def write_reference(device="cpu") -> dict:
    ref = build_reference(device, parzen=True)
    save_checkpoint(ref, REFERENCE)
    reference.cache_clear()
    return ref


def fid_floor(n: int, device="cpu") -> float:
    """FID of ``train[:n]`` (n <= 60,000) against the test statistics: the best score at sample size n."""
    n = min(n, 60_000)
    ref = reference(str(torch.device(device)))
    if str(n) in ref["fid_floor"]:
        return float(ref["fid_floor"][str(n)])
    floor = frechet_distance(*gaussian_stats(real_features("train", 0, n, device)), ref["mu"], ref["sigma"])
    ref["fid_floor"][str(n)] = floor
    return floor


# --------------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------------

def as_labels(labels, n: int) -> torch.Tensor:
    """``(N,)`` int64 digit labels from a tensor or array of N whole numbers in 0..9."""
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if y.ndim != 1:  # e.g. (N, 2) for 05's two-digit canvases, which are not 28 x 28 digits anyway
        raise UserError(f"labels must hold one digit per image, shape (N,), got shape {y.shape}")
    if y.dtype.kind not in "iuf":
        raise UserError(f"labels must be digits 0-9, got {y.dtype} values such as {y[:3].tolist()}")
    bad = y[~((y == np.round(y)) & (y >= 0) & (y <= 9))]
    if len(bad):
        raise UserError(f"labels must be digits 0-9, got {len(bad)} others, such as {bad[:3].tolist()}")
    if len(y) != n:
        raise UserError(f"got {len(y)} labels for {n} images")
    return torch.from_numpy(y.astype(np.int64))


def evaluate(images, labels=None, parzen: bool = False, device="cpu") -> dict:
    """All metrics for uint8 samples ``(N, 1, 28, 28)`` or ``(N, 28, 28)`` (and their labels, if conditional)."""
    images = as_images(images)
    n = len(images)
    labels = None if labels is None else as_labels(labels, n)  # a mistake shows before any scoring
    device = str(torch.device(device))
    ref = reference(device)
    feats, logits = predict(load_classifier(device), images)  # (N, 128), (N, 10)
    m = min(n, 10_000)  # precision/recall compare equally large sets: test[:m] and the first m samples
    precision, recall = precision_recall(real_features("test", 0, m, device).to(device), feats[:m].to(device),
                                         real_radii=_test_radii(m, device))
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    out = {
        "num_samples": n,
        "fid": frechet_distance(*gaussian_stats(feats), ref["mu"], ref["sigma"]),
        "fid_floor": fid_floor(n, device),
        "precision": precision,
        "recall": recall,
        "confidence": probs.max(1).values.mean().item(),
        "class_histogram": (torch.bincount(pred, minlength=10).float() / n).tolist(),
    }
    if labels is not None:
        out["label_accuracy"] = (pred == labels).float().mean().item()
    if parzen:
        train, _ = load_images("mnist", train=True)
        test, _ = load_images("mnist", train=False)
        dev = torch.device(device)
        ll, se, sigma = parzen_log_likelihood(images.to(dev), test.to(dev), train[PARZEN_VALIDATION].to(dev))
        out.update(parzen_ll=ll, parzen_se=se, parzen_sigma=sigma)
        if "parzen_real" in ref:
            out["parzen_ll_real"] = float(ref["parzen_real"]["ll"])
    return out
