"""Every stage has its own ``model.py``: pytest must collect one stage per process (nox does so); shared/ and
benchmarks/ share one (nox's tests-shared)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    folders = {Path(item.fspath).resolve().relative_to(ROOT).parts[0] for item in items}
    if len(folders) > 1 and not folders <= {"shared", "benchmarks"}:  # those two import no stage's modules
        raise pytest.UsageError(
            f"collected tests of several stages at once ({', '.join(sorted(folders))}); run one per process, "
            "e.g. `cd 01_vae && pytest`, or `nox`")
