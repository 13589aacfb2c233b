"""The frozen MNIST classifier every stage is measured with, and the script that trained it.

Input convention: float images in [0, 1], shape ``(N, 1, 28, 28)`` (``shared.data.to_unit`` of the uint8
data), no mean/std normalisation. ``features(x)`` returns the penultimate activations ``(N, 128)`` that
FID-MNIST and precision/recall compare; ``forward(x)`` returns class logits ``(N, 10)``.

The committed weights (``shared/weights/classifier.pt``, fp16, 99.48 % test accuracy) were made by::

    OMP_NUM_THREADS=1 nice -n 10 python -m shared.classifier --run-name classifier --export shared/weights/classifier.pt

(seed 0, 2,000 AdamW steps; 7 min 54 s wall on a 2-core CPU, no GPU, shared with other jobs. The run is
bit-reproducible on CPU: a repeat gave identical weights.)

It trains on ``train[:50000]`` only: ``train[50000:60000]`` stays unseen by the classifier, so it can serve
as held-out real data for the metrics (and as the Parzen validation split of Goodfellow et al. 2014).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import REPO_ROOT, UserError
from shared.checkpoint import load_checkpoint, provenance, save_checkpoint
from shared.cli import CommonConfig, arg, output_file, train_entry
from shared.data import load_images, to_unit
from shared.experiment import Run
from shared.runtime import autocast, full_float32, to_device

STAGE = "classifier"
WEIGHTS = REPO_ROOT / "shared" / "weights" / "classifier.pt"
TRAIN_SPLIT = 50_000  # the classifier sees train[:50000]; train[50000:60000] is held out


def conv_bn(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    """3x3 convolution -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MNISTClassifier(nn.Module):
    """Four 3x3 conv blocks (two strided), a 128-unit hidden layer, a linear head: 150k parameters,
    ~3 million multiply-adds per image, so 10,000 images embed in seconds on a CPU."""

    feature_dim = 128

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(1, 32, stride=2),            # (N, 32, 14, 14)
            conv_bn(32, 32),                     # (N, 32, 14, 14)
            conv_bn(32, 64, stride=2),           # (N, 64, 7, 7)
            conv_bn(64, 32, padding=0),          # (N, 32, 5, 5)
            nn.Flatten(),                        # (N, 800)
            nn.Linear(32 * 5 * 5, self.feature_dim), nn.ReLU(),  # (N, 128): the features
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(N, 128)`` of images in [0, 1], ``(N, 1, 28, 28)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 10) logits


@cache
def _load(path: str, device: str) -> MNISTClassifier:
    ckpt = load_checkpoint(path, STAGE)
    model = MNISTClassifier()
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False)
    return model.to(device)


def load_classifier(device: str | torch.device = "cpu", path: str | Path | None = None) -> MNISTClassifier:
    """The committed, frozen classifier (eval mode, no gradients), loaded once per process and device."""
    path = WEIGHTS if path is None else path
    if not Path(path).is_file():
        raise UserError(f"classifier weights {path} are missing; train them with `python -m shared.classifier "
                        f"--export {path}`")
    return _load(str(path), str(torch.device(device)))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, 128), logits (N, 10))`` on the CPU for uint8 images ``(N, 1, 28, 28)``, in batches."""
    device = next(model.parameters()).device
    feats, logits = [], []
    # Full float32 on CUDA too (no TF32), as the cached reference statistics were computed on the CPU: FID
    # compares features from both.
    with full_float32():
        for i in range(0, len(images), batch_size):
            x = to_unit(images[i:i + batch_size]).to(device)
            f = model.features(x)
            feats.append(f.float().cpu())
            logits.append(model.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


# --------------------------------------------------------------------------------------------------------
# Training (``python -m shared.classifier``)
# --------------------------------------------------------------------------------------------------------

PRESETS = {
    "smoke": dict(steps=40, batch_size=32, dataset="synthetic", log_every=10),
    "default": dict(steps=2000, batch_size=128, lr=3e-3),
    "full": dict(steps=2000, batch_size=128, lr=3e-3),
}


@dataclass
class TrainConfig(CommonConfig):
    steps: int = arg(2000, "optimizer steps (390 steps = one epoch of train[:50000] at batch 128)", min=1)
    lr: float = arg(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay to 0)", min=1e-12)
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    shift: int = arg(2, "augmentation: random translation by up to this many pixels")
    warmup: int = arg(100, "linear warm-up steps")
    sample_every: int = arg(0, "the classifier draws no samples, so this stays 0", max=0)
    ckpt_every: int = arg(400, "write a checkpoint every N steps (0: only at the end)")
    export: str = arg("", "also write the frozen weights (+ test accuracy, provenance) to this path, e.g. "
                      "shared/weights/classifier.pt")


def random_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate each image by an integer offset in [-shift, shift]^2 (zero padding); uses the torch RNG."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))  # (N, 1, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)  # (N, 1, H, W), one channel


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    _, logits = predict(model, images)
    return (logits.argmax(1) == labels).float().mean().item()


def main(cfg: TrainConfig) -> dict:
    t0 = time.time()
    if cfg.export:  # a bad path is found now, not after the training
        output_file(cfg.export, "--export")
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset, train=True)
        if cfg.dataset == "mnist":
            images, labels = images[:TRAIN_SPLIT], labels[:TRAIN_SPLIT]
        test_images, test_labels = load_images(cfg.dataset, train=False)
        model = MNISTClassifier().to(run.device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run.restore(model=model, optimizer=opt)
        net = run.wrap(model)
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():
            x, y = next(batches)
            x = to_device(random_shift(to_unit(x), cfg.shift), run.device)  # (B, 1, 28, 28) in [0, 1]
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            net.train()
            with autocast(run.device, cfg.amp):
                loss = F.cross_entropy(net(x), to_device(y, run.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.log(step, loss=loss)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, optimizer=opt)
        run.save_checkpoint(model=model, optimizer=opt)
        # The frozen copy stores fp16 weights (half the size); its accuracy is measured after the rounding.
        weights = {k: v.half() if v.is_floating_point() else v for k, v in model.cpu().state_dict().items()}
        frozen = MNISTClassifier()
        frozen.load_state_dict(weights)
        test_acc = accuracy(frozen, test_images, test_labels)
        run.flush(run.step, test_accuracy=test_acc)
        wall = time.time() - t0
        print(f"test accuracy {100 * test_acc:.2f}% (fp16 weights) after {run.step} steps, {wall:.0f} s wall")
        if cfg.export and run.is_main:
            payload = provenance(STAGE, {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, cfg.seed, run.step)
            payload.update(model=weights, test_accuracy=test_acc, train_split=f"train[:{TRAIN_SPLIT}]",
                           wall_seconds=round(wall, 1), command="python -m shared.classifier " + " ".join(sys.argv[1:]))
            print(f"exported frozen weights to {save_checkpoint(payload, cfg.export)}")
        return {"test_accuracy": test_acc, "wall_seconds": wall, "model": frozen}


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
