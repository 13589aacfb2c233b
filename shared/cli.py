"""Command lines: one spelling of the common flags for every stage, presets, validation, clean exits.

A stage declares ``@dataclass class TrainConfig(CommonConfig)`` with its own fields made by :func:`arg`;
:func:`parse_config` turns ``sys.argv`` into that dataclass, layering

    dataclass defaults  <  --preset  <  the resumed checkpoint's config  <  flags given on the command line

and :func:`run_entry` runs an entry point so that a user's mistake (:class:`~shared.UserError`) is one
line on stderr with exit code 2, and a diverged run is one line with exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared import UserError
from shared.data import DATASETS
from shared.runtime import DEVICES

SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
# Flags that describe one invocation, not the run: a resumed run never inherits them from its checkpoint.
PER_INVOCATION = ("resume", "stop_at", "max_minutes", "device", "compile", "channels_last")


def arg(default, help: str, choices: tuple | None = None, min: float | None = 0, max: float | None = None):
    """A config field with its ``--help`` text, allowed values and bounds (``None``: unbounded)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max})


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class CommonConfig:
    """Flags every stage's train.py has, spelled the same everywhere."""
    preset: str = arg("default", "smoke (<60 s on CPU), default (<15 min on 2 CPU cores), full (the recipe "
                      "aimed at the paper's result; GPU recommended), or a stage's own (listed below). Every other "
                      "flag overrides the preset")
    dataset: str = arg("mnist", "training data; mnist is bundled, the others download", DATASETS)
    steps: int = arg(1000, "optimizer steps to train for (in total, also when resuming)", min=1)
    batch_size: int = arg(128, "images per step (per process under DDP)", min=1)
    lr: float = arg(1e-3, "learning rate", min=1e-12)
    seed: int = arg(0, "seed for every random number generator; a seed fixes a run", max=SEED_MAX)
    device: str = arg("auto", "where to train: auto picks cuda, then mps, then cpu", DEVICES)
    amp: bool = arg(False, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = arg(False, "torch.compile the network")
    channels_last: bool = arg(False, "keep the network's conv weights (and so its activations) in channels_last "
                              "memory order, a speed option for conv nets")
    run_name: str = arg("", "folder under experiments/<stage>/ (default: <preset>-<date>-<time>)")
    resume: str = arg("", "continue a run: a checkpoint path, a run folder, or 'auto' (the named run, else the "
                      "newest run of this stage)")
    sample_every: int = arg(500, "write a sample grid every N steps (0: only at the end)")
    ckpt_every: int = arg(500, "write a checkpoint every N steps (0: only at the end)")
    log_every: int = arg(10, "average and log the losses every N steps", min=1)
    max_minutes: float = arg(0.0, "stop cleanly after M minutes of training, saving and sampling as at a "
                             "normal end (0: no limit)")
    stop_at: int = arg(0, "stop cleanly after this step as if interrupted, to resume later (0: never)")


def config_from_preset(config_cls, presets: dict, preset: str = "default", **overrides):
    """``config_cls`` filled from one preset and then ``overrides``: how tests and scripts build a config."""
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return config_cls(**{**presets[preset], "preset": preset, **overrides})


def one_line_error(message: str):
    """Replaces ``ArgumentParser.error``: one line and exit code 2, not argparse's usage block."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(config_cls, presets: dict, description: str) -> argparse.ArgumentParser:
    width = max(map(len, presets), default=0)
    epilog = "presets:\n" + "\n".join(f"  {name:{width}s} " + " ".join(f"{_flag(k)} {v}" for k, v in values.items())
                                       for name, values in presets.items())
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        default = getattr(defaults, f.name)
        text = meta.get("help", "")
        kwargs = {"default": argparse.SUPPRESS, "dest": f.name}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(default)
            kwargs["metavar"] = {int: "N", float: "X", str: "S"}[type(default)]
        choices = tuple(presets) if f.name == "preset" else meta.get("choices")
        if choices:
            kwargs["choices"] = choices
            kwargs.pop("metavar", None)
        parser.add_argument(_flag(f.name), help=f"{text} (default: {default!r})", **kwargs)
    return parser


def validate(cfg) -> None:
    """Range and choice checks for every field, from the bounds given to :func:`arg`."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        choices = meta.get("choices")
        if choices and value not in choices:
            raise UserError(f"{_flag(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            raise UserError(f"{_flag(f.name)} must be a finite number, got {value}")
        low, high = meta.get("min", 0), meta.get("max")
        if low is not None and value < low:
            raise UserError(f"{_flag(f.name)} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise UserError(f"{_flag(f.name)} must be at most {high}, got {value}")


def parse_config(config_cls, presets: dict, stage: str, argv: list[str] | None = None,
                 description: str = ""):
    from shared.checkpoint import load_checkpoint
    from shared.experiment import resolve_resume  # late import: experiment imports this module

    given = vars(build_parser(config_cls, presets, description).parse_args(argv))
    cfg = config_from_preset(config_cls, presets, given.get("preset", "default"))
    resume = given.get("resume", "")
    if resume:
        path = resolve_resume(stage, given.get("run_name", ""), resume)
        if path is not None:
            saved = load_checkpoint(path, stage)["config"]
            names = {f.name for f in dataclasses.fields(config_cls)}
            names = names - set(PER_INVOCATION)
            cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in names})
    cfg = dataclasses.replace(cfg, **given)
    validate(cfg)
    return cfg


SIGNAL_STOPS: list[int] = []  # the signals that stopped a training in this process after it saved (Run adds them)


def run_entry(fn: Callable, *args, **kwargs):
    """Call an entry point; turn a UserError into exit code 2, a diverged run into exit code 1 and a Ctrl-C
    outside training into one line and exit code 130. A training stopped by Ctrl-C or SIGTERM saves and ends
    on its own, then exits with 128 + the signal's number (130, 143) like a killed program: a stop is not a
    finished run, so ``train.py && sample.py`` or a job script stops there too."""
    SIGNAL_STOPS.clear()
    try:
        result = fn(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if SIGNAL_STOPS:
        sys.exit(128 + SIGNAL_STOPS[0])
    return result


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` once its folder exists and a file can be written there: a script calls this before its work,
    so a typo in an output path costs a second, not the minutes of sampling or scoring before the write."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: can't create its folder ({err.strerror})") from None
    if path.is_dir():
        raise UserError(f"{flag} {path}: a folder, not a file path")
    existed = path.exists()
    try:  # trying is the only sure test (a root user passes os.access on read-only places such as /proc)
        with open(path, "ab"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: not a writable file path ({err.strerror})") from None
    if not existed:
        path.unlink()
    return path


def sample_outputs(out: str, ckpt: Path) -> tuple[Path, Path]:
    """sample.py's two files, checked before any sampling: the ``.npz`` (``--out``, by default ``samples.npz``
    beside the checkpoint) and its grid picture (the same name, ``.png``)."""
    npz = Path(out) if out else ckpt.parent / "samples.npz"
    return output_file(npz, "--out"), output_file(npz.with_suffix(".png"), "--out (its .png grid)")


def output_dir(path: str | Path, flag: str) -> Path:
    """``path`` once it exists as a writable folder (the same early check as :func:`output_file`)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: can't create this folder ({err.strerror})") from None
    try:  # as in output_file: only a write tells (os.access passes for root on read-only places)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: not a writable folder ({err.strerror})") from None
    return path


def train_entry(main: Callable, config_cls, presets: dict, stage: str, description: str = "") -> None:
    """``if __name__ == "__main__": train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)``."""
    run_entry(lambda: main(parse_config(config_cls, presets, stage, description=description)))


def add_sample_args(parser: argparse.ArgumentParser, num_samples: int = 64) -> argparse.ArgumentParser:
    """The flags every sample.py shares (and one-line errors for bad flags)."""
    parser.error = one_line_error
    parser.add_argument("--ckpt", default="", help="checkpoint to sample from (default: this stage's newest "
                        "run, else pretrained/mnist.pt)")
    parser.add_argument("--num-samples", type=int, default=num_samples, help="how many images to draw "
                        "(default: %(default)s)")
    parser.add_argument("--out", default="", help="where to write the .npz of uint8 samples (default: "
                        "samples.npz beside the checkpoint); the grid PNG goes beside it")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sampler's noise (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to sample (default: %(default)s)")
    return parser


def check_seed(seed: int) -> None:
    """The one-line error for a ``--seed`` outside what ``torch.manual_seed`` takes, for scripts' own parsers."""
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be in [0, {SEED_MAX}], got {seed}")


MAX_SAMPLES = 10_000_000  # 7.8 GB of uint8 digits; beyond that a typo, not a plan, and memory runs out first


def check_sample_args(args: argparse.Namespace) -> None:
    check_seed(args.seed)
    if not 0 < args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples must be between 1 and {MAX_SAMPLES:,}, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out and not args.out.endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got {args.out!r}")
    if args.out:
        output_file(args.out, "--out")
