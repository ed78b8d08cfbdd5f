"""Batches: up to 100 inputs submitted at once, each becoming a run; one callback at the end."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from incontext.service import lifecycle, store, submission
from incontext.service.deps import KeyDep, PresetDep, ReadSessionDep, ServiceDep, SessionDep, count_images
from incontext.service.models import Batch
from incontext.service.inputs import prefetch
from incontext.service.routes.runs import IdempotencyKey, commit_created, replay_or_release
from incontext.service.schemas import BatchCreate, BatchPublic, RunList, RunPublic

router = APIRouter(prefix="/v1", tags=["batches"])


def batch_public(session, batch: Batch, storage) -> BatchPublic:
    counts, cost = lifecycle.batch_counts(session, batch.id)
    status = batch.status or lifecycle.batch_status(counts)
    return BatchPublic.from_row(batch, status, counts, cost, storage)


@router.post("/models/{model_id:path}/batches", status_code=201, response_model=BatchPublic)
async def create_batch(
    model_id: str,
    body: BatchCreate,
    request: Request,
    key: KeyDep,
    preset: PresetDep,
    service: ServiceDep,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
):
    """All items are validated (images fetched and decoded) before any is queued: one bad
    item rejects the batch with a 422 naming it (`input.3.image_url`). Every item's images
    count against the key's rate limit."""
    limits = count_images(service, key, sum(item.num_images for item in body.input))
    digest = None
    if idempotency_key is not None:
        store.check_idempotency_key(idempotency_key)
        digest = store.request_hash(f"batches {model_id.strip('/')}", body.model_dump(mode="json", exclude_unset=True))
        if replay := await run_in_threadpool(replay_or_release, session, key.id, idempotency_key, digest, limits):
            return replay
    remote = await prefetch([item.image_url for item in body.input], outbound=service.outbound, storage=service.storage, settings=service.settings)
    return await run_in_threadpool(
        _create_batch, model_id, body, request.state.request_id, key.id, preset, service, session, idempotency_key, digest, limits, remote
    )


def _create_batch(model_id, body: BatchCreate, request_id, key_id, preset, service, session, idempotency_key, digest, limits, remote):
    submission.check_active_images(session, key_id, sum(item.num_images for item in body.input), service.settings)
    prepared = [
        submission.prepare(
            item, field=f"input.{i}", model_id=model_id, preset=preset, api_key_id=key_id,
            session=session, storage=service.storage, settings=service.settings, remote=remote,
        )
        for i, item in enumerate(body.input)
    ]
    batch = Batch(api_key_id=key_id, model_id=model_id.strip("/"), meta=body.metadata, callback_url=body.callback_url)
    session.add(batch)
    session.flush()
    runs = [
        submission.queue(session, service.storage, p, batch_id=batch.id, client_ref=item.client_ref, request_id=request_id)
        for p, item in zip(prepared, body.input)
    ]
    content = batch_public(session, batch, service.storage).model_dump(mode="json")
    return commit_created(session, service, key_id, idempotency_key, digest, limits, content, {run.id: p.run_input for run, p in zip(runs, prepared)})


@router.get("/batches/{batch_id}", response_model=BatchPublic)
def get_batch(batch_id: str, key: KeyDep, service: ServiceDep, session: ReadSessionDep):
    return batch_public(session, store.get_batch(session, key.id, batch_id), service.storage)


@router.get("/batches/{batch_id}/items", response_model=RunList)
def get_batch_items(
    batch_id: str,
    key: KeyDep,
    service: ServiceDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    cursor: str | None = None,
):
    """The batch's runs in submission order."""
    store.get_batch(session, key.id, batch_id)
    rows, next_cursor = store.list_runs(session, key.id, limit=limit, cursor=cursor, batch_id=batch_id, oldest_first=True)
    return RunList(items=[RunPublic.from_row(r, service.storage) for r in rows], next_cursor=next_cursor)
