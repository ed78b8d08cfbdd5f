"""Who holds a run: workers claim queued runs from the database with a lease and a fence.

    claim ─→ renew … renew ─→ end (finish, requeue_lost, release), each naming its fence
      └─ the lease runs out (the worker died, froze, lost the database) ─→ reap: queued again

Every server process is a worker (`new_worker_id`). A claim sets the run's `worker_id`, its
lease (`lease_expires_at`, `lease_s` on the database's clock) and its fence: the run's
`fence` plus one, so it grows at every claim. Every later write of the worker names the fence
it got (lifecycle.transition): once the run was taken back and claimed again, a worker that
lost its lease writes nothing, and drops its result. The reaper, in every process, queues
runs whose lease ran out again, counting a loss, and fails them with WORKER_LOST past the
last attempt. A run therefore ends once: its cost counted once, its callback sent once.

On PostgreSQL the claimed rows are locked `FOR UPDATE SKIP LOCKED`: workers claiming at once
take different runs and never wait for each other. SQLite has no row locks and needs none:
every writing transaction holds the database's write lock (db.py: BEGIN IMMEDIATE).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Container, Mapping
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from incontext.service import lifecycle
from incontext.service.db import utcnow
from incontext.service.errors import WorkerLost
from incontext.service.models import Run
from incontext.service.storage import Storage

log = logging.getLogger(__name__)

# Runs a claim looks at, oldest turn first: more than any cap lets in at once.
CLAIM_WINDOW = 500


def new_worker_id() -> str:
    """This process as a worker: its host and pid (for people reading the runs table), and a
    random part, so a restarted process with the same pid is another worker."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


def _now(session: Session):
    # PostgreSQL: the database's clock, so every worker's leases are measured by one clock
    # whatever the skew between their machines. SQLite is on this machine: its clock is ours.
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.now()
    return utcnow()


def _until(session: Session, lease_s: float):
    return _now(session) + timedelta(seconds=lease_s)


def claim(
    session: Session,
    worker_id: str,
    *,
    lease_s: float,
    cap_per_model: int,
    ready: Container[str] = (),
    cap_per_key: int | None = None,
    busy: Container[str] = (),
) -> tuple[list[Run], bool]:
    """Claim queued runs for `worker_id` while each model stays under its cap and each key
    under `cap_per_key`, counting the runs this worker holds (the caps describe one engine):
    keys in turn, counting what each already has in flight, so one key's backlog of a hundred
    runs does not stand before another key's single run, neither at once nor as slots free
    one at a time (a key with 16 runs in flight waits behind a key with none). Runs in `ready`
    (their input already prepared in memory) start running at once; the others move to
    dispatching. Runs in `busy` are left to other workers: this one still has them on its
    engine under a claim it lost (it was slow), and one engine must not edit a run twice at
    once. Returns the claimed runs, each with its fence, and whether queued runs were left
    waiting."""
    # 1. The queue, by turn: a run's place among its key's queued runs, then age.
    turn = sa.func.row_number().over(partition_by=Run.api_key_id, order_by=Run.id).label("turn")
    waiting = sa.select(Run.id, Run.engine_model_id, Run.api_key_id, turn).where(Run.status == lifecycle.QUEUED).subquery()
    queued = session.execute(
        sa.select(waiting.c.id, waiting.c.engine_model_id, waiting.c.api_key_id, waiting.c.turn)
        .order_by(waiting.c.turn, waiting.c.id)
        .limit(CLAIM_WINDOW)
    ).all()
    if not queued:
        return [], False

    # 2. What this worker holds, and the runs that fit beside it.
    held = (
        sa.select(Run.engine_model_id, Run.api_key_id, sa.func.count())
        .where(Run.status.in_(lifecycle.HELD), Run.worker_id == worker_id)
        .group_by(Run.engine_model_id, Run.api_key_id)
    )
    in_flight: dict[str, int] = {}
    key_in_flight: dict[str, int] = {}
    for model, key, count in session.execute(held).all():
        in_flight[model] = in_flight.get(model, 0) + count
        key_in_flight[key] = key_in_flight.get(key, 0) + count
    chosen = []
    for run_id, model, key, _ in sorted(queued, key=lambda q: (q.turn + key_in_flight.get(q.api_key_id, 0), q.id)):
        if run_id in busy or in_flight.get(model, 0) >= cap_per_model or (cap_per_key is not None and key_in_flight.get(key, 0) >= cap_per_key):
            continue
        in_flight[model] = in_flight.get(model, 0) + 1
        key_in_flight[key] = key_in_flight.get(key, 0) + 1
        chosen.append(run_id)
    if not chosen:
        return [], True

    # 3. Lock them. A run another worker is claiming (or a cancel ending) is skipped: it is
    # theirs. (A slot saved for it stays empty until the next claim.)
    free = set(session.scalars(
        sa.select(Run.id).where(Run.id.in_(chosen), Run.status == lifecycle.QUEUED).with_for_update(skip_locked=True)
    ))
    lease = {"worker_id": worker_id, "lease_expires_at": _until(session, lease_s), "fence": Run.fence + 1}
    claimed = []
    for run_id in chosen:
        if run_id not in free:
            continue
        if run_id in ready:
            run = lifecycle.mark_running(session, run_id, from_states=(lifecycle.QUEUED,), **lease)
        else:
            run = lifecycle.transition(session, run_id, (lifecycle.QUEUED,), status=lifecycle.DISPATCHING, **lease)
        if run:
            claimed.append(run)
    return claimed, len(claimed) < len(queued)


def renew(session: Session, held: Mapping[str, int], lease_s: float) -> set[str]:
    """Extend the lease of every run in `held` (run id → the fence of its claim). Returns the
    ids no longer held under those fences: ended (canceled, perhaps by another process), or
    taken back by the reaper. A lease that ran out is still renewed while nobody took the
    run back: the worker was slow, not gone."""
    if not held:
        return set()
    renewed = set(session.scalars(
        sa.update(Run)
        .where(sa.tuple_(Run.id, Run.fence).in_(list(held.items())), Run.status.in_(lifecycle.HELD))
        .values(lease_expires_at=_until(session, lease_s))
        .returning(Run.id),
        execution_options={"synchronize_session": False},
    ))
    return set(held) - renewed


def holds(session: Session, run_id: str, fence: int) -> bool:
    """Whether the claim with `fence` still holds the run."""
    return session.scalar(
        sa.select(sa.func.count()).select_from(Run).where(Run.id == run_id, Run.fence == fence, Run.status.in_(lifecycle.HELD))
    ) == 1


def release(session: Session, held: Mapping[str, int], why: str) -> list[str]:
    """Hand runs this worker holds back to the queue (it is stopping), counting no loss:
    another worker, or this one's next start, takes them at once. Returns the ids requeued."""
    requeued = []
    for run_id, fence in held.items():
        if lifecycle.transition(
            session, run_id, lifecycle.HELD, under_fence=fence, status=lifecycle.QUEUED, started_at=None, worker_id=None, lease_expires_at=None
        ):
            lifecycle.add_log(session, run_id, f"requeued: {why}", level="warning")
            requeued.append(run_id)
    return requeued


def reap(session: Session, storage: Storage, max_attempts: int) -> list[Run]:
    """Queue again every run whose lease ran out, counting a loss (lifecycle.requeue_lost), or
    fail it with WORKER_LOST at the last attempt. A run claimed before leases existed has
    none: it is taken as expired. Returns the runs reaped, queued or failed."""
    expired = session.execute(
        sa.select(Run.id, Run.status, Run.worker_id, Run.fence)
        .where(Run.status.in_(lifecycle.HELD), sa.or_(Run.lease_expires_at.is_(None), Run.lease_expires_at < _now(session)))
        .order_by(Run.id)
        .with_for_update(skip_locked=True)  # one another reaper or the holder is writing is theirs
    ).all()
    reaped = []
    for run_id, status, worker_id, fence in expired:
        stage = "inference" if status == lifecycle.RUNNING else "dispatch"
        why = f"its worker {worker_id or '(unknown)'} stopped renewing its lease"
        run = lifecycle.requeue_lost(session, storage, run_id, max_attempts, why, under_fence=fence, failure=(WorkerLost.code, stage))
        if run is not None:
            log.warning("run %s: %s; %s", run_id, why, "queued again" if run.status == lifecycle.QUEUED else f"{run.status} ({run.failure_code})",
                        extra={"run_id": run_id})  # the reaper's task drives no run of its own (logs.py)
            reaped.append(run)
    return reaped
