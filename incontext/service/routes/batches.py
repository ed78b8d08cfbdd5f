"""Batches: up to 100 inputs submitted at once, each becoming a run; one callback at the end.
A workflow's batches (`POST /v1/models/object-removal/batches`, …) are routes/workflows.py's,
with the workflow's input schema per item, answered here (`accept`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from incontext.service import lifecycle, store, submission
from incontext.service.deps import KeyDep, ReadSessionDep, Service, ServiceDep
from incontext.service.models import ApiKey, Batch
from incontext.service.routes.runs import IdempotencyKey
from incontext.service.schemas import BatchCreate, BatchPublic, RunList, RunPublic

router = APIRouter(prefix="/v1", tags=["batches"])


def batch_public(session, batch: Batch, storage) -> BatchPublic:
    counts, cost = lifecycle.batch_counts(session, batch.id)
    status = batch.status or lifecycle.batch_status(counts)
    return BatchPublic.from_row(batch, status, counts, cost, storage)


@router.post("/models/{model_id:path}/batches", status_code=201, response_model=BatchPublic)
async def create_batch(model_id: str, body: BatchCreate, request: Request, key: KeyDep, service: ServiceDep, idempotency_key: IdempotencyKey = None):
    """All items are validated (images fetched and decoded) before any is queued: one bad
    item rejects the batch with a 422 naming it (`input.3.image_url`). Every item's images
    count against the key's rate limit."""
    run_request = submission.RunRequest(
        model_id=model_id, items=list(body.input), surface=submission.BATCHES_SURFACE, batch=True,
        metadata=body.metadata, client_refs=[item.client_ref for item in body.input],
        callback=submission.Callback(body.callback_url) if body.callback_url else None,
        idempotency_key=idempotency_key, idempotency_body=body.model_dump(mode="json", exclude_unset=True),
    )
    return await accept(run_request, request, key, service)


async def accept(run_request: submission.RunRequest, request: Request, key: ApiKey, service: Service) -> JSONResponse:
    """Submit a batch's runs and answer with the batch (201), as every batch route does."""

    def render(session, runs, batch) -> dict:
        return batch_public(session, batch, service.storage).model_dump(mode="json")

    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id, render=render)
    return JSONResponse(accepted.content, status_code=accepted.status_code, headers=accepted.headers)


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
