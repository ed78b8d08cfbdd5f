"""A run's states and every transition between them.

    queued → dispatching → running → succeeded | failed | canceled
       └──────────────┴────────┴──→ canceled (cancel) / failed (input lost at restart)
       ↑                       │
       └───────────────────────┘ the engine's process died (requeue_lost) or its worker's lease
                                  expired (leases.reap), a bounded number of times in all

A run whose input the dispatcher already holds in memory goes from queued straight to
running: there is nothing left to prepare.

Each transition is a compare-and-set on the status column, so the dispatcher, a cancel
request and crash recovery can race and exactly one of them wins. A worker's own writes to a
run it holds also name the fence of its claim (leases.py): once the run was taken back from
it, they match nothing. The transition to a
terminal state also queues the callback in the same transaction, so no finished run can
miss its callback.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from incontext.service import callbacks
from incontext.service.db import utcnow
from incontext.service.errors import Conflict
from incontext.service.models import Batch, Run, RunLog
from incontext.service.storage import Storage

log = logging.getLogger(__name__)

QUEUED, DISPATCHING, RUNNING = "queued", "dispatching", "running"
SUCCEEDED, FAILED, CANCELED, PARTIAL_SUCCEEDED = "succeeded", "failed", "canceled", "partial_succeeded"
ACTIVE = (QUEUED, DISPATCHING, RUNNING)
HELD = (DISPATCHING, RUNNING)  # a worker holds the run, under a lease
TERMINAL = (SUCCEEDED, FAILED, CANCELED)

STATUSES = [
    (QUEUED, False, "accepted, waiting for the engine (also while over the per-model concurrency cap)"),
    (DISPATCHING, False, "claimed by the dispatcher; input being prepared"),
    (RUNNING, False, "the engine is denoising"),
    (SUCCEEDED, True, "finished; output holds the images"),
    (FAILED, True, "finished without output; failure_code says why; costs nothing"),
    (CANCELED, True, "canceled on request; inference stopped between steps; costs nothing"),
    (PARTIAL_SUCCEEDED, True, "batches only: some items succeeded, some did not"),
]


def normalize_status(status: str) -> str:
    # Hosted docs spell it both ways; store and report one.
    return CANCELED if status == "cancelled" else status


# Rows on the path of every run are written with plain INSERT/UPDATE … RETURNING statements:
# the ORM's bookkeeping for a new or changed object (session.add, flush) costs more than the
# statements themselves.
def add_log(session: Session, run_id: str, message: str, *, level: str = "info", meta: dict | None = None, at: datetime | None = None) -> None:
    session.execute(sa.insert(RunLog).values(run_id=run_id, level_code=level, message=message, meta=meta, timestamp=at or utcnow()))


def create_run(session: Session, **fields: Any) -> Run:
    run = session.scalars(sa.insert(Run).values(status=QUEUED, **fields).returning(Run)).one()
    add_log(session, run.id, "accepted", meta={"model_id": run.engine_model_id, "num_images": run.num_images})
    return run


def active_images(session: Session, api_key_id: str) -> int:
    """Images the key has queued or running."""
    return session.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(Run.num_images), 0)).where(Run.api_key_id == api_key_id, Run.status.in_(ACTIVE))
    )


def transition(session: Session, run_id: str, from_states: tuple[str, ...], *, under_fence: int | None = None, **values: Any) -> Run | None:
    """Set `values` if the run is still in one of `from_states` (and, given `under_fence`,
    still held under that claim); the updated run, or None if another writer won."""
    # UPDATE … RETURNING: the compare-and-set and the updated row in one statement.
    query = sa.update(Run).where(Run.id == run_id, Run.status.in_(from_states))
    if under_fence is not None:
        query = query.where(Run.fence == under_fence)
    return session.scalars(
        query.values(**values).returning(Run),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).one_or_none()


def mark_running(session: Session, run_id: str, from_states: tuple[str, ...] = (DISPATCHING,), *, under_fence: int | None = None, **values: Any) -> Run | None:
    run = transition(session, run_id, from_states, under_fence=under_fence, status=RUNNING, started_at=utcnow(), **values)
    if run:
        add_log(session, run_id, "started", meta={"num_inference_steps": run.params.get("num_inference_steps")})
    return run


def finish(
    session: Session,
    storage: Storage,
    run_id: str,
    status: str,
    *,
    output: dict | None = None,
    failure: tuple[str, str, str] | None = None,  # (code, message, stage_code)
    under_fence: int | None = None,
) -> Run | None:
    """Move an active run to a terminal status, price it, log it, queue its callback. With
    `fence`, the worker holding the run under that claim ends it; without, anyone may (a
    cancel).

    The run's input file stays until retention deletes the run's files (a cancel drops it
    at once: there is no output to compare it with).
    Returns None when the run had already ended (e.g. canceled while the engine finished it),
    or, with `under_fence`, was taken back from its worker: the first terminal status stands, and
    a worker that lost its lease writes nothing.
    """
    values: dict[str, Any] = {"status": status, "completed_at": utcnow(), "output": output, "cost_micros": 0}
    if status == SUCCEEDED:
        # Only delivered images are billed; the price was fixed when the run was accepted.
        values["cost_micros"] = Run.params["unit_price_micros"].as_integer() * len(output["outputs"])
    if failure:
        values.update(failure_code=failure[0], failure_message=failure[1], failure_stage_code=failure[2])
    run = transition(session, run_id, ACTIVE if under_fence is None else HELD, under_fence=under_fence, **values)
    if run is None:
        return None
    level = "error" if status == FAILED else "info"
    add_log(session, run_id, status, level=level, meta={"failure_code": failure[0]} if failure else None)
    if run.callback_url:
        callbacks.enqueue_run(session, run, storage)
    if run.batch_id:
        finish_batch_if_done(session, storage, run.batch_id)
    return run


def cancel(session: Session, storage: Storage, run: Run) -> Run:
    """Cancel in the database (the engine is told separately). Conflict if already ended."""
    add_log(session, run.id, "cancel requested by client", level="warning")
    ended = finish(session, storage, run.id, CANCELED)
    if ended is None:
        session.refresh(run)
        raise Conflict(f"run {run.id} already ended with status {run.status}")
    return ended


def recover_interrupted(session: Session, storage: Storage) -> tuple[int, int]:
    """At start-up on a database only this process uses (SQLite): runs a crash left claimed or
    running go back to the queue, or fail with INPUT_LOST if their input is gone. Returns
    (requeued, failed)."""
    requeued = failed = 0
    stuck = session.scalars(sa.select(Run.id).where(Run.status.in_(HELD)).order_by(Run.id)).all()
    for run_id in stuck:
        if storage.has_input(run_id):
            if transition(session, run_id, HELD, status=QUEUED, started_at=None, worker_id=None, lease_expires_at=None):
                add_log(session, run_id, "requeued after a restart", level="warning")
                requeued += 1
        elif finish(session, storage, run_id, FAILED, failure=("INPUT_LOST", "the server restarted and the run's input file is gone", "dispatch")):
            failed += 1
    if requeued or failed:
        log.warning("recovered interrupted runs: %d requeued, %d failed", requeued, failed)
    return requeued, failed


def requeue_lost(
    session: Session,
    storage: Storage,
    run_id: str,
    max_attempts: int,
    why: str,
    *,
    under_fence: int | None = None,
    failure: tuple[str, str] = ("ENGINE_CRASHED", "inference"),  # (code, stage_code) past the last attempt
) -> Run | None:
    """The engine's process (or the whole worker: leases.reap) died while it had the run:
    queue the run again, or fail it with `failure` once the engine has died under it
    `max_attempts` times (a run that kills every engine it reaches must not take the service
    down forever). Other runs in flight count a death too: which one was at fault cannot be
    told. Returns the run, queued or failed; None if it had already ended (e.g. canceled) or,
    with `under_fence`, had been taken from that claim already."""
    run = transition(
        session, run_id, HELD, under_fence=under_fence,
        status=QUEUED, started_at=None, worker_id=None, lease_expires_at=None, engine_crashes=Run.engine_crashes + 1,
    )
    if run is None:
        return None
    if run.engine_crashes >= max_attempts:
        message = f"the engine stopped {run.engine_crashes} times while it had this run; the last time: {why}"
        return finish(session, storage, run_id, FAILED, failure=(failure[0], message, failure[1]))
    add_log(
        session, run_id, f"requeued: {why} (attempt {run.engine_crashes} of {max_attempts})",
        level="warning", meta={"engine_crashes": run.engine_crashes},
    )
    return run


def batch_counts(session: Session, batch_id: str) -> tuple[dict[str, int], int]:
    """Runs of a batch per status, and their summed cost in micros."""
    rows = session.execute(
        sa.select(Run.status, sa.func.count(), sa.func.coalesce(sa.func.sum(Run.cost_micros), 0))
        .where(Run.batch_id == batch_id)
        .group_by(Run.status)
    ).all()
    counts = {status: 0 for status in (*ACTIVE, *TERMINAL)}
    for status, n, _ in rows:
        counts[status] = n
    counts["total"] = sum(n for _, n, _ in rows)
    return counts, sum(int(c) for _, _, c in rows)


def batch_status(counts: dict[str, int]) -> str:
    if any(counts[s] for s in ACTIVE):
        return QUEUED if counts[QUEUED] == counts["total"] else RUNNING
    if counts[SUCCEEDED] == counts["total"]:
        return SUCCEEDED
    return FAILED if counts[SUCCEEDED] == 0 else PARTIAL_SUCCEEDED


def finish_batch_if_done(session: Session, storage: Storage, batch_id: str) -> None:
    # Lock the batch first: two of its runs ending in concurrent transactions would each
    # count the other as still active, and neither would end the batch (PostgreSQL).
    session.execute(sa.select(Batch.id).where(Batch.id == batch_id).with_for_update())
    counts, _ = batch_counts(session, batch_id)
    status = batch_status(counts)
    if status not in (SUCCEEDED, FAILED, PARTIAL_SUCCEEDED):
        return
    result = session.execute(
        sa.update(Batch).where(Batch.id == batch_id, Batch.completed_at.is_(None)).values(status=status, completed_at=utcnow()),
        execution_options={"synchronize_session": False},
    )
    if result.rowcount == 1:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch.callback_url:
            callbacks.enqueue_batch(session, batch, counts, storage)
