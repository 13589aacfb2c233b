import gzip
import hashlib
import multiprocessing
import os
import shutil

import pytest
import torch

from shared import UserError, data
from shared.data import MNIST_FILES, TensorImages, batches_from, load_images, make_loader, to_symmetric

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_bundled_mnist_is_the_original():
    raw = data.DATA_ROOT / "MNIST" / "raw"
    for name, md5 in MNIST_FILES.items():
        with gzip.open(raw / f"{name}.gz", "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, name


@pytest.mark.parametrize("train,n,counts", [(True, 60000, TRAIN_COUNTS), (False, 10000, TEST_COUNTS)])
def test_mnist_loads_with_standard_sizes_and_label_counts(train, n, counts):
    images, labels = load_images("mnist", train=train)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == counts
    assert 0 < images.float().mean() < 255


def test_offline_download_is_one_clear_error(monkeypatch, tmp_path):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):  # what a machine without internet answers; torchvision's own code runs
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="FashionMNIST/raw"):
        load_images("fashion-mnist", root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no empty folders left to look like a dataset
    (tmp_path / "FashionMNIST").mkdir()
    (tmp_path / "FashionMNIST" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError):
        load_images("fashion-mnist", root=tmp_path)
    assert [p.name for p in (tmp_path / "FashionMNIST").iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="unknown dataset"):
        load_images("imagenet")


def test_transforms():
    x = torch.tensor([0, 255], dtype=torch.uint8)
    assert to_symmetric(x).tolist() == [-1.0, 1.0]


def test_loader_resumes_mid_stream():
    images, labels = data.synthetic_images(40)
    loader = make_loader(TensorImages(images, labels), batch_size=8, seed=3)
    stream = batches_from(loader)
    straight = [next(stream)[1] for _ in range(12)]
    resumed = batches_from(loader, step=7)  # 5 batches per epoch: starts in the second epoch
    for expected in straight[7:]:
        assert torch.equal(next(resumed)[1], expected)
    assert not torch.equal(straight[0], straight[5])  # epochs are reshuffled


def test_ranks_unpacking_mnist_at_once_all_succeed(tmp_path):
    """The ranks of a fresh clone's first torchrun all find the files packed and unpack them together."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(data.DATA_ROOT / "MNIST" / "raw" / f"{name}.gz", raw)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert pool.map(data.prepare_mnist, [tmp_path] * 3) == [tmp_path] * 3  # none raised
    assert sorted(p.name for p in raw.iterdir()) == sorted([*MNIST_FILES, *(n + ".gz" for n in MNIST_FILES)])
    umask = os.umask(0)
    os.umask(umask)
    for name, md5 in MNIST_FILES.items():
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5
        assert (raw / name).stat().st_mode & 0o777 == 0o666 & ~umask  # readable as the .gz is, not owner-only


def test_a_corrupt_mnist_file_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(b"not mnist")
    with pytest.raises(UserError, match="not the original MNIST file"):
        data.prepare_mnist(tmp_path)
    assert not list(raw.glob("*.tmp"))


def test_a_truncated_mnist_archive_or_a_damaged_unpacked_file_is_one_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    name = next(iter(MNIST_FILES))
    packed = (data.DATA_ROOT / "MNIST" / "raw" / f"{name}.gz").read_bytes()
    (raw / f"{name}.gz").write_bytes(packed[: len(packed) // 2])  # a download or copy cut short
    with pytest.raises(UserError, match=f"could not unpack .*{name}.gz \\(EOFError"):
        data.prepare_mnist(tmp_path)
    assert not list(raw.glob("*.tmp"))
    (raw / name).write_bytes(b"\0" * 100)  # an unpacked file that was cut or edited afterwards
    with pytest.raises(UserError, match=f"{name} has 100 bytes, not MNIST's 47040016"):
        data.prepare_mnist(tmp_path)


def test_loader_order_is_the_seeded_permutation_of_each_epoch():
    """Labels 0..39 name the images: epoch e reads randperm(40) drawn from seed + e (DistributedSampler's rule),
    so the order follows both the seed and the epoch, and two seeds give two orders."""
    images, _ = data.synthetic_images(40)
    loader = make_loader(TensorImages(images, torch.arange(40)), batch_size=8, seed=3)
    stream = batches_from(loader)
    for epoch in range(2):
        order = torch.cat([next(stream)[1] for _ in range(5)])
        assert torch.equal(order, torch.randperm(40, generator=torch.Generator().manual_seed(3 + epoch)))
    other = next(batches_from(make_loader(TensorImages(images, torch.arange(40)), batch_size=8, seed=4)))[1]
    assert not torch.equal(other, torch.randperm(40, generator=torch.Generator().manual_seed(3))[:8])


def test_loader_needs_exactly_one_full_batch_and_a_positive_batch_size():
    images, labels = data.synthetic_images(8)
    loader = make_loader(TensorImages(images, labels), batch_size=8)  # 8 images: one batch, the bound itself
    assert len(loader) == 1 and next(batches_from(loader))[0].shape == (8, 1, 28, 28)
    with pytest.raises(UserError, match="dataset has 8 images, fewer than one batch of 9 per rank"):
        make_loader(TensorImages(images, labels), batch_size=9)
    with pytest.raises(UserError, match="--batch-size must be positive, got 0"):
        make_loader(TensorImages(images, labels), batch_size=0)


def test_synthetic_test_split_is_a_smaller_set_of_its_own():
    """The synthetic dataset has 512 train and 128 test images, drawn from different seeds."""
    train, train_labels = load_images("synthetic", train=True)
    test, test_labels = load_images("synthetic", train=False)
    assert train.shape == (512, 1, 28, 28) and test.shape == (128, 1, 28, 28) and test.dtype == torch.uint8
    assert not torch.equal(test, train[:128]) and not torch.equal(test_labels, train_labels[:128])


def test_synthetic_bars_lie_at_the_class_angle_and_are_three_or_four_pixels_wide():
    """Class c's bar is oriented at c * pi / 10 (mean over images, second moments) and ~0.24 wide (3-4 pixels)."""
    images, labels = data.synthetic_images(500)
    w = (images[:, 0] > 0).float()  # (n, H, W)
    coords = torch.linspace(-1, 1, 28)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    mass = w.sum((1, 2))
    mx, my = (w * xx).sum((1, 2)) / mass, (w * yy).sum((1, 2)) / mass
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    cxx, cyy, cxy = ((w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2)))
    doubled = torch.polar(torch.ones(len(w)), torch.atan2(2 * cxy, cxx - cyy))  # orientation, as an angle mod pi
    for c in range(10):
        mean = (torch.angle(doubled[labels == c].mean()) / 2) % torch.pi
        assert abs(mean.item() - c * torch.pi / 10) < 0.05, c
    widths = w[labels == 0][:, :, 14].sum(1)  # class 0: a horizontal bar, crossed by the middle column
    assert set(widths.tolist()) <= {3.0, 4.0}
    assert data.synthetic_images(3, size=16)[0].shape == (3, 1, 16, 16)


def test_loader_drops_the_last_partial_batch():
    """42 images in batches of 8: five full batches an epoch, the two left over never read."""
    images, _ = data.synthetic_images(42)
    loader = make_loader(TensorImages(images, torch.arange(42)), batch_size=8)
    stream = batches_from(loader)
    assert len(loader) == 5 and all(len(next(stream)[1]) == 8 for _ in range(11))


def test_loader_leaves_the_global_rng_alone():
    """Iterating the loader draws nothing from torch's global RNG (it has its own generator)."""
    images, labels = data.synthetic_images(16)
    loader = make_loader(TensorImages(images, labels), batch_size=8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stream = batches_from(loader)
    for _ in range(5):
        next(stream)
    assert torch.equal(torch.get_rng_state(), before)


def test_ranks_read_disjoint_shards_with_no_padding(monkeypatch):
    """Under DDP (2 ranks, faked) with 43 images, batch 2: each rank reads 10 batches of its own, an epoch covers
    40 distinct images, none padded in twice to even the shards out."""
    images, _ = data.synthetic_images(43)
    monkeypatch.setattr(data.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(data.dist, "get_world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(data.dist, "get_rank", lambda rank=rank: rank)
        loader = make_loader(TensorImages(images, torch.arange(43)), batch_size=2, seed=5)
        stream = batches_from(loader)
        assert len(loader) == 10
        seen += [i for _ in range(10) for i in next(stream)[1].tolist()]
    assert len(seen) == 40 == len(set(seen))
