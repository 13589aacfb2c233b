"""Datasets as in-memory tensors, the transforms the stages share, and a resumable DDP-aware loader.

MNIST ships with the repository (``data/MNIST/raw/*.gz``, recompressed; their contents are byte-identical to
the original IDX files, whose md5s are checked) and is
decompressed on first use into the layout ``torchvision.datasets.MNIST`` reads. FashionMNIST comes through
torchvision's download; offline, that fails with one clear :class:`~shared.UserError`.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from shared import REPO_ROOT, UserError

DATA_ROOT = REPO_ROOT / "data"
DATASETS = ("mnist", "fashion-mnist", "synthetic")  # every stage is sized for 28x28 grey images
MNIST_FILES = {  # decompressed name -> md5 of the original IDX file
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_SIZES = {  # bytes of each IDX file (header + data): a cheap check of files unpacked earlier
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
RESTORE = "restore data/MNIST/raw/ from the repository"


def prepare_mnist(root: Path = DATA_ROOT) -> Path:
    """Decompress the bundled ``.gz`` files once, next to themselves, where torchvision looks for them."""
    raw = root / "MNIST" / "raw"
    for name in MNIST_FILES:
        target = raw / name
        if target.exists():
            if target.stat().st_size != MNIST_SIZES[name]:
                raise UserError(f"{target} has {target.stat().st_size} bytes, not MNIST's {MNIST_SIZES[name]}; "
                                f"delete it to unpack it again from its .gz, or {RESTORE}")
            continue
        packed = raw / (name + ".gz")
        if not packed.exists():
            raise UserError(f"MNIST file {packed} is missing; {RESTORE}")
        # A private temp file per process: the ranks of a fresh clone's first torchrun all unpack at once, and
        # the atomic rename means none of them ever reads a half-written file.
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=name + ".", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; the data is as readable as its .gz
        try:
            with gzip.open(packed, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as err:  # truncated or not gzip (BadGzipFile is an OSError), disk full
            os.remove(tmp)
            raise UserError(f"could not unpack {packed} ({type(err).__name__}: {err}); {RESTORE}") from None
        if hashlib.md5(Path(tmp).read_bytes()).hexdigest() != MNIST_FILES[name]:
            os.remove(tmp)
            raise UserError(f"{packed} is not the original MNIST file (md5 differs); {RESTORE}")
        os.replace(tmp, target)
    return root


def _torchvision_download(cls, root: Path, train: bool, folder: str):
    # torchvision makes its folders before it downloads; a failed download must not leave them behind, empty,
    # for the user to mistake for a dataset
    made = [p for p in (Path(folder), *Path(folder).parents) if not (root / p).exists()]
    try:
        return cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError too
        for path in made:  # deepest first; a folder that now holds something stays
            try:
                (root / path).rmdir()
            except OSError:
                pass
        raise UserError(
            f"could not download {cls.__name__} ({type(err).__name__}); with no internet, put its files in "
            f"{root / folder} yourself, or use --dataset mnist (bundled)"
        ) from None


def load_images(name: str, train: bool = True, root: Path = DATA_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``(N, C, H, W)`` and int64 ``(N,)``, the whole split in memory."""
    import torchvision.datasets as tvd

    if name == "mnist":
        ds = tvd.MNIST(str(prepare_mnist(root)), train=train, download=False)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    if name == "fashion-mnist":
        ds = _torchvision_download(tvd.FashionMNIST, root, train, "FashionMNIST/raw")
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    if name == "synthetic":
        return synthetic_images(512 if train else 128, seed=0 if train else 1)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def synthetic_images(n: int, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny MNIST-shaped dataset for unit tests: ten classes of bright bars at class-specific angles.

    Structured enough that a model can learn it in a few hundred steps, small enough to build in
    milliseconds. Returns uint8 ``(n, 1, size, size)`` images and int64 ``(n,)`` labels.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    angle = labels.float() * (torch.pi / 10) + 0.1 * torch.randn(n, generator=g)  # (n,)
    offset = 0.15 * torch.randn(n, generator=g)
    dist_to_line = (xx * torch.sin(angle)[:, None, None] - yy * torch.cos(angle)[:, None, None]
                    - offset[:, None, None]).abs()  # (n, H, W)
    bar = (dist_to_line < 0.12) & (xx.pow(2) + yy.pow(2) < 0.8)
    images = (bar.float() * 255).to(torch.uint8).unsqueeze(1)  # (n, 1, H, W)
    return images, labels


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [0, 1]."""
    return x.float() / 255.0


def to_symmetric(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [-1, 1], the range diffusion models and GANs work in."""
    return x.float() / 127.5 - 1.0


class TensorImages(Dataset):
    """``(images, labels)`` held in memory; fetches whole batches at once (``__getitems__``) for speed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert len(images) == len(labels)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def _already_batched(batch):
    return batch


def make_loader(dataset: TensorImages, batch_size: int, seed: int = 0) -> DataLoader:
    """A DataLoader whose order is a pure function of ``(seed, epoch)``.

    It always uses a ``DistributedSampler``: under DDP each rank reads its own shard; on one process it is
    simply a seeded shuffle. Because the order depends only on the epoch, resuming at step k needs no
    sampler state beyond k (see :func:`batches_from`).
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if len(dataset) < batch_size * world:
        raise UserError(f"dataset has {len(dataset)} images, fewer than one batch of {batch_size} per rank")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    # A private generator: otherwise each new iterator draws a seed from the global RNG, and a resumed run
    # (whose iterator starts at another moment) would drift from the uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=_already_batched, generator=torch.Generator().manual_seed(seed))


def batches_from(loader: DataLoader, step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, starting with the one that step ``step`` (0-based count of finished steps) sees."""
    per_epoch = len(loader)
    epoch, skip = divmod(step, per_epoch)
    while True:
        loader.sampler.set_epoch(epoch)
        yield from itertools.islice(loader, skip, None)
        epoch, skip = epoch + 1, 0
