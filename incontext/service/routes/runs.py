"""Runs: create (201, queued at once), read, list, logs, statuses, cancel.

Reads (a run, the list, logs) count against the key's read limit; `GET /v1/runs/{id}`, the
route clients poll, answers 304 to an `If-None-Match` that holds its current ETag."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from incontext.service import conditional, lifecycle, store, submission
from incontext.service.conditional import IfNoneMatch
from incontext.service.deps import KeyDep, ReadLimitDep, ReadSessionDep, ServiceDep, StorageDep
from incontext.service.errors import ValidationFailed, field_error
from incontext.workflows import WORKFLOWS
from incontext.service.schemas import Lineage, LineageItem, LogList, LogPublic, RunCreate, RunList, RunPublic, StatusList, StatusPublic

router = APIRouter(prefix="/v1", tags=["runs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description="same key + same body replays the first response")]


@router.post("/models/{model_id:path}/runs", status_code=201, response_model=RunPublic)
async def create_run(model_id: str, body: RunCreate, request: Request, key: KeyDep, service: ServiceDep, idempotency_key: IdempotencyKey = None):
    """Queue a run (201, `queued`); it starts as soon as the model has room."""
    run_request = submission.RunRequest(
        model_id=model_id, items=[body.input], surface=submission.RUNS_SURFACE, metadata=body.metadata,
        client_refs=[body.client_ref], callback=submission.Callback(body.callback_url) if body.callback_url else None,
        idempotency_key=idempotency_key, idempotency_body=body.model_dump(mode="json", exclude_unset=True),
    )

    def render(session, runs, batch) -> dict:
        return RunPublic.from_row(runs[0], service.storage).model_dump(mode="json")

    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id, render=render)
    return JSONResponse(accepted.content, status_code=accepted.status_code, headers=accepted.headers)


@router.get("/runs/statuses", response_model=StatusList)
def run_statuses(_: KeyDep):
    return StatusList(items=[StatusPublic(code=c, terminal=t, description=d) for c, t, d in lifecycle.STATUSES])


@router.get("/runs", response_model=RunList)
def list_runs(
    key: KeyDep,
    _: ReadLimitDep,
    service: ServiceDep,
    session: ReadSessionDep,
    status: Annotated[list[str] | None, Query(description="one or more statuses; repeat or comma-separate")] = None,
    model_id: str | None = None,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
):
    statuses = None
    if status:
        statuses = [lifecycle.normalize_status(s.strip()) for part in status for s in part.split(",") if s.strip()]
        known = {c for c, _, _ in lifecycle.STATUSES}
        if bad := [s for s in statuses if s not in known]:
            raise ValidationFailed(f"unknown status {bad[0]!r}", errors=[field_error("status", f"one of {sorted(known)}", "enum")])
    engine_model_id = run_model_id = None
    if model_id and model_id.strip("/") in WORKFLOWS:
        run_model_id = model_id.strip("/")  # its runs edit on the default model: match the id they report
    elif model_id:
        ids = service.registry.ids()
        # Any alias finds the runs of its model; an unknown id simply matches nothing.
        engine_model_id = service.registry.registered(model_id).id if model_id.strip("/") in ids else model_id
    rows, next_cursor = store.list_runs(
        session, key.id, limit=limit, cursor=cursor, statuses=statuses, engine_model_id=engine_model_id, run_model_id=run_model_id,
        batch_id=batch_id,
    )
    return RunList(items=[RunPublic.from_row(r, service.storage) for r in rows], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunPublic, responses=conditional.NOT_MODIFIED)
def get_run(run_id: str, key: KeyDep, limits: ReadLimitDep, storage: StorageDep, session: ReadSessionDep, if_none_match: IfNoneMatch = None):
    # Serialised here, as FastAPI would: the route clients poll should not take one more trip
    # to the thread pool for FastAPI to validate a model built just now.
    run = RunPublic.from_row(store.get_run(session, key.id, run_id), storage, synchronous=True)
    return conditional.answer(run.model_dump_json().encode(), if_none_match, headers=limits)


@router.get("/runs/{run_id}/logs", response_model=LogList)
def get_run_logs(run_id: str, key: KeyDep, _: ReadLimitDep, session: ReadSessionDep):
    store.get_run(session, key.id, run_id)
    return LogList(items=[LogPublic.from_row(r) for r in store.run_logs(session, run_id)])


@router.get("/runs/{run_id}/lineage", response_model=Lineage)
def get_run_lineage(run_id: str, key: KeyDep, _: ReadLimitDep, storage: StorageDep, session: ReadSessionDep):
    """The edit tree of a run: its parents up to the first upload and every run that continued
    from any of them (`parent_run_id`: an output of this server given as `image_url`), with
    prompts, outputs and the image each one edited. A playground rebuilds its timeline from it."""
    path, runs, cut = store.lineage(session, key.id, run_id)
    return Lineage(run_id=run_id, root_id=path[0], path=path, items=[LineageItem.from_row(r, storage) for r in runs], truncated=cut)


@router.post("/runs/{run_id}/cancel", response_model=RunPublic)
def cancel_run(run_id: str, key: KeyDep, service: ServiceDep, session: ReadSessionDep):
    """Cancel a queued or running run: the engine stops at the next denoising step and the
    run costs nothing. 409 CONFLICT if it already ended."""
    store.get_run(session, key.id, run_id)
    return RunPublic.from_row(submission.cancel(service, run_id), service.storage, synchronous=True)
