"""A job's checkpoints in storage: the last accepted step of the attempt that is running, for the
next attempt to resume from when this one dies.

Each checkpoint is stored under its own key (`jobs/<id>/checkpoints/<step>/checkpoint.pt`) and only
then named in the job row with its sha256, so a worker killed between the two leaves the previous
one usable; the next attempt loads only a file whose digest matches the row (the file is a pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update

from core.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from domain.db import rows_changed, session_scope
from domain.models import Job
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import Storage, file_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    """Where a job's checkpoint is, as its row names it."""

    key: str
    sha256: str
    step: int


def prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


@dataclass
class Keeper:
    """Stores one attempt's checkpoints; a failure to store one is logged, and the job goes on."""

    settings: Settings
    storage: Storage
    job_id: str
    attempt: int
    scratch: Path
    last: Stored | None

    def __call__(self, checkpoint: Checkpoint) -> None:
        try:
            self._store(checkpoint)
        except Exception:  # a checkpoint only saves work; not having one must not fail the job
            log.exception("could not store the checkpoint of job %s at step %s", self.job_id, checkpoint.steps)

    def _store(self, checkpoint: Checkpoint) -> None:
        path = save_checkpoint(checkpoint, self.scratch / "checkpoint.pt")
        _, sha256 = file_digest(path)
        stored = Stored(f"{prefix(self.job_id)}/{checkpoint.steps}/checkpoint.pt", sha256, checkpoint.steps)
        self.storage.put_file(stored.key, path)
        path.unlink()
        with session_scope(self.settings.database) as session:
            named = rows_changed(session, update(Job).where(
                Job.id == self.job_id, Job.attempts == self.attempt, Job.status == JobStatus.RUNNING).values(
                checkpoint_key=stored.key, checkpoint_sha256=stored.sha256, checkpoint_step=stored.step))
        if not named:  # the job is no longer this attempt's
            self.storage.delete_prefix(stored.key.rsplit("/", 1)[0])
            return
        if self.last is not None and self.last.key != stored.key:
            self.storage.delete_prefix(self.last.key.rsplit("/", 1)[0])
        self.last = stored


def fetch(storage: Storage, job_id: str, stored: Stored, scratch: Path) -> Checkpoint | None:
    """The stored checkpoint, or None (logged) when it is missing, altered or unreadable: the
    attempt then starts from the beginning."""
    path = scratch / "resume.pt"
    try:
        storage.get_file(stored.key, path)
        if file_digest(path)[1] != stored.sha256:
            log.warning("the checkpoint of job %s does not match its digest; starting over", job_id)
            return None
        return load_checkpoint(path)
    except Exception:  # any of these means there is nothing to resume from, not that the job failed
        log.exception("could not load the checkpoint of job %s; starting over", job_id)
        return None
    finally:
        path.unlink(missing_ok=True)


def drop(settings: Settings, storage: Storage, job_id: str) -> None:
    """Forget the job's checkpoints (it has ended)."""
    with session_scope(settings.database) as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            checkpoint_key=None, checkpoint_sha256=None, checkpoint_step=None))
    storage.delete_prefix(prefix(job_id))
