"""Seeds, devices, mixed precision and DDP: the machine-facing plumbing every train.py shares."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shared import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) so that a seed fixes a run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one DDP rank's training noise, mixed from (seed, rank) by NumPy's SeedSequence: unlike
    seed + rank, rank 0 does not replay the random numbers that built the weights from ``seed``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def choose_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if name == "mps" and not has_mps:
        raise UserError("--device mps was asked for, but this machine has no Apple MPS device")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x.to(device)``, except that a CPU tensor bound for CUDA goes through pinned memory with ``non_blocking``.

    A copy from ordinary (pageable) host memory makes the host wait until every kernel already queued on the GPU
    has finished, so a training loop that moves its batch each step could never queue the next step while the GPU
    runs this one. From pinned memory the copy is queued like a kernel; PyTorch's caching host allocator keeps the
    pinned buffer alive until the copy is done. On the CPU (and MPS) this is plain ``x.to(device)``."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def allow_tf32(device: torch.device) -> None:
    """For training on CUDA: float32 matrix products may use TF32 tensor cores (a 10-bit mantissa, as cuDNN's
    convolutions already do by default), several times faster on an A100 or H100 and well within what training
    tolerates. The CPU is left alone, so that CPU runs stay bit-reproducible. See :func:`full_float32`."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


@contextlib.contextmanager
def full_float32():
    """Full float32 matrix products and convolutions inside, whatever :func:`allow_tf32` set: for the metrics'
    classifier, whose features are compared with reference statistics computed on the CPU."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay in float32, bit-reproducible)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------
# DDP, driven by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# --------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def ddp_setup(device: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun``; else one process.

    The backend follows the device the run trains on (``--device``): nccl for CUDA, gloo otherwise, so
    ``--device cpu`` trains with gloo also on a machine that has GPUs."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size())


def ddp_teardown(barrier: bool = True) -> None:
    """Leave the process group; ``barrier=False`` after an error, when the other ranks may be waiting in a
    different collective and a barrier would hang until the timeout instead of letting torchrun stop the job."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only, so a DDP run prints each line once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------------------------------------
# RNG state as plain tensors and lists, so that it survives torch.load(weights_only=True)
# --------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's own GPU (one per rank under torchrun), so that a checkpoint
        state["cuda"] = torch.cuda.get_rng_state()  # resumes on a machine with fewer visible GPUs
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # older checkpoints held every visible GPU's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
