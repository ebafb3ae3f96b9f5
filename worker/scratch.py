"""A job attempt's scratch directory (`job-<id>-*` under settings.scratch): the copies of the user's
inputs, the checkpoint being written and the run's output before it is stored.

The directory is removed when the attempt ends, however it ends. A process killed outright (kill -9,
out of memory, the hard time limit) cannot remove it, so each directory holds a lock file that its
process keeps locked (flock, which the kernel releases when the process dies): `sweep` removes the
directories whose lock nobody holds, and leaves alone the ones of live processes, on any worker
sharing the machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = ".idap-lock"

log = logging.getLogger(__name__)


@contextmanager
def scratch_dir(root: Path, job_id: str) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=root))
    # locked before it gets its name, so a sweep never sees this directory's lock file unlocked
    fd = os.open(path / (LOCK + ".new"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path / (LOCK + ".new"), path / LOCK)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(root: Path) -> list[Path]:
    """Remove the scratch directories under `root` whose process is gone; returns them."""
    removed = []
    for path in root.glob("job-*"):
        lock = path / LOCK
        if path.is_symlink() or not path.is_dir() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process is alive
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(path)
    if removed:
        log.info("removed %d scratch director%s of dead processes", len(removed), "y" if len(removed) == 1 else "ies")
    return removed
