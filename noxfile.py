"""ScratchGen's sessions: ``nox -l`` lists them, ``nox`` runs them all but ``bench``.

Every session runs in the environment nox itself runs in (``venv_backend="none"``): torch is a multi-GB
install, made once by the README's set-up, never once per session. Sessions are discovered from the
stage folders present (``01_vae`` ...): ``tests-<stage>`` runs that stage's pytest in its own process (each
stage has its own ``model.py``), ``smoke-<stage>`` trains for seconds and samples through the real CLIs, and
``ddp-<stage>`` trains the smoke preset with ``torchrun --nproc_per_node=2`` on CPU (gloo), so multi-GPU
training is one flag away, and checks that a 2-rank run stopped halfway and resumed ends bit for bit where the
straight one did.
"""

import os
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
STAGES = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*") if (p / "tests").is_dir())
PY = sys.executable

TRAINABLE = [s for s in STAGES if (ROOT / s / "train.py").exists()]

nox.options.sessions = ["lint", "tests-shared", *[f"tests-{s}" for s in STAGES], *[f"smoke-{s}" for s in TRAINABLE],
                        *[f"ddp-{s}" for s in TRAINABLE]]


@nox.session(name="lint", venv_backend="none")
def lint(session):
    session.run(PY, "-m", "ruff", "check", ".", external=True)


@nox.session(name="tests-shared", venv_backend="none")
def tests_shared(session):
    session.chdir(ROOT)
    session.run(PY, "-m", "pytest", "shared/tests", "benchmarks/tests", *session.posargs, external=True)


def _tests(stage):
    @nox.session(name=f"tests-{stage}", venv_backend="none")
    def session_fn(session):
        session.chdir(ROOT / stage)
        session.run(PY, "-m", "pytest", "tests", *session.posargs, external=True)


def _smoke(stage):
    @nox.session(name=f"smoke-{stage}", venv_backend="none")
    def session_fn(session):
        session.chdir(ROOT / stage)
        with tempfile.TemporaryDirectory(prefix=f"smoke-{stage}-") as tmp:
            env = {"SCRATCHGEN_EXPERIMENTS": tmp, "PYTHONPATH": str(ROOT)}
            session.run(PY, "train.py", "--preset", "smoke", "--run-name", "smoke", "--device", "cpu",
                        env=env, external=True)
            npz = os.path.join(tmp, "samples.npz")
            session.run(PY, "sample.py", "--ckpt", os.path.join(tmp, stage, "smoke", "ckpt.pt"),
                        "--num-samples", "16", "--out", npz, "--device", "cpu", env=env, external=True)
            check = ("import numpy as np, sys; x = np.load(sys.argv[1])['images']; "
                     "assert x.dtype == np.uint8 and x.shape[0] == 16, (x.dtype, x.shape); print('samples', x.shape)")
            session.run(PY, "-c", check, npz, external=True)


def _ddp(stage):
    @nox.session(name=f"ddp-{stage}", venv_backend="none")
    def session_fn(session):
        session.chdir(ROOT / stage)
        with tempfile.TemporaryDirectory(prefix=f"ddp-{stage}-") as tmp:
            # One thread per rank: two ranks share this machine's cores.
            env = {"SCRATCHGEN_EXPERIMENTS": tmp, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            torchrun = (PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--preset", "smoke", "--device", "cpu")
            session.run(*torchrun, "--run-name", "ddp", env=env, external=True)
            import torch

            ckpt = torch.load(os.path.join(tmp, stage, "ddp", "ckpt.pt"), weights_only=True, map_location="cpu")
            steps = ckpt["step"]
            if ckpt["world_size"] != 2 or steps != ckpt["config"]["steps"] or len(ckpt["rng_ranks"]) != 2:
                session.error(f"expected a finished 2-rank run, got {ckpt['world_size']} ranks at step {steps}")
            # The same run stopped halfway and resumed must end bit for bit where the straight one did.
            session.run(*torchrun, "--run-name", "ddp-resumed", "--stop-at", str(steps // 2), env=env, external=True)
            session.run(*torchrun, "--run-name", "ddp-resumed", "--resume", "auto", env=env, external=True)
            ckpts = [os.path.join(tmp, stage, name, "ckpt.pt") for name in ("ddp", "ddp-resumed")]
            session.run(PY, "-m", "shared.testing", "same-training", *ckpts, env=env, external=True)


@nox.session(name="bench", venv_backend="none")
def bench(session):
    """Throughput of every stage (not part of `nox`): CPU, and the CUDA variants when a GPU is present."""
    session.chdir(ROOT)
    out = ROOT / "experiments" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    for extra in ([], ["--channels-last"]):
        name = "cpu" + "".join(extra).replace("--", "-")
        session.run(PY, "benchmarks/bench.py", *extra, "--json", str(out / f"{name}.json"), *session.posargs,
                    external=True)
    import torch

    if torch.cuda.is_available():
        for extra in ([], ["--amp"], ["--amp", "--channels-last"], ["--amp", "--compile"]):
            name = "cuda" + "".join(extra).replace("--", "-")
            session.run(PY, "benchmarks/bench.py", "--device", "cuda", *extra, "--json", str(out / f"{name}.json"),
                        *session.posargs, external=True)


for _stage in STAGES:
    _tests(_stage)
for _stage in TRAINABLE:
    _smoke(_stage)
    _ddp(_stage)
