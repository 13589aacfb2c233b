"""ScratchGen's thin shared package: plumbing only (data, runtime, checkpoints, images, runs, metrics).

Nothing here teaches a method; every stage keeps its own math. See each module's docstring.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """A mistake in what the user asked for (a bad flag, a missing file, a foreign checkpoint).

    Entry points report it as one line on stderr and exit with code 2, never with a traceback.
    """
