"""How much the Parzen-window estimate of Table 1 rewards blur: score samples and real images, each blurred by
a Gaussian of a few widths, with the same protocol (``shared.metrics.parzen_log_likelihood``).

    python parzen_blur.py SAMPLES.npz                          # blur widths 0, 0.5, 0.8, 1.2 pixels
    python parzen_blur.py SAMPLES.npz --widths 0 1 --json assets/parzen_blur.json --picture assets/parzen_blur.png

Theis, van den Oord & Bethge (2016, "A note on the evaluation of generative models") showed that this
estimate can rank models differently from how good their samples look. Real training images are the
control: blur makes them worse pictures, so any gain in nats is the estimator's, not the model's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from shared import UserError
from shared.cli import one_line_error, output_file, run_entry
from shared.data import load_images, to_unit
from shared.evaluate import read_samples
from shared.images import save_grid
from shared.metrics import PARZEN_VALIDATION, as_images, parzen_log_likelihood

REAL_IMAGES = 10_000  # train[:10000], the real-data row of the README's results table


def blur(images: torch.Tensor, width: float) -> torch.Tensor:
    """(N, 1, 28, 28) images blurred by a Gaussian of std ``width`` pixels, kernel 9 x 9 (0: unchanged)."""
    return images if width == 0 else TF.gaussian_blur(images, kernel_size=9, sigma=width)


def blur_table(samples: torch.Tensor, widths: list[float]) -> list[dict]:
    """Parzen LL of the test set under blurred ``samples`` and under blurred real train[:10000], per width."""
    train, _ = load_images("mnist")
    test, _ = load_images("mnist", train=False)
    test, validation = to_unit(test), to_unit(train[PARZEN_VALIDATION])
    sources = {"samples": samples, "real": to_unit(train[:REAL_IMAGES])}
    rows = []
    for width in widths:
        row = {"blur_px": width}
        for name, images in sources.items():
            ll, se, sigma = parzen_log_likelihood(blur(images, width), test, validation)
            row[name] = {"parzen_ll": ll, "parzen_se": se, "parzen_sigma": sigma}
        print(f"blur {width:4.2f} px   samples {row['samples']['parzen_ll']:7.1f} +- "
              f"{row['samples']['parzen_se']:.1f} (sigma {row['samples']['parzen_sigma']:.3f})   "
              f"real {row['real']['parzen_ll']:7.1f} +- {row['real']['parzen_se']:.1f} "
              f"(sigma {row['real']['parzen_sigma']:.3f})", flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("samples", help="a .npz of uint8 'images' (what sample.py --out writes)")
    parser.add_argument("--widths", type=float, nargs="+", default=[0, 0.5, 0.8, 1.2],
                        help="std of the Gaussian blur, in pixels (0: the images as they are)")
    parser.add_argument("--json", default="", help="also write the table here")
    parser.add_argument("--picture", default="", help="also save the first 12 samples at each width, a row each")
    args = parser.parse_args(argv)
    if not all(0 <= w < float("inf") for w in args.widths):  # also refuses nan
        raise UserError(f"--widths must be >= 0 and finite, got {args.widths}")
    images, _, _ = read_samples(args.samples)
    samples = to_unit(as_images(images))  # (N, 1, 28, 28) in [0, 1]
    for flag, path in (("--json", args.json), ("--picture", args.picture)):
        if path:  # checked now, not after the minutes of scoring
            output_file(path, flag)
    rows = blur_table(samples, args.widths)
    if args.picture:
        save_grid(torch.cat([blur(samples[:12], w) for w in args.widths]), args.picture, nrow=12, value_range=(0, 1))
        print(f"wrote {args.picture}")
    if args.json:
        out = {"samples": args.samples, "num_samples": len(samples), "real": f"train[:{REAL_IMAGES}]",
               "command": f"python parzen_blur.py {args.samples} --widths {' '.join(map(str, args.widths))} "
                          f"--json {args.json}" + (f" --picture {args.picture}" if args.picture else ""),
               "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    run_entry(main)
