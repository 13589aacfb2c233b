"""Time one stage's ``sample.py`` from inside its own process, so start-up and imports are not counted.

    cd 03_ddpm && python ../benchmarks/time_sampling.py --counts 16 256 -- --ckpt run/ckpt.pt --steps 50

Runs the stage's ``sample.main`` ``--repeats`` times per count (after a first, untimed call that warms up
caches and CUDA) and prints one JSON line: for each count, the least seconds from "checkpoint loaded" to
"samples handed to save_samples_npz".
That span holds building the model and sampling (the images are on the host by then, so a GPU has finished);
benchmarks/bench.py divides the difference between two counts by the difference in images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import UserError  # noqa: E402
from shared.cli import one_line_error, run_entry  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("--counts", type=int, nargs="+", required=True, help="--num-samples values to time")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per count (the fastest is kept)")
    parser.add_argument("sample_args", nargs=argparse.REMAINDER, help="arguments for sample.py (after --)")
    args = parser.parse_args()
    sample_args = [a for a in args.sample_args if a != "--"]
    if min(args.counts) <= 0 or args.repeats <= 0:
        parser.error(f"--counts and --repeats must be positive, got {args.counts} and {args.repeats}")
    if not (Path.cwd() / "sample.py").is_file():
        raise UserError("no sample.py here: run this from a stage folder, e.g. "
                        "cd 03_ddpm && python ../benchmarks/time_sampling.py --counts 16 256 -- --ckpt run/ckpt.pt")

    sys.path.insert(0, str(Path.cwd()))
    import sample  # the stage's sample.py (cwd is the stage folder)

    marks = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            result = fn(*a, **k)
            marks[name] = time.perf_counter()
            return result
        return wrapper

    def saved(*a, **k):  # the time stamp comes before writing the file
        marks["saved"] = time.perf_counter()
        return save(*a, **k)

    sample.load_checkpoint = timed("loaded", sample.load_checkpoint)
    save = sample.save_samples_npz
    sample.save_samples_npz = saved
    def seconds(n: int, out: Path) -> float:
        sample.main([*sample_args, "--num-samples", str(n), "--out", str(out)])
        return marks["saved"] - marks["loaded"]

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.npz"
        seconds(args.counts[0], out)  # warm-up
        best = [min(seconds(n, out) for _ in range(args.repeats)) for n in args.counts]
    print(json.dumps({"counts": args.counts, "seconds": best}))


if __name__ == "__main__":
    run_entry(main)  # sample.main's UserErrors (a bad --ckpt) are one line here too
