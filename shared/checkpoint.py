"""Checkpoints: atomic saves, safe loads (``weights_only=True``) and the provenance every file carries.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads without unpickling
arbitrary objects. Its keys: ``stage``, ``step``, ``seed``, ``config`` (the dataclass as a dict),
``git_hash``, ``torch_version``, ``cpu``, ``created``, then whatever state the stage saves (``model``, ``ema``,
``optimizer``, ``rng`` ...).
"""

from __future__ import annotations

import datetime
import os
import pickle
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from shared import REPO_ROOT, UserError


def git_hash() -> str:
    """The commit the code ran at, with ``-dirty`` when the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        # new source files not yet added count too; git-ignored outputs (experiments/, data/) do not
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_description() -> str:
    """The machine's CPU as far as float results go: architecture, the SIMD level torch's CPU kernels use, cores.

    One seed and one commit give bit-identical runs on one machine, but kernels built for another SIMD level
    (AVX2 against AVX-512) sum in another order; in a long GAN or diffusion run such last-bit differences grow
    into different weights, so a checkpoint says which kind of CPU made it.
    """
    return f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels, {os.cpu_count()} cores"


def provenance(stage: str, config: dict, seed: int, step: int, git: str | None = None) -> dict:
    """What a checkpoint says about where it came from; ``git``: the hash taken when the run started (by
    default, now)."""
    return {
        "stage": stage,
        "config": config,
        "seed": seed,
        "step": step,
        "git_hash": git if git is not None else git_hash(),
        "torch_version": str(torch.__version__),
        "cpu": cpu_description(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write ``payload`` atomically: to a temporary file in the same folder, then ``os.replace``.

    A process killed mid-save leaves at most a stray temporary file; ``path`` still holds the previous
    complete checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; a checkpoint is as readable as any file
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, stage: str | None = None) -> dict:
    """Load onto the CPU (GPU-made checkpoints too) with ``weights_only=True``; a missing, corrupt, unsafe or
    other-stage file is a UserError. A run's folder stands for the checkpoint in it."""
    path = Path(path)
    if path.is_dir():
        if not (path / "ckpt.pt").is_file():
            raise UserError(f"{path} is a folder with no ckpt.pt in it, not a checkpoint")
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln.upper().split(" ")]
        if unsafe:
            raise UserError(f"refusing to load {path}: not a plain-data checkpoint ({unsafe[0]})") from None
        raise UserError(f"{path} is not a readable checkpoint (UnpicklingError)") from None
    except Exception as err:  # a cut or garbled file can fail anywhere in the unpickler (KeyError, IndexError, ...)
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise UserError(f"{path} is not a ScratchGen checkpoint (it has no 'stage' entry)")
    if stage is not None and ckpt["stage"] != stage:
        raise UserError(f"{path} is a checkpoint of stage {ckpt['stage']}, not {stage}")
    return ckpt


def export_weights(ckpt: dict, path: str | Path, key: str = "ema") -> Path:
    """Keep only provenance and one set of weights (EMA by default): what ``pretrained/mnist.pt`` holds, as
    "model", with "weights" naming the set it came from ("ema", or "model" for a run without an EMA)."""
    key = key if key in ckpt else "model"
    keep = ("stage", "config", "seed", "step", "git_hash", "torch_version", "cpu", "created")
    return save_checkpoint({**{k: ckpt[k] for k in keep if k in ckpt}, "model": ckpt[key], "weights": key}, path)


def weights_of(ckpt: dict, path: str | Path, weights: str | None = None) -> dict:
    """The state dict of the weight set ``weights`` ("ema" or "model"; None: the EMA when there is one).

    A training checkpoint holds "model" and, if the run kept one, "ema". An exported file holds one set, as
    "model", and names it under "weights" (files exported before that held the raw weights). Asking for a set the
    file does not hold is an error, not a silent swap."""
    held = ["ema", "model"] if "ema" in ckpt else [ckpt.get("weights", "model")]
    weights = weights or held[0]
    if weights not in held:
        raise UserError(f"--weights {weights}: {path} holds only the {held[0]!r} weights; use --weights {held[0]}")
    return ckpt[weights] if "ema" in ckpt else ckpt["model"]


def load_error(err: Exception) -> str:
    """The line of a ``load_state_dict`` error that names the cause (its first line is only a header)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1].rstrip(".")
    return lines[0] if lines else type(err).__name__
