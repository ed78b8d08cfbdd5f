"""Retention: a finished run's files (its input, output images and masks) are deleted
`retention_days` after it ended; the run row stays, for usage and history, and its output
URLs answer 404 from then on (docs: incontext/service/docs/runs-api.md).

The job walks the files on disk, not the runs table: what was deleted is never looked at
again, and files whose run is gone from the database (a restored backup) go too.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from incontext.service import lifecycle
from incontext.service.db import utcnow
from incontext.service.models import Run
from incontext.service.storage import Storage

log = logging.getLogger(__name__)

EVERY_S = 3600.0
CHUNK = 500  # run ids per query


def expire_files(sessions: sessionmaker[Session], storage: Storage, cutoff: datetime) -> int:
    """Delete the files of runs that ended before `cutoff`; how many runs lost files."""
    on_disk = sorted(
        {p.name for p in storage.outputs.iterdir() if p.is_dir()}
        | {p.name for p in storage.inputs.iterdir() if p.is_file()}
        | {p.name for p in storage.references.iterdir() if p.is_dir()}
    )
    expired = 0
    for start in range(0, len(on_disk), CHUNK):
        chunk = on_disk[start : start + CHUNK]
        with sessions() as session:
            rows = dict(session.execute(sa.select(Run.id, Run.completed_at).where(Run.id.in_(chunk), Run.status.in_(lifecycle.TERMINAL))).all())
            known = set(session.scalars(sa.select(Run.id).where(Run.id.in_(chunk))))
        for run_id in chunk:
            ended = rows.get(run_id)
            # A run the database does not know has no one to show its files to; an active
            # run's input is still needed.
            if (ended is not None and ended < cutoff) or run_id not in known:
                storage.delete_outputs(run_id)
                storage.delete_input(run_id)
                expired += 1
    return expired


class RetentionJob:
    def __init__(self, sessions: sessionmaker[Session], storage: Storage, *, days: float, every_s: float = EVERY_S):
        self._sessions = sessions
        self._storage = storage
        self._keep = timedelta(days=days)
        self._every_s = every_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._keep:  # 0 days: keep forever
            self._task = asyncio.create_task(self._run(), name="retention")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                expired = await asyncio.to_thread(expire_files, self._sessions, self._storage, utcnow() - self._keep)
                if expired:
                    log.info("retention: deleted the files of %d runs that ended more than %s ago", expired, self._keep)
            except Exception:
                log.exception("retention: cleanup failed; trying again in %g s", self._every_s)
            await asyncio.sleep(self._every_s)
