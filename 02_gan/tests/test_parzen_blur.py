"""parzen_blur.py: the Parzen estimate prefers blurred real digits to the real ones."""

import json

import numpy as np
import parzen_blur
import pytest
from parzen_blur import blur, main

from shared import UserError
from shared.data import load_images, to_unit
from shared.metrics import parzen_log_likelihood


def test_parzen_rewards_blurred_real_digits():
    """The estimator's bias the README measures at N = 10,000, here at N = 500: blurring *real* images by
    0.8 px makes them worse pictures but raises their Parzen log-likelihood of held-out digits."""
    train, _ = load_images("mnist")
    test, _ = load_images("mnist", train=False)
    real, test, val = to_unit(train[:500]), to_unit(test[:500]), to_unit(train[50_000:50_200])
    sharp = parzen_log_likelihood(real, test, val)[0]
    blurred = parzen_log_likelihood(blur(real.view(-1, 1, 28, 28), 0.8), test, val)[0]
    assert blurred > sharp + 20, (sharp, blurred)


def test_bad_widths_and_shapes_are_user_errors(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((4, 28, 28), dtype=np.uint8))
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(UserError, match="--widths must be >= 0"):
            main([str(path), "--widths", bad])
    np.savez(path, images=np.zeros((4, 28, 56), dtype=np.uint8))
    with pytest.raises(UserError, match="must have shape"):
        main([str(path)])


def test_json_into_a_new_folder(tmp_path, monkeypatch):
    """--json may name a folder that does not exist yet (it used to fail only after the minutes of scoring)."""
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((4, 28, 28), dtype=np.uint8))
    rows = [{"blur_px": 0.0, "samples": {"parzen_ll": 1.0}}]
    monkeypatch.setattr(parzen_blur, "blur_table", lambda samples, widths: rows)  # skip the 10,000-image scoring
    out = tmp_path / "new" / "folder" / "blur.json"
    main([str(path), "--widths", "0", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows
    assert saved["command"] == f"python parzen_blur.py {path} --widths 0.0 --json {out}"  # the whole command


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "usage" not in err
