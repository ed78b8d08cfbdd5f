"""Read queries the routes need (runs, logs, batches, usage) and idempotency records.

State changes of runs are in lifecycle.py; this module only reads, scoped to one API key:
another key's run is reported as not found, never as forbidden.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from incontext.service.errors import Conflict, NotFound, RunNotFound, ValidationFailed, field_error
from incontext.service.models import Batch, IdempotencyRecord, Run, RunLog
from incontext.service.account_schemas import ModelUsage, UsagePublic
from incontext.service.schemas import format_cost


def get_run(session: Session, api_key_id: str, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None or run.api_key_id != api_key_id:
        raise RunNotFound(f"run {run_id} not found")
    return run


def list_runs(
    session: Session,
    api_key_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    statuses: list[str] | None = None,
    engine_model_id: str | None = None,
    run_model_id: str | None = None,
    batch_id: str | None = None,
    oldest_first: bool = False,
) -> tuple[list[Run], str | None]:
    """A page of runs and the cursor of the next page. Ids are UUIDv7, so ordering by id is
    ordering by creation, and the last id of a page is a stable cursor."""
    query = sa.select(Run).where(Run.api_key_id == api_key_id)
    if statuses:
        query = query.where(Run.status.in_(statuses))
    if engine_model_id:
        query = query.where(Run.engine_model_id == engine_model_id)
    if run_model_id:  # the id a run reports (a workflow's, whose edit runs on the default model)
        query = query.where(Run.model_id == run_model_id)
    if batch_id:
        query = query.where(Run.batch_id == batch_id)
    if cursor:
        query = query.where(Run.id > cursor if oldest_first else Run.id < cursor)
    query = query.order_by(Run.id if oldest_first else Run.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor


def queue_position(session: Session, run: Run) -> int:
    """How many runs of the same model wait ahead of a queued one (any key's: the queue is
    the server's, and a count says nothing else about them). Oldest first, as claimed."""
    return session.scalar(
        sa.select(sa.func.count()).select_from(Run)
        .where(Run.engine_model_id == run.engine_model_id, Run.status == "queued", Run.id < run.id)
    )


MAX_LINEAGE = 500  # runs in one answer; a tree is rarely more than a few dozen turns


def lineage(session: Session, api_key_id: str, run_id: str) -> tuple[list[str], list[Run], bool]:
    """The edit tree a run belongs to, through `parent_run_id` (an output of this server given
    as `image_url`): the ids from the root down to the run, every run of the tree oldest first,
    and whether the tree was cut at MAX_LINEAGE runs. Only the key's own runs."""
    run = get_run(session, api_key_id, run_id)
    path = [run]
    while path[0].parent_run_id and len(path) < MAX_LINEAGE:
        parent = session.get(Run, path[0].parent_run_id)
        if parent is None or parent.api_key_id != api_key_id:
            break  # the parent was deleted: the tree starts here
        path.insert(0, parent)
    tree = {r.id: r for r in path}
    frontier, cut = [path[0].id], False
    while frontier:  # one query per generation
        children = list(session.scalars(
            sa.select(Run).where(Run.api_key_id == api_key_id, Run.parent_run_id.in_(frontier)).order_by(Run.id)
        ))
        fresh = [c for c in children if c.id not in tree]
        if len(tree) + len(fresh) > MAX_LINEAGE:
            fresh, cut = fresh[: MAX_LINEAGE - len(tree)], True
        tree.update((c.id, c) for c in fresh)
        frontier = [] if cut else [c.id for c in fresh]
    return [r.id for r in path], sorted(tree.values(), key=lambda r: r.id), cut


def run_logs(session: Session, run_id: str) -> list[RunLog]:
    return list(session.scalars(sa.select(RunLog).where(RunLog.run_id == run_id).order_by(RunLog.timestamp, RunLog.id)))


def get_batch(session: Session, api_key_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.api_key_id != api_key_id:
        raise NotFound(f"batch {batch_id} not found", code="BATCH_NOT_FOUND")
    return batch


# Idempotency: same key + same body → the first response again; a different body → 409.
def request_hash(route: str, body: Any) -> str:
    canonical = json.dumps([route, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> None:
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationFailed("Idempotency-Key must be 1 to 255 characters", errors=[field_error("header.Idempotency-Key", "1 to 255 characters", "string_too_long")])


def replay(session: Session, api_key_id: str, key: str, digest: str) -> IdempotencyRecord | None:
    record = session.get(IdempotencyRecord, (api_key_id, key))
    if record is not None and record.request_hash != digest:
        raise Conflict("this Idempotency-Key was already used with a different request body")
    return record


def remember(session: Session, api_key_id: str, key: str, digest: str, status_code: int, response: dict) -> None:
    session.add(IdempotencyRecord(api_key_id=api_key_id, key=key, request_hash=digest, status_code=status_code, response=response))


def usage(session: Session, api_key_id: str) -> UsagePublic:
    rows = session.execute(
        sa.select(Run.engine_model_id, Run.status, sa.func.count(), sa.func.sum(Run.num_images), sa.func.sum(Run.cost_micros))
        .where(Run.api_key_id == api_key_id)
        .group_by(Run.engine_model_id, Run.status)
    ).all()
    per_model: dict[str, dict[str, int]] = {}
    for model, status, count, images, cost in rows:
        m = per_model.setdefault(model, {"runs": 0, "succeeded": 0, "images": 0, "cost": 0})
        m["runs"] += count
        m["cost"] += int(cost or 0)
        if status == "succeeded":  # only delivered images count
            m["succeeded"] += count
            m["images"] += int(images or 0)
    models = [
        ModelUsage(model_id=model, runs=m["runs"], succeeded=m["succeeded"], images=m["images"], cost=format_cost(m["cost"]))
        for model, m in sorted(per_model.items())
    ]
    return UsagePublic(
        api_key_id=api_key_id,
        runs=sum(m["runs"] for m in per_model.values()),
        images=sum(m["images"] for m in per_model.values()),
        cost=format_cost(sum(m["cost"] for m in per_model.values())),
        models=models,
    )
