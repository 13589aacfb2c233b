"""Pictures: sample grids (torchvision), loss curves (matplotlib, Agg), GIF strips, and uint8 sample files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` -> uint8 in [0, 255] (clamped, rounded)."""
    lo, hi = value_range
    return ((x.detach().float().cpu() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8,
              value_range: tuple[float, float] = (-1.0, 1.0), padding: int = 2) -> Path:
    """Save ``(N, C, H, W)`` images as one PNG grid; uint8 input needs no ``value_range``."""
    # Imported here, not at the top: torchvision's import takes seconds (it loads torch._dynamo), which every
    # script importing this module would pay, even for --help or a bad flag.
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else (x.float() - value_range[0]) / (value_range[1] - value_range[0])
    save_image(x.clamp(0, 1), path, nrow=nrow, padding=padding, pad_value=1.0)
    return path


def save_gif(frames: list[torch.Tensor], path: str | Path, nrow: int = 8,
             value_range: tuple[float, float] = (-1.0, 1.0), ms_per_frame: int = 120) -> Path:
    """Animate a list of ``(N, C, H, W)`` batches (one grid per frame), e.g. a sampler's trajectory."""
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = []
    for frame in frames:
        grid = make_grid(to_uint8(frame, value_range).float() / 255, nrow=nrow, padding=2, pad_value=1.0)
        pictures.append(Image.fromarray(to_uint8(grid, (0.0, 1.0)).permute(1, 2, 0).numpy()))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """One panel per scalar in ``records`` (dicts with a ``step``), e.g. the rows of ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k, v in r.items()
                   if k not in ("step", "time") and isinstance(v, (int, float))})
    if not records or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = np.array([(r["step"], r[key]) for r in records if key in r], dtype=float).reshape(-1, 2)
        ax.plot(points[:, 0], points[:, 1], lw=1, marker="o" if len(points) < 3 else None, ms=3)  # 1 point: a dot
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_samples_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None,
                     value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """The sample file every stage writes and ``python -m shared.evaluate`` reads: uint8 ``images``
    ``(N, C, H, W)`` and, for conditional samples, int64 ``labels`` ``(N,)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": (images if images.dtype == torch.uint8 else to_uint8(images, value_range)).numpy()}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().long().numpy()
    np.savez_compressed(path, **arrays)
    return path
