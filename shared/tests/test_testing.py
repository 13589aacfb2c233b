import textwrap

import torch

from shared.testing import (
    _same,
    checkpoints_equal,
    missing_readme_references,
    readme_commands,
    readme_commands_that_fail,
    same_training,
    without_resume,
)

SCRIPT = '''
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--prompt", default="")
    parser.parse_args(argv)
    raise AssertionError("the check must not run the script")
'''

README = '''
Train with `python readme_demo_tool.py --steps
20` (a span wrapped across lines), or `python readme_demo_tool.py --prompt "a thick 7" && python x.py`.

```bash
python readme_demo_tool.py --steps 30 \\
    --prompt one  # a comment, not an argument
python readme_demo_tool.py --steps N   # a template
python readme_demo_tool.py --stepz 5
```
The old flag `python readme_demo_tool.py --steps five` fails too. An indented block:

    cd stage
    OMP_NUM_THREADS=1 python readme_demo_tool.py --steps 40 \\
        --prompt two   # the second line of one command
'''


def test_readme_commands_are_found_joined_and_checked(tmp_path, monkeypatch):
    (tmp_path / "readme_demo_tool.py").write_text(SCRIPT)
    (tmp_path / "README.md").write_text(textwrap.dedent(README))
    monkeypatch.syspath_prepend(str(tmp_path))
    script = "readme_demo_tool.py"
    assert readme_commands(tmp_path) == [  # x.py is not a file of the stage; the template is left out
        (script, ["--prompt", "a thick 7"]), (script, ["--steps", "20"]),
        (script, ["--steps", "30", "--prompt", "one"]), (script, ["--steps", "40", "--prompt", "two"]),
        (script, ["--steps", "five"]), (script, ["--stepz", "5"])]
    failed = readme_commands_that_fail(tmp_path)
    assert len(failed) == 2, failed
    assert "--steps five: " in failed[0] and "invalid int value: 'five'" in failed[0]
    assert "--stepz 5: " in failed[1] and "unrecognized arguments: --stepz" in failed[1]


def test_top_readme_shared_commands_parse():  # the stages' tests check the results table's rows for their stage
    from shared import REPO_ROOT

    commands = readme_commands(REPO_ROOT)
    assert {script for script, _ in commands} >= {"-m shared.evaluate", "-m shared.classifier", "-m shared.testing"}
    assert readme_commands_that_fail(REPO_ROOT) == []


def test_missing_readme_files_finds_broken_links_and_named_files(tmp_path):
    from shared.testing import missing_readme_files

    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "grid.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "![grid](assets/grid.png) ![gone](assets/gone.png \"title\") [stage](../x_missing_dir/) "
        "[paper](https://arxiv.org/abs/1312.6114) [section](#results)\n"
        "Numbers in `assets/grid.png` and `assets/results.json`; the shared `shared/metrics.py`; a run's "
        "`experiments/03_ddpm/eval/s.npz`; a flag `--out s.npz`.\n")
    assert missing_readme_files(tmp_path) == ["link ../x_missing_dir/", "link assets/gone.png",
                                              "file assets/results.json"]


def test_top_readme_links_and_files_exist():  # each stage's tests check its own README
    from shared import REPO_ROOT
    from shared.testing import missing_readme_files

    assert missing_readme_files(REPO_ROOT) == []


def test_same_training_cli_exit_codes(tmp_path, capsys):
    import subprocess
    import sys

    import torch

    from shared import REPO_ROOT
    from shared.cli import run_entry
    from shared.testing import main

    def same_training_cli(*paths):
        """The exit code and output of ``python -m shared.testing same-training paths...``, run in this process
        (its ``__main__`` is ``sys.exit(run_entry(main))``)."""
        try:
            code = run_entry(main, ["same-training", *map(str, paths)])
        except SystemExit as exit_:
            code = exit_.code
        return code, *capsys.readouterr()

    one = {"stage": "00_toy", "step": 3, "model": {"w": torch.ones(2)}, "created": "now", "config": {"run_name": "a"}}
    torch.save(one, tmp_path / "a.pt")
    torch.save({**one, "created": "later", "config": {"run_name": "b"}, "git_hash": "committed-since"},
               tmp_path / "b.pt")  # resumed after a commit: the same training all the same
    torch.save({**one, "model": {"w": torch.zeros(2)}}, tmp_path / "c.pt")
    code, out, _ = same_training_cli(tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 0 and "step 3, 1 rank(s); bit for bit equal: model" in out  # says what it held
    torch.save({**one, "stage": "01_vae"}, tmp_path / "other_stage.pt")
    assert same_training_cli(tmp_path / "a.pt", tmp_path / "other_stage.pt")[0] == 2
    code, out, _ = same_training_cli(tmp_path / "a.pt", tmp_path / "c.pt")
    assert code == 1 and "differ in: model" in out
    # Once as nox calls it, in its own process: a mistake, not a verdict, in one line
    missing = subprocess.run([sys.executable, "-m", "shared.testing", "same-training", str(tmp_path / "a.pt"),
                              str(tmp_path / "gone.pt")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "gone.pt" in missing.stderr


def test_missing_readme_references_names_what_is_not_defined(tmp_path):
    (tmp_path / "model.py").write_text("class Foo:\n    def bar(self):\n        pass\n\n\nSIZES = {}\n")
    (tmp_path / "README.md").write_text("`model.py::Foo.bar`, `model.py::SIZES`, `model.py::Foo.gone`, "
                                        "`model.py::nope`, `other.py::f`")
    assert missing_readme_references(tmp_path) == ["model.py::Foo.gone", "model.py::nope",
                                                   "other.py::f (no such file)"]


def test_the_checkpoint_comparisons_see_every_difference():
    a = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}},
         "rng": {"torch": torch.arange(3)}, "step": 5, "created": "now", "config": {"steps": 5}}
    assert same_training(a, dict(a)) == [] and checkpoints_equal(a, dict(a), keys=("model", "optimizer"))
    assert same_training(a, {**a, "rng": {"torch": torch.zeros(3, dtype=torch.long)}}) == ["rng"]
    assert same_training(a, {**a, "ema": {"w": torch.ones(2)}}) == ["ema"]  # a key only one of them has
    assert same_training(a, {**a, "created": "later", "config": {"steps": 9}}) == []  # not the training
    other_opt = {**a, "optimizer": {"state": {0: {"step": torch.tensor(4.0)}}}}
    assert not checkpoints_equal(a, other_opt, keys=("model", "optimizer"))
    assert checkpoints_equal(a, other_opt, keys=("model",))
    assert not _same(torch.ones(2), torch.ones(2, dtype=torch.float64))  # a dtype is part of the state


def test_without_resume_drops_the_flag_and_its_value():
    assert without_resume(["--resume", "x.pt", "--steps", "3"]) == ["--steps", "3"]
    assert without_resume(["--steps", "3", "--resume=auto"]) == ["--steps", "3"]


def test_the_comparisons_see_a_longer_list_or_an_extra_nested_key():
    """A list with one more entry, or a nested dict with one more key, is a difference (no zip truncation)."""
    assert not _same([torch.ones(1)], [torch.ones(1), torch.ones(1)]) and not _same([1, 2], [1])
    assert not _same({"a": 1}, {"a": 1, "b": 2}) and not _same({"a": 1, "b": 2}, {"a": 1})
    a = {"rng": {"torch": torch.arange(3)}, "step": 5}
    assert same_training(a, {**a, "rng": {"torch": torch.arange(3), "cuda": torch.arange(2)}}) == ["rng"]
