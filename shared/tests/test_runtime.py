import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import UserError, runtime
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.classifier import MNISTClassifier, predict
from shared.runtime import (
    Dist,
    allow_tf32,
    autocast,
    choose_device,
    ddp_setup,
    full_float32,
    print0,
    rank_seed,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
)


def _draw():
    return random.random(), float(np.random.rand()), torch.randn(3)


def test_same_seed_same_numbers():
    seed_everything(7)
    a = _draw()
    seed_everything(7)
    b = _draw()
    seed_everything(8)
    c = _draw()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    assert a[0] != c[0] and not torch.equal(a[2], c[2])


def test_rng_state_survives_a_safe_checkpoint(tmp_path):
    seed_everything(1)
    _draw()
    save_checkpoint({"stage": "00_toy", "rng": rng_state()}, tmp_path / "ckpt.pt")
    expected = _draw()
    seed_everything(99)
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt")["rng"])
    got = _draw()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_devices_and_autocast():
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            choose_device("cuda")
    with autocast(torch.device("cpu"), enabled=True):  # off on CPU: float32 stays float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_to_device_pins_and_does_not_block_only_from_the_cpu_to_cuda(monkeypatch):
    """No GPU here, so the copies are recorded, not made: CPU -> CUDA goes pinned and non-blocking (a pageable
    copy would make the host wait for the GPU's queue); every other move is a plain .to(device)."""
    calls, plain_to = [], torch.Tensor.to

    def recording_to(self, device, non_blocking=False):
        calls.append((self.device.type, str(device), non_blocking, self.is_pinned()))
        return self if torch.device(device).type == "cuda" else plain_to(self, device)

    def pin_memory(self):  # a pinned tensor is recognisable by this flag here
        pinned = self.clone()
        pinned.is_pinned = lambda: True
        return pinned

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    x = torch.arange(6.0)
    assert torch.equal(to_device(x, torch.device("cuda", 1)), x)
    assert torch.equal(to_device(x, torch.device("cpu")), x)
    to_device(torch.empty(2, device="meta"), torch.device("cuda"))  # not on the CPU: nothing to pin
    assert calls == [("cpu", "cuda:1", True, True), ("cpu", "cpu", False, False), ("meta", "cuda", False, False)]


def test_tf32_is_for_training_on_cuda_and_never_for_the_metrics_classifier(monkeypatch):
    """The flags only (no GPU here): allow_tf32 leaves the CPU alone, and the classifier's features are computed
    in full float32 (the reference statistics came from the CPU) even after a training run allowed TF32."""
    before = torch.get_float32_matmul_precision()
    seen = []
    model = MNISTClassifier().eval()
    features = model.features
    monkeypatch.setattr(model, "features", lambda x: seen.append(
        (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)) or features(x))
    try:
        allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # CPU runs stay bit-reproducible
        allow_tf32(torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high"
        with full_float32():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32  # restored
        predict(model, torch.zeros(3, 1, 28, 28, dtype=torch.uint8), batch_size=2)
        assert seen == [("highest", False)] * 2
    finally:
        torch.set_float32_matmul_precision(before)


def test_torchrun_all_reduces_gradients(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(Path(__file__).parent / "ddp_step.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and torch.equal(r0["weight"], r1["weight"]) and torch.equal(r0["bias"], r1["bias"])
    # The all-reduced step equals one step on both ranks' batches together (the mean of the two gradients).
    seed_everything(0)
    model = torch.nn.Linear(4, 1)
    x = torch.cat([torch.arange(8.0).reshape(2, 4) + 10 * r for r in (0, 1)])
    model(x).pow(2).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert torch.allclose(r0["weight"], model.weight.detach(), atol=1e-6)


def test_rng_state_keeps_the_cached_gaussians(tmp_path):
    """random.gauss and np.random.randn draw normals in pairs and cache the second: a resume must carry the cache,
    or its next normal is a fresh one rather than the one an uninterrupted run would have drawn."""
    seed_everything(2)
    random.gauss(0.0, 1.0), np.random.randn(), torch.randn(1)  # one of a pair: the other waits in each cache
    save_checkpoint({"stage": "00_toy", "rng": rng_state()}, tmp_path / "ckpt.pt")
    expected = random.gauss(0.0, 1.0), float(np.random.randn()), torch.randn(3)
    seed_everything(99)
    random.gauss(0.0, 1.0), np.random.randn()  # the caches now hold this seed's normals
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt")["rng"])
    got = random.gauss(0.0, 1.0), float(np.random.randn()), torch.randn(3)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_rank_seeds_are_mixed_not_added():
    """rank_seed(seed, rank) is SeedSequence([seed, rank]): (3, 1) and (4, 0) differ, as seed + rank would not."""
    assert rank_seed(3, 1) == int(np.random.SeedSequence([3, 1]).generate_state(1)[0])
    assert rank_seed(3, 1) != rank_seed(4, 0) and rank_seed(3, 0) != rank_seed(3, 1)


def test_one_process_is_not_distributed(monkeypatch):
    """WORLD_SIZE=1 under torchrun, like no torchrun at all, is one process: no process group, DDP off."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert ddp_setup("cpu") == Dist() and not torch.distributed.is_initialized()
    assert not Dist().enabled and Dist(0, 2).enabled and Dist().is_main and not Dist(1, 2).is_main


def test_an_unavailable_mps_is_one_clear_error(monkeypatch):
    """--device mps on a machine without Apple's MPS is a UserError, not a torch failure later."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="no Apple MPS device"):
        choose_device("mps")


def test_autocast_is_bf16_on_cuda_only_when_enabled():
    """autocast(cuda, False) is a no-op context; autocast(cuda, True) is torch's bf16 autocast."""
    import contextlib
    import warnings

    assert isinstance(autocast(torch.device("cuda"), enabled=False), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables autocast
        on = autocast(torch.device("cuda"), enabled=True)
    assert isinstance(on, torch.autocast) and on.fast_dtype == torch.bfloat16


def test_print0_prints_on_rank_0_only(monkeypatch, capsys):
    """Under DDP only rank 0 prints; without a process group, the one process does."""
    print0("alone")
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    for rank in (1, 0):
        monkeypatch.setattr(runtime.dist, "get_rank", lambda rank=rank: rank)
        print0(f"rank {rank}")
    assert capsys.readouterr().out == "alone\nrank 0\n"
