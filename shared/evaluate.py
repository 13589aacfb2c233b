"""Score a file of samples with the shared MNIST metrics: one table on stdout, the numbers in JSON.

    python -m shared.evaluate SAMPLES.npz [--json OUT] [--parzen] [--device auto|cpu|cuda|mps]

SAMPLES.npz holds uint8 ``images`` ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` and, for conditional samples,
``labels`` ``(N,)`` (what every stage's ``sample.py --out`` writes). Instead of a file, ``mnist-train:A:B``
or ``mnist-test:A:B`` scores real images ``[A:B]`` of that split (with their labels): the floors in the
README were measured so. See ``shared/metrics.py`` for what each number means.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np

from shared import UserError
from shared.cli import one_line_error, output_file, run_entry
from shared.data import load_images
from shared.metrics import SIGMA_GRID, as_images, evaluate, write_reference
from shared.runtime import DEVICES, choose_device

REAL = re.compile(r"^mnist-(train|test):(\d+):(\d+)$")


def read_samples(source: str) -> tuple[np.ndarray, np.ndarray | None, Path | None]:
    """``(images, labels or None, the file or None)`` from an ``.npz`` path or ``mnist-<split>:A:B``."""
    real = REAL.match(source)
    if real:
        split, a, b = real.group(1), int(real.group(2)), int(real.group(3))
        images, labels = load_images("mnist", train=split == "train")
        if not 0 <= a < b <= len(images):
            raise UserError(f"{source}: A:B must satisfy 0 <= A < B <= {len(images)}")
        return images[a:b].numpy(), labels[a:b].numpy(), None
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: no such file (give a .npz of samples, or mnist-train:A:B / mnist-test:A:B)")
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy: one array, no names
            raise UserError(f"{path} holds one unnamed array; save samples with np.savez(path, images=...)")
        keys = set(data.files)
        if "images" not in keys:
            raise UserError(f"{path} holds no 'images' array (it has: {', '.join(sorted(keys)) or 'nothing'})")
        return data["images"], (data["labels"] if "labels" in keys else None), path
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # also an object array, refused without pickle
        raise UserError(f"{path} is not a readable .npz of arrays ({type(err).__name__})") from None


def format_table(result: dict) -> str:
    rows = [("samples", f"{result['num_samples']:d}"),
            ("FID-MNIST (not Inception FID)", f"{result['fid']:.3f}"),
            ("  floor: real train images, same N", f"{result['fid_floor']:.3f}"),
            ("precision (k=3)", f"{result['precision']:.4f}"),
            ("recall (k=3)", f"{result['recall']:.4f}"),
            ("classifier confidence", f"{result['confidence']:.4f}")]
    if "label_accuracy" in result:
        rows.append(("label accuracy", f"{result['label_accuracy']:.4f}"))
    if "parzen_ll" in result:
        edge = result["parzen_sigma"] in (min(SIGMA_GRID), max(SIGMA_GRID))
        rows.append(("Parzen log-likelihood (nats)", f"{result['parzen_ll']:.1f} +- {result['parzen_se']:.1f}  "
                     f"(sigma {result['parzen_sigma']:.3f}" + (", at the edge of the grid!)" if edge else ")")))
        if "parzen_ll_real" in result:
            rows.append(("  real train[:10000], same method", f"{result['parzen_ll_real']:.1f}"))
    rows.append(("class histogram (%), digits 0-9", " ".join(f"{100 * p:.1f}" for p in result["class_histogram"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("samples", nargs="?", help="a .npz with uint8 'images' (and 'labels'), or mnist-train:A:B")
    parser.add_argument("--json", default="", help="where to write the JSON (default: SAMPLES.metrics.json "
                        "beside the .npz; nowhere for mnist-... sources)")
    parser.add_argument("--parzen", action="store_true", help="also the Parzen-window log-likelihood (slow: "
                        "~100 GFLOP for 10,000 samples)")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="where to run the classifier "
                        "(default: %(default)s)")
    parser.add_argument("--rebuild-reference", action="store_true", help="recompute the cached test-set "
                        "statistics, FID floor and real-data Parzen LL in shared/weights/mnist_reference.pt")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    if args.rebuild_reference:
        t0 = time.time()
        ref = write_reference(device)
        print(f"FID floor (train[:10000] vs test) {ref['fid_floor']['10000']:.3f}; Parzen LL of train[:10000] "
              f"{ref['parzen_real']['ll']:.1f} +- {ref['parzen_real']['se']:.1f} (sigma "
              f"{ref['parzen_real']['sigma']:.3f}); {time.time() - t0:.0f} s")
        if not args.samples:
            return None
    if not args.samples:
        parser.error("give SAMPLES (a .npz file or mnist-train:A:B)")
    images, labels, path = read_samples(args.samples)
    images = as_images(images)
    out = Path(args.json) if args.json else (path.with_suffix(".metrics.json") if path is not None else None)
    if out is not None:  # find out now, not after minutes of scoring, that the JSON can't be written
        output_file(out, "--json")
    t0 = time.time()
    result = evaluate(images, labels, parzen=args.parzen, device=device)
    result["source"] = args.samples
    result["seconds"] = round(time.time() - t0, 1)
    print(format_table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_entry(main)
