import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from shared import UserError, checkpoint
from shared.checkpoint import export_weights, load_checkpoint, load_error, provenance, save_checkpoint


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
