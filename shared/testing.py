"""Test helpers the stages share: README cross-references and files, exact resume, running a CLI as a user would."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from shared import REPO_ROOT, UserError

REFERENCE = re.compile(r"`([\w/]+\.py)::([\w.]+)`")


def missing_readme_references(stage_dir: Path) -> list[str]:
    """Every ``file.py::name`` (or ``file.py::Class.method``) in the stage README that is not defined."""
    readme = (stage_dir / "README.md").read_text()
    missing = []
    for file, name in sorted(set(REFERENCE.findall(readme))):
        path = stage_dir / file
        if not path.is_file():
            missing.append(f"{file}::{name} (no such file)")
            continue
        tree = ast.parse(path.read_text())
        scope, found = tree.body, True
        for part in name.split("."):
            hits = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                    and n.name == part]
            hits += [n for n in scope if isinstance(n, (ast.Assign, ast.AnnAssign)) and part in
                     {t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                      if isinstance(t, ast.Name)}]
            if not hits:
                found = False
                break
            scope = getattr(hits[0], "body", [])
        if not found:
            missing.append(f"{file}::{name}")
    return missing


LINK = re.compile(r"\]\(([^)\s#]+)[^)]*\)")  # [text](target) and ![alt](target)
FILE_SPAN = re.compile(r"`([\w.][\w./-]*/[\w.-]+\.(?:json|jsonl|png|gif|pt|npz|py|md|txt|csv))`")


def missing_readme_files(readme_dir: Path) -> list[str]:
    """Every relative link or picture of ``readme_dir/README.md``, and every file it names in a code span
    (``assets/x.json``, ``pretrained/mnist.pt``), that does not exist. A span may be relative to the README's folder
    or to the repository root; the top-level README may name a file that every stage has (``pretrained/mnist.pt``);
    runs under ``experiments/`` are outputs a reader makes, not files of the repository."""
    readme = (readme_dir / "README.md").read_text()
    stages = sorted(REPO_ROOT.glob("0[0-9]_*/")) if readme_dir.resolve() == REPO_ROOT else []
    missing = []
    for target in sorted(set(LINK.findall(readme))):
        if not re.match(r"\w+:", target) and not (readme_dir / target).exists():
            missing.append(f"link {target}")
    for path in sorted(set(FILE_SPAN.findall(readme))):
        if re.match(r"(\.\./)?experiments/", path):
            continue
        if not ((readme_dir / path).exists() or (REPO_ROOT / path).exists()
                or (stages and all((stage / path).exists() for stage in stages))):
            missing.append(f"file {path}")
    return missing


FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
# a command line of an indented code block, with its \-continued lines
INDENTED = re.compile(r"^ {4,}(?:\w+=\S+ +|nice -n \d+ +)*(?:python3?|torchrun) (?:[^\n]*\\\n)*[^\n]*", re.M)
COMMAND = re.compile(r"(?:python3?|torchrun(?: --\S+)*) (-m shared\.\w+|\w+\.py)\b((?: +[^ ]+)*)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|[$<>{}\[\]]")  # CKPT, N, $s, <file>, [--steps 100]: a template


def readme_commands(stage_dir: Path) -> list[tuple[str, list[str]]]:
    """Every ``python SCRIPT ARGS`` (or ``python -m shared.X ARGS``) in the stage README's code and in the rows of
    the top-level README's results table for the stage, as (script, argv), SCRIPT a file of the stage. Code spans
    may wrap across lines; code blocks (fenced or indented) are shell sessions (``\\`` continues a line, ``#``
    starts a comment). Templates (CKPT, N, $s, [--flag]) are left out; ``…`` stands for a path."""
    readme = (stage_dir / "README.md").read_text()
    if stage_dir.resolve().parent == REPO_ROOT:  # and the rows of the top-level results table for this stage
        rows = (REPO_ROOT / "README.md").read_text().splitlines()
        readme += "\n\n" + "\n".join(row for row in rows if row.startswith(f"| `{stage_dir.name}`"))
    prose = FENCE.sub("", readme)
    lines = []
    for block in FENCE.findall(readme) + INDENTED.findall(prose):
        lines += re.sub(r"(^|\s)#.*", "", block.replace("\\\n", " "), flags=re.M).splitlines()
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", INDENTED.sub("", prose))]
    commands = set()
    for line in lines:
        for segment in re.split(r"&&|;|\||\(|\)", line):
            for script, rest in COMMAND.findall(segment):
                argv = shlex.split(rest.replace("…", "x"))
                if (script.startswith("-m") or (stage_dir / script).is_file()) and \
                        not any(PLACEHOLDER.search(a) for a in argv):
                    commands.add((script, tuple(argv)))
    return [(script, list(argv)) for script, argv in sorted(commands)]


class _Parsed(Exception):
    pass


def without_resume(argv: list[str]) -> list[str]:
    """``argv`` less its ``--resume X`` (which would load the checkpoint X names)."""
    out, skip = [], False
    for a in argv:
        if not skip and a != "--resume" and not a.startswith("--resume="):
            out.append(a)
        skip = a == "--resume"
    return out


def readme_commands_that_fail(stage_dir: Path) -> list[str]:
    """The README commands whose flags the script rejects: each is parsed (and, for a training script, its
    config validated) exactly as a run would, but nothing runs. Call from the stage folder's test process."""
    import argparse
    import contextlib
    import importlib
    import inspect
    import io

    from shared.cli import parse_config

    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    failed = []
    for script, argv in readme_commands(stage_dir):
        module = importlib.import_module(script[3:] if script.startswith("-m ") else script[:-3])
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                if "cfg" in inspect.signature(module.main).parameters:  # train.py: main(cfg) after parse_config
                    parse_config(module.TrainConfig, module.PRESETS, module.STAGE, without_resume(argv))
                    continue
                argparse.ArgumentParser.parse_args = parse_and_stop
                try:
                    module.main(argv)
                finally:
                    argparse.ArgumentParser.parse_args = parse_args
                failed.append(f"python {script} {' '.join(argv)}: ran without parsing its arguments")
        except _Parsed:
            pass
        except (SystemExit, UserError) as err:
            failed.append(f"python {script} {' '.join(argv)}: {said.getvalue().strip() or err}")
    return failed


# The meta device stands in for CUDA in the tests/test_device.py modules (no GPU here): tensors have a shape but
# no data, and mixing one with a CPU tensor raises, as on CUDA. Caveats: .item(), .cpu(), printing and
# torch.Generator("meta") fail on meta (all work on CUDA); indexing a CPU tensor with a meta index silently stays
# on the CPU (CUDA raises), so the tests check every output's device too.
META = torch.device("meta")


def autocast_requests(monkeypatch, module) -> list[bool]:
    """Replace ``module.autocast`` by a no-op that records the ``enabled`` of every call: on a CPU, where bf16
    autocast does nothing, the way to see that a training step asks for it (``--amp``)."""
    import contextlib

    asked = []

    def spy(device, enabled):
        asked.append(enabled)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "autocast", spy)
    return asked


def on_meta(*tensors) -> bool:
    """Whether every tensor is on the meta device."""
    return all(t.device.type == "meta" for t in tensors)


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoints_equal(a: dict, b: dict, keys=("model",)) -> bool:
    """Bitwise equality of everything (tensors, nested optimizer state) under ``keys`` of two checkpoints."""
    return all(_same(a[key], b[key]) for key in keys)


# A checkpoint's entries that say who wrote it and how it was asked for, not what the training reached.
NOT_TRAINING = frozenset({"created", "config", "git_hash", "torch_version", "cpu"})


def same_training(a: dict, b: dict) -> list[str]:
    """What differs between two checkpoints of one training: every key (weights, optimizer states, step, ranks,
    RNG states) but where and when it was written (``created``, and ``git_hash``, ``torch_version``, ``cpu`` of
    the invocation that wrote it, which a resume after a commit changes) and the config (a resumed run's records
    its resume flags); empty when none."""
    return sorted(k for k in a.keys() | b.keys()
                  if k not in NOT_TRAINING and not (k in a and k in b and _same(a[k], b[k])))


def run_interrupted_and_straight(main, cfg, stop_at: int, experiments: Path) -> tuple[dict, dict]:
    """Train ``cfg`` once straight through, and once stopped at ``stop_at`` then resumed with ``--resume``.

    Returns both final checkpoints (loaded with ``weights_only=True``) for the caller to compare.
    """
    os.environ["SCRATCHGEN_EXPERIMENTS"] = str(experiments)
    main(dataclasses.replace(cfg, run_name="straight"))
    main(dataclasses.replace(cfg, run_name="resumed", stop_at=stop_at))
    stage = next(experiments.iterdir()).name
    load = lambda name: torch.load(experiments / stage / name / "ckpt.pt", weights_only=True)  # noqa: E731
    assert load("resumed")["step"] == stop_at, "the first half did not stop where it was told to"
    main(dataclasses.replace(cfg, run_name="resumed", resume="auto"))
    return load("straight"), load("resumed")


def run_script(script: Path, *args: str, experiments: Path | None = None, timeout: float = 120):
    """Run ``python script args...`` from the script's folder, as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if experiments is not None:
        env["SCRATCHGEN_EXPERIMENTS"] = str(experiments)
    return subprocess.run([sys.executable, str(script), *args], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def main(argv=None) -> int:
    """``python -m shared.testing same-training A.pt B.pt``: exit 1 unless the two checkpoints are one training
    (2 for a mistake: a missing or unreadable file, a bad argument)."""
    import argparse

    from shared.checkpoint import load_checkpoint
    from shared.cli import one_line_error

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.error = one_line_error
    parser.add_argument("check", choices=["same-training"])
    parser.add_argument("ckpts", nargs=2, type=Path)
    args = parser.parse_args(argv)
    a, b = (load_checkpoint(p) for p in args.ckpts)
    if a["stage"] != b["stage"]:
        raise UserError(f"{args.ckpts[0]} is a checkpoint of {a['stage']}, {args.ckpts[1]} of {b['stage']}")
    differ = same_training(a, b)
    if differ:
        print(f"{args.ckpts[0]} and {args.ckpts[1]} differ in: {', '.join(differ)}")
        return 1
    held = sorted(k for k in a if k not in NOT_TRAINING | {"stage", "step", "world_size"})
    print(f"same training: step {a.get('step', '?')}, {a.get('world_size', 1)} rank(s); bit for bit equal: "
          f"{', '.join(held) or 'nothing else'}")
    return 0


if __name__ == "__main__":
    from shared.cli import run_entry

    sys.exit(run_entry(main))
