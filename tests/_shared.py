"""What the pytest-xdist workers of one parallel run share instead of making each their own."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = ["once_per_run"]


def once_per_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]
) -> Path:
    """The directory ``name``, filled by ``make`` once per run of pytest: shared by the
    workers of a parallel run (the first makes it, the others wait for it), so that an
    expensive fixture meant to run once is not made again by every worker. Its users only
    read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own directory, above each worker's
    directory, done = root / name, root / f"{name}.done"
    with (root / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a maker that failed: again
            directory.mkdir()
            make(directory)
            done.touch()
    return directory
