"""One training run's plumbing: its folder, resume, signals, DDP wrapping, progress, metrics, checkpoints.

The training loop itself stays in each stage's train.py, flat and visible::

    with Run("01_vae", cfg) as run:
        model = VAE(...).to(run.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        run.restore(model=model, optimizer=opt)          # no-op unless --resume
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():                          # stops at --steps, Ctrl-C, --max-minutes, --stop-at
            x, y = next(batches)
            loss = ...; opt.zero_grad(); loss.backward(); opt.step()
            run.log(step, loss=loss)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, optimizer=opt)
        run.save_checkpoint(model=model, optimizer=opt)   # also after an early stop
        run.save_images(samples, "final.png")

Everything is written to ``experiments/<stage>/<run-name>/`` at the repository root (or under
``$SCRATCHGEN_EXPERIMENTS``), by rank 0 only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from shared import REPO_ROOT, UserError
from shared.checkpoint import git_hash, load_checkpoint, load_error, provenance, save_checkpoint
from shared.cli import SIGNAL_STOPS, TrainingDiverged
from shared.data import TensorImages, batches_from, make_loader
from shared.images import plot_curves, read_metrics, save_grid
from shared.runtime import (
    allow_tf32,
    choose_device,
    ddp_setup,
    ddp_teardown,
    print0,
    rank_seed,
    rng_state,
    seed_everything,
    set_rng_state,
)

CKPT_NAME = "ckpt.pt"
# printed when a run stops early; a script that drives train.py itself (04_dit/ladder.py) blanks it and says how
# to continue the whole script instead
RESUME_HINT = "continue with: python train.py --resume {ckpt}"


def experiments_dir() -> Path:
    return Path(os.environ.get("SCRATCHGEN_EXPERIMENTS", REPO_ROOT / "experiments"))


def newest_checkpoint(stage: str) -> Path | None:
    runs = sorted((experiments_dir() / stage).rglob(CKPT_NAME), key=lambda p: p.stat().st_mtime)  # also fig2/z20
    return runs[-1] if runs else None


def resolve_resume(stage: str, run_name: str, resume: str) -> Path | None:
    """``--resume`` as a checkpoint path: a file, a run folder, or ``auto`` (None when there is none)."""
    if not resume:
        return None
    if resume == "auto":
        if run_name:
            path = experiments_dir() / stage / run_name / CKPT_NAME
            return path if path.is_file() else None
        return newest_checkpoint(stage)
    path = Path(resume)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint at {path}")
    return path


def find_checkpoint(stage: str, stage_dir: Path, ckpt: str = "") -> Path:
    """What sample.py loads: ``--ckpt`` if given, else the stage's newest run, else ``pretrained/mnist.pt``."""
    if ckpt:
        path = Path(ckpt)
        path = path / CKPT_NAME if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"--ckpt {ckpt}: no such checkpoint")
        return path
    for path in (newest_checkpoint(stage), stage_dir / "pretrained" / "mnist.pt"):
        if path is not None and path.is_file():
            return path
    raise UserError(f"no checkpoint of {stage} found: train one with `python train.py` or pass --ckpt")


def _unwrap(obj):
    obj = getattr(obj, "module", obj)  # DistributedDataParallel
    return getattr(obj, "_orig_mod", obj)  # torch.compile


class Run:
    def __init__(self, stage: str, cfg):
        self.stage, self.cfg = stage, cfg
        self.dist = ddp_setup(cfg.device)
        self.device = choose_device(cfg.device)
        allow_tf32(self.device)
        # Every rank builds the same initial weights (and EMA copies) from one seed; restore() gives each rank
        # its own noise once the models exist.
        seed_everything(cfg.seed)
        self.git_hash = git_hash()  # the code this run started with, not whatever the tree holds at each save
        self.resume_from = resolve_resume(stage, cfg.run_name, cfg.resume)
        if self.resume_from is not None:
            self.dir = self.resume_from.parent
            # The config records the folder the run continues in, whatever --run-name said.
            runs, here = (experiments_dir() / stage).resolve(), self.dir.resolve()  # --resume may be relative
            name = here.relative_to(runs).as_posix() if here.is_relative_to(runs) else str(self.dir)
            self.cfg = cfg = dataclasses.replace(cfg, run_name=name)
            newer = self.dir / CKPT_NAME
            if self.resume_from.name != CKPT_NAME and newer.is_file():
                # Resuming writes ckpt.pt and cuts metrics.jsonl back to the snapshot's step: the run's newer
                # work would be lost.
                raise UserError(f"--resume {self.resume_from}: its folder holds the run's own {CKPT_NAME}, "
                                f"which resuming from this snapshot would overwrite; copy the snapshot into a "
                                f"new folder as {CKPT_NAME} and resume that")
        else:
            name = cfg.run_name or f"{cfg.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            if Path(name).is_absolute() or ".." in Path(name).parts:  # sub-folders such as fig2/z20 are fine
                raise UserError(f"--run-name {name}: a name inside experiments/{stage}/, not a path out of it")
            if self.dist.enabled:  # every rank writes to rank 0's folder name
                holder = [name]
                dist.broadcast_object_list(holder, src=0)
                name = holder[0]
            self.dir = experiments_dir() / stage / name
            if (self.dir / CKPT_NAME).exists():
                raise UserError(f"{self.dir} already holds a run; continue it with --resume auto "
                                f"--run-name {name}, or pick another --run-name")
        self.ckpt_path = self.dir / CKPT_NAME
        self.metrics_path = self.dir / "metrics.jsonl"
        self.is_main = self.dist.is_main
        self.step = 0
        self.stop_reason = ""
        self._signalled = 0  # the signal that came, if one did: the next one aborts (an automatic stop does not count)
        self._sums: dict[str, float | torch.Tensor] = {}  # the logging window: steps since the last row
        self._counts: dict[str, int] = {}
        self._rows = 0  # rows in metrics.jsonl
        self._t0 = time.monotonic()
        self._bar = None
        self._old_handlers = {}
        if self.is_main and self.resume_from is None:  # a resumed run's folder is written once restore() fits
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            self.metrics_path.unlink(missing_ok=True)  # a run that died before its first checkpoint leaves rows

    def _write_config(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    # ---------------------------------------------------------------------------------------------------
    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if self._bar is not None:
            self._bar.close()
        if exc_type is None:
            self.flush(self.step)  # the steps since the last row, e.g. after --max-minutes
        if self.is_main and exc_type is None:
            plot_curves(read_metrics(self.metrics_path), self.dir / "loss.png", title=self.stage)
            how = f"stopped early ({self.stop_reason})" if self.stop_reason else "finished"
            print0(f"{self.stage}: {how} at step {self.step}; outputs in {self.dir}")
            if self.stop_reason and RESUME_HINT:
                print0(RESUME_HINT.format(ckpt=self.ckpt_path) + self._invocation_flags())
        if exc_type is not None and issubclass(exc_type, UserError) and self.is_main and self.resume_from is None \
                and self.dir.is_dir():
            written = list(self.dir.iterdir())
            if {p.name for p in written} <= {"config.json", "metrics.jsonl"}:  # a mistake this early leaves no run
                for path in written:
                    path.unlink()
                self.dir.rmdir()
        if exc_type is None and self._signalled:
            SIGNAL_STOPS.append(self._signalled)
        ddp_teardown(barrier=exc_type is None)
        return False

    def _invocation_flags(self) -> str:
        """This invocation's flags that change the arithmetic and that a resume does not inherit (cli.py's
        PER_INVOCATION): the hint repeats them, so that following it continues the same computation."""
        flags = [f"--{name.replace('_', '-')}" for name in ("compile", "channels_last")
                 if getattr(self.cfg, name, False)]
        if getattr(self.cfg, "device", "auto") != "auto":
            flags.append(f"--device {self.cfg.device}")
        return "".join(" " + flag for flag in flags)

    def _on_signal(self, signum, frame):
        if self._signalled:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self._signalled = signum
        self.stop_reason = self.stop_reason or signal.Signals(signum).name
        print0(f"\n{self.stop_reason}: finishing step, saving a checkpoint and samples (again to abort)")

    # ---------------------------------------------------------------------------------------------------
    def restore(self, **objects) -> int:
        """Load model/optimizer/EMA/... state and the RNG from ``--resume``; return the step reached."""
        if self.resume_from is None:
            if self.dist.enabled:  # the models are built (identically): from here on each rank its own noise
                seed_everything(rank_seed(self.cfg.seed, self.dist.rank))
            return 0
        ckpt = load_checkpoint(self.resume_from, self.stage)
        for name, obj in objects.items():
            if name not in ckpt:
                raise UserError(f"{self.resume_from} holds no '{name}' state, so training can't resume from it")
            try:
                _unwrap(obj).load_state_dict(ckpt[name])
            except (RuntimeError, ValueError, KeyError) as err:
                raise UserError(f"{self.resume_from} does not fit this configuration ({load_error(err)})") from None
        self.step = int(ckpt["step"])
        if self.step > self.cfg.steps:
            raise UserError(f"--steps {self.cfg.steps} is below the step {self.step} that {self.resume_from} "
                            f"already reached")
        states = ckpt.get("rng_ranks") or [ckpt["rng"]]  # one RNG state per rank of the run that saved it
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])
        else:  # a different number of ranks: no exact continuation exists, but ranks must not share noise
            print0(f"resuming a {len(states)}-process run on {self.dist.world_size}: "
                   "training continues, but not bit for bit as it would have")
            seed_everything(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
        windows = ckpt.get("log_window_ranks") or [ckpt.get("log_window")]
        if len(windows) == self.dist.world_size and windows[self.dist.rank]:
            # The logging window the checkpoint was saved in goes on as it would have: the next row averages the
            # same steps, summed in the same order, as an uninterrupted run's.
            window = windows[self.dist.rank]
            self._sums = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in window["sums"].items()}
            self._counts = dict(window["counts"])
        if self.is_main:  # forget what the interrupted run logged after its last checkpoint
            self._write_config()
            rows = read_metrics(self.metrics_path)
            if "metrics_rows" in ckpt:
                kept = rows[:ckpt["metrics_rows"]]
            else:  # a checkpoint from before windows were saved
                kept = [r for r in rows if r["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._rows = len(kept)
        print0(f"resumed {self.resume_from} at step {self.step}")
        return self.step

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The module to train with: channels_last if ``--channels-last``, compiled if ``--compile``, DDP-wrapped
        under torchrun.

        ``find_unused_parameters``: set it for a model whose loss does not reach every parameter (DDP otherwise
        waits for their gradients and fails on the next step)."""
        if self.cfg.channels_last:  # in place: the optimizer keeps the same parameters, now NHWC in memory
            model.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                              find_unused_parameters=find_unused_parameters)
        return model

    def batches(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        """Endless ``(images, labels)`` batches in a seeded order, this rank's shard, from the resumed step."""
        loader = make_loader(TensorImages(images, labels), batch_size, seed=self.cfg.seed)
        return batches_from(loader, self.step)

    def steps(self):
        """Step numbers ``step+1 .. cfg.steps``, ending early on a signal, ``--max-minutes`` or ``--stop-at``."""
        cfg = self.cfg
        self._bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                         disable=not self.is_main, mininterval=0.5)
        self._t0 = time.monotonic()
        if cfg.stop_at and self.step >= cfg.stop_at:  # resumed at or past --stop-at: not one step more
            self.stop_reason = f"--stop-at {cfg.stop_at}"
            return
        for step in range(self.step + 1, cfg.steps + 1):
            self.step = step
            yield step
            self._bar.update(1)
            if self._should_stop():
                break

    def _should_stop(self) -> bool:
        cfg = self.cfg
        if not self.stop_reason and cfg.max_minutes and time.monotonic() - self._t0 > 60 * cfg.max_minutes:
            self.stop_reason = f"--max-minutes {cfg.max_minutes:g}"
        if not self.stop_reason and cfg.stop_at and self.step >= cfg.stop_at:
            self.stop_reason = f"--stop-at {cfg.stop_at}"
        stop = bool(self.stop_reason)
        if self.dist.enabled:  # ranks must stop at the same step
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            self.stop_reason = self.stop_reason or ("another rank stopped" if stop else "")
        return stop

    def every(self, n: int, step: int) -> bool:
        return n > 0 and step % n == 0 and step != self.cfg.steps

    def log(self, step: int, **scalars) -> None:
        """Accumulate scalars (tensors stay on the device); every ``--log-every`` steps, average, check they
        are finite, show them on the progress bar and append them to ``metrics.jsonl``."""
        for key, value in scalars.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1  # per key: some scalars are logged only now and then
        if step % self.cfg.log_every == 0:
            self.flush(step)

    def flush(self, step: int, **extra) -> dict:
        """Write the averaged scalars now (plus ``extra`` values such as an evaluation score). Under torchrun the
        average is over every rank's steps, so the row describes the whole batch and every rank reaches the same
        verdict on a non-finite value."""
        row = self._window_means()
        row.update({k: float(v) for k, v in extra.items()})
        self._sums, self._counts = {}, {}
        self._check_finite(row, step)
        if row and self.is_main:
            if self._bar is not None:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(row.items())[:4]}, refresh=False)
            row = {"step": step, **row, "time": round(time.monotonic() - self._t0, 2)}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self._rows += 1
        return row

    def _window_means(self) -> dict[str, float]:
        """The mean of every scalar over the logging window (and over every rank under torchrun)."""
        keys = list(self._sums)
        sums, counts = [float(self._sums[k]) for k in keys], [float(self._counts[k]) for k in keys]
        if self.dist.enabled and keys:  # every rank logs the same keys at the same steps
            both = torch.tensor(sums + counts, dtype=torch.float64, device=self.device)
            dist.all_reduce(both)
            sums, counts = both[:len(keys)].tolist(), both[len(keys):].tolist()
        return {k: s / c for k, s, c in zip(keys, sums, counts)}

    def _check_finite(self, row: dict[str, float], step: int) -> None:
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"{bad[0]} = {row[bad[0]]} at step {step}; {self._last_good()}")

    def _last_good(self) -> str:
        return f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "no checkpoint yet"

    # ---------------------------------------------------------------------------------------------------
    def save_checkpoint(self, **objects) -> Path:
        """Atomically write the state of ``objects`` (name -> module/optimizer/...), the RNG and provenance."""
        # Never save weights that a NaN has already reached. The open logging window is checked, not written: the
        # checkpoint carries it, so a resumed run logs the same rows as one that never stopped.
        self._check_finite(self._window_means(), self.step)
        for name, obj in objects.items():  # a finite loss can still be followed by a step that made NaN weights
            if isinstance(obj, torch.nn.Module) and not all(
                    torch.isfinite(t).all() for t in _unwrap(obj).state_dict().values() if t.is_floating_point()):
                raise TrainingDiverged(f"{name} has non-finite weights at step {self.step}; {self._last_good()}")
        window = {"sums": {k: v.cpu() if torch.is_tensor(v) else v for k, v in self._sums.items()},
                  "counts": dict(self._counts)}
        states, windows = [rng_state()], [window]
        if self.dist.enabled:  # every rank's RNG and window, so that a resumed multi-process run continues exactly
            states, windows = [None] * self.dist.world_size, [None] * self.dist.world_size
            dist.all_gather_object(states, rng_state())
            dist.all_gather_object(windows, window)
        if self.is_main:
            payload = provenance(self.stage, dataclasses.asdict(self.cfg), self.cfg.seed, self.step, self.git_hash)
            payload["world_size"] = self.dist.world_size
            payload.update({name: _unwrap(obj).state_dict() for name, obj in objects.items()})
            payload["rng"], payload["log_window"], payload["metrics_rows"] = states[0], windows[0], self._rows
            if len(states) > 1:
                payload["rng_ranks"], payload["log_window_ranks"] = states, windows
            save_checkpoint(payload, self.ckpt_path)
        return self.ckpt_path

    def save_images(self, images: torch.Tensor, name: str, **kwargs) -> Path:
        path = self.dir / "samples" / name
        if self.is_main:
            save_grid(images, path, **kwargs)
        return path
