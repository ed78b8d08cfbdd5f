"""Runs: create (201, queued at once), read, list, logs, statuses, cancel.

Reads (a run, the list, logs) count against the key's read limit; `GET /v1/runs/{id}`, the
route clients poll, answers 304 to an `If-None-Match` that holds its current ETag."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from incontext.service import conditional, lifecycle, store, submission
from incontext.service.conditional import IfNoneMatch
from incontext.service.deps import KeyDep, PresetDep, ReadLimitDep, ReadSessionDep, ServiceDep, SessionDep, StorageDep, count_images
from incontext.service.errors import ValidationFailed, field_error
from incontext.service.inputs import RunInput, prefetch
from incontext.service.schemas import Lineage, LineageItem, LogList, LogPublic, RunCreate, RunList, RunPublic, StatusList, StatusPublic

router = APIRouter(prefix="/v1", tags=["runs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description="same key + same body replays the first response")]


def replay_response(session: Session, api_key_id: str, key: str, digest: str, headers: dict) -> JSONResponse | None:
    record = store.replay(session, api_key_id, key, digest)
    if record is None:
        return None
    return JSONResponse(record.response, status_code=record.status_code, headers={**headers, "Idempotent-Replayed": "true"})


def commit_created(session: Session, service, key_id: str, idempotency_key: str | None, digest: str | None,
                   limits: dict, content: dict, inputs: dict[str, RunInput]) -> JSONResponse:
    """Commit newly queued runs (remembering the response under the Idempotency-Key), hand
    their inputs (run id → RunInput) to the dispatcher and answer 201. The runs are
    claimed in the same transaction, so one commit starts them.

    If the same key won a race in another request, answer as it did and drop our inputs."""
    if digest:
        store.remember(session, key_id, idempotency_key, digest, 201, content)
    claimed = service.dispatcher.claim_within(session, inputs)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        for run_id in inputs:
            service.storage.delete_input(run_id)
        if digest and (replay := replay_response(session, key_id, idempotency_key, digest, limits)):
            return replay
        raise
    service.dispatcher.submitted(inputs, claimed)
    return JSONResponse(content, status_code=201, headers=limits)


@router.post("/models/{model_id:path}/runs", status_code=201, response_model=RunPublic)
async def create_run(
    model_id: str,
    body: RunCreate,
    request: Request,
    key: KeyDep,
    preset: PresetDep,
    service: ServiceDep,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
):
    # Async, so that fetching an image_url waits on the event loop, never in a thread the
    # reads need; the database work goes to the thread pool before and after it.
    limits = count_images(service, key, body.input.num_images)
    digest = None
    if idempotency_key is not None:
        store.check_idempotency_key(idempotency_key)
        digest = store.request_hash(f"runs {model_id.strip('/')}", body.model_dump(mode="json", exclude_unset=True))
        if replay := await run_in_threadpool(replay_or_release, session, key.id, idempotency_key, digest, limits):
            return replay
    remote = await prefetch([body.input.image_url], outbound=service.outbound, storage=service.storage, settings=service.settings)
    return await run_in_threadpool(
        _create_run, model_id, body, request.state.request_id, key.id, preset, service, session, idempotency_key, digest, limits, remote
    )


def replay_or_release(session: Session, api_key_id: str, key: str, digest: str, headers: dict) -> JSONResponse | None:
    """The remembered answer to this Idempotency-Key, or None with no transaction left open
    (the image is fetched next)."""
    replay = replay_response(session, api_key_id, key, digest, headers)
    session.commit()
    return replay


def _create_run(model_id, body: RunCreate, request_id, key_id, preset, service, session, idempotency_key, digest, limits, remote) -> JSONResponse:
    submission.check_active_images(session, key_id, body.input.num_images, service.settings)
    prepared = submission.prepare(
        body.input, field="input", model_id=model_id, preset=preset, api_key_id=key_id,
        session=session, storage=service.storage, settings=service.settings, remote=remote,
    )
    run = submission.queue(
        session, service.storage, prepared,
        meta=body.metadata, callback_url=body.callback_url, client_ref=body.client_ref, request_id=request_id,
    )
    content = RunPublic.from_row(run, service.storage).model_dump(mode="json")
    return commit_created(session, service, key_id, idempotency_key, digest, limits, content, {run.id: prepared.run_input})


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
    engine_model_id = None
    if model_id:
        ids = service.registry.ids()
        # Any alias finds the runs of its model; an unknown id simply matches nothing.
        engine_model_id = service.registry.resolve(model_id).id if model_id.strip("/") in ids else model_id
    rows, next_cursor = store.list_runs(
        session, key.id, limit=limit, cursor=cursor, statuses=statuses, engine_model_id=engine_model_id, batch_id=batch_id
    )
    return RunList(items=[RunPublic.from_row(r, service.storage) for r in rows], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunPublic, responses=conditional.NOT_MODIFIED)
def get_run(run_id: str, key: KeyDep, limits: ReadLimitDep, storage: StorageDep, session: ReadSessionDep, if_none_match: IfNoneMatch = None):
    # Serialised here, as FastAPI would: the route clients poll should not take one more trip
    # to the thread pool for FastAPI to validate a model built just now.
    run = RunPublic.from_row(store.get_run(session, key.id, run_id), storage)
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
def cancel_run(run_id: str, key: KeyDep, service: ServiceDep, session: SessionDep):
    """Cancel a queued or running run: the engine stops at the next denoising step and the
    run costs nothing. 409 CONFLICT if it already ended."""
    run = lifecycle.cancel(session, service.storage, store.get_run(session, key.id, run_id))
    session.commit()
    service.storage.delete_input(run_id)
    service.dispatcher.cancel(run_id)
    service.sender.wake()
    return RunPublic.from_row(run, service.storage)
