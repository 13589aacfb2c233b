import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from shared import UserError, checkpoint
from shared.checkpoint import export_weights, load_checkpoint, load_error, provenance, save_checkpoint, weights_of


def _payload(value: float) -> dict:
    return {**provenance("00_toy", {"lr": 0.1}, seed=1, step=5), "model": {"w": torch.full((3,), value)}}


def test_roundtrip_carries_provenance(tmp_path):
    path = save_checkpoint(_payload(1.0), tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(path, "00_toy")
    assert ckpt["config"] == {"lr": 0.1} and ckpt["seed"] == 1 and ckpt["step"] == 5
    assert ckpt["git_hash"] and ckpt["torch_version"] == str(torch.__version__)
    # the SIMD level of torch's CPU kernels: the same seed and commit give other last bits on another kind of CPU
    assert ckpt["cpu"].split(", ")[1] == f"{torch.backends.cpu.get_cpu_capability()} kernels"
    assert ckpt["cpu"].endswith(f"{os.cpu_count()} cores")
    assert torch.equal(ckpt["model"]["w"], torch.ones(3))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_payload(1.0), tmp_path / "ckpt.pt")

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_payload(2.0), path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was cleaned up


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_payload(1.0), path)
    writer = ("import sys, torch; from shared.checkpoint import save_checkpoint\n"
              "big = {'stage': '00_toy', 'model': {'w': torch.zeros(64_000_000)}}\n"  # 256 MB: takes a while
              "print('saving', flush=True)\n"
              "while True: save_checkpoint(big, sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    w = load_checkpoint(path)["model"]["w"]  # the old file, or a complete new one: never a torn one
    assert w.shape in {(3,), (64_000_000,)}


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"stage": "00_toy", "model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a ScratchGen checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(_payload(1.0), tmp_path / "toy.pt")
    with pytest.raises(UserError, match="stage 00_toy, not 01_vae"):
        load_checkpoint(tmp_path / "toy.pt", "01_vae")
    (tmp_path / "hello.pt").write_text("hello")  # the unpickler fails with a KeyError on this one
    garbled = bytearray((tmp_path / "toy.pt").read_bytes())  # bytes flipped inside the pickled data
    start = garbled.find(b"data.pkl") + 100
    garbled[start:start + 40] = bytes(40)
    (tmp_path / "garbled.pt").write_bytes(bytes(garbled))
    for bad in ("hello.pt", "garbled.pt"):
        with pytest.raises(UserError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / bad)
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="a folder with no ckpt.pt"):
        load_checkpoint(tmp_path / "run")
    save_checkpoint(_payload(2.0), tmp_path / "run" / "ckpt.pt")
    assert load_checkpoint(tmp_path / "run")["model"]["w"][0] == 2.0  # a run's folder stands for its checkpoint


def test_export_keeps_one_set_of_weights(tmp_path):
    ckpt = {**_payload(1.0), "ema": {"w": torch.full((3,), 0.5)}, "optimizer": {"state": {}}}
    path = export_weights(ckpt, tmp_path / "mnist.pt")
    small = load_checkpoint(path, "00_toy")
    assert "optimizer" not in small
    assert small["cpu"] == ckpt["cpu"] and small["git_hash"] == ckpt["git_hash"]  # provenance travels with it
    assert small["config"] == ckpt["config"] and small["step"] == ckpt["step"]  # sample.py rebuilds from these
    assert torch.equal(small["model"]["w"], torch.full((3,), 0.5)) and small["weights"] == "ema"  # default
    raw = load_checkpoint(export_weights(ckpt, tmp_path / "raw.pt", key="model"), "00_toy")
    assert torch.equal(raw["model"]["w"], ckpt["model"]["w"]) and raw["weights"] == "model"
    no_ema = load_checkpoint(export_weights(_payload(2.0), tmp_path / "no_ema.pt"), "00_toy")
    assert torch.equal(no_ema["model"]["w"], torch.full((3,), 2.0)) and no_ema["weights"] == "model"


def test_weights_of_gives_the_set_asked_for_or_a_one_line_error(tmp_path):
    run = {**_payload(1.0), "ema": {"w": torch.full((3,), 0.5)}}
    assert weights_of(run, "run.pt") is run["ema"] and weights_of(run, "run.pt", "ema") is run["ema"]  # EMA first
    assert weights_of(run, "run.pt", "model") is run["model"]
    plain = _payload(2.0)  # a run without an EMA
    assert weights_of(plain, "plain.pt") is plain["model"]
    with pytest.raises(UserError, match=r"^--weights ema: plain.pt holds only the 'model' weights; "
                                        r"use --weights model$"):
        weights_of(plain, "plain.pt", "ema")
    exported = load_checkpoint(export_weights(run, tmp_path / "mnist.pt"), "00_toy")  # the EMA, stored as "model"
    assert torch.equal(weights_of(exported, "mnist.pt")["w"], torch.full((3,), 0.5))
    assert torch.equal(weights_of(exported, "mnist.pt", "ema")["w"], torch.full((3,), 0.5))
    with pytest.raises(UserError, match="holds only the 'ema' weights; use --weights ema"):
        weights_of(exported, "mnist.pt", "model")


def test_load_error_names_the_cause_not_the_header():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError) as wrong_shape:
        model.load_state_dict(torch.nn.Linear(4, 2).state_dict())
    assert str(wrong_shape.value).startswith("Error(s) in loading state_dict for Linear")
    assert load_error(wrong_shape.value).startswith("size mismatch for weight: copying a param with shape")
    with pytest.raises(RuntimeError) as missing:
        model.load_state_dict({"weight": model.weight})
    assert load_error(missing.value).startswith('Missing key(s) in state_dict: "bias"')
    assert load_error(KeyError("config")) == "'config'"


def test_a_checkpoint_gets_the_mode_of_any_new_file_and_leaves_the_umask_alone(tmp_path):
    """mkstemp makes owner-only files: a saved checkpoint is 0666 & ~umask as any new file, and the umask stays."""
    old = os.umask(0o027)
    try:
        path = save_checkpoint(_payload(1.0), tmp_path / "ckpt.pt")
        (tmp_path / "plain").write_bytes(b"")
        assert os.umask(0o027) == 0o027  # save_checkpoint reads the umask by setting it: it must put it back
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def test_a_save_writes_a_temporary_file_beside_the_old_checkpoint_then_replaces_it(tmp_path, monkeypatch):
    """While the new checkpoint is written, ``path`` still holds the old one whole and the bytes go to a temporary
    file in the same folder (a rename within one file system is atomic)."""
    path = save_checkpoint(_payload(1.0), tmp_path / "ckpt.pt")
    real_save, seen = torch.save, {}

    def spy(obj, f):
        seen["files"] = sorted(os.listdir(tmp_path))
        seen["old"] = load_checkpoint(path)["model"]["w"][0].item()
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", spy)
    save_checkpoint(_payload(2.0), path)
    assert seen["old"] == 1.0 and len(seen["files"]) == 2 and seen["files"][0] == "ckpt.pt"
    assert seen["files"][1].startswith("ckpt.pt.") and seen["files"][1].endswith(".tmp")
    assert os.listdir(tmp_path) == ["ckpt.pt"] and load_checkpoint(path)["model"]["w"][0] == 2.0


def test_git_hash_names_the_commit_and_marks_uncommitted_work(tmp_path, monkeypatch):
    """git_hash(): HEAD's 12-digit hash, '-dirty' once a file changed or a new unignored one appeared, 'unknown'
    outside a repository or without git."""
    if shutil.which("git") is None:
        pytest.skip("no git here")

    def git(*args):  # a throwaway repository, whatever the user's git configuration says
        config = ("user.name=t", "user.email=t@t", "commit.gpgsign=false", "core.hooksPath=/dev/null")
        return subprocess.run(["git", *(f for c in config for f in ("-c", c)), *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no enclosing repository is found
    monkeypatch.setattr(checkpoint, "REPO_ROOT", tmp_path)
    assert checkpoint.git_hash() == "unknown"
    git("init", "-q")
    (tmp_path / ".gitignore").write_text("experiments/\n")
    git("add", ".gitignore")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "--short=12", "HEAD")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "ckpt.pt").write_bytes(b"")  # an ignored output does not make the tree dirty
    assert checkpoint.git_hash() == head and len(head) == 12
    (tmp_path / "new.py").write_text("")  # a new source file not yet added does
    assert checkpoint.git_hash() == head + "-dirty"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(checkpoint.subprocess, "run", no_git)
    assert checkpoint.git_hash() == "unknown"


def test_a_file_that_is_not_a_dict_is_not_a_checkpoint(tmp_path):
    """A saved bare tensor (or list) loads safely but is refused as a UserError, not a TypeError or RuntimeError."""
    for name, obj in (("tensor.pt", torch.ones(2)), ("list.pt", ["stage"])):
        torch.save(obj, tmp_path / name)
        with pytest.raises(UserError, match="not a ScratchGen checkpoint"):
            load_checkpoint(tmp_path / name)


def test_load_error_drops_the_final_period_and_names_a_messageless_error():
    """The cause goes inside '(...)' of a longer message: no trailing period; an empty message gives the type."""
    with pytest.raises(RuntimeError) as wrong_shape:
        torch.nn.Linear(3, 2).load_state_dict(torch.nn.Linear(4, 2).state_dict())
    assert str(wrong_shape.value).rstrip().endswith(".") and not load_error(wrong_shape.value).endswith(".")
    assert load_error(RuntimeError()) == "RuntimeError" and load_error(KeyError()) == "KeyError"
