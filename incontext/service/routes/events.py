"""`GET /v1/runs/{id}/events`: a run's life as Server-Sent Events, for clients that would
rather watch than poll (the playground, `incontext edit --server`). Polling still works.

    event: queued    data: {"status_code": "queued", "queue_position": 2}      (no id)
    event: running   data: {"status_code": "running"}                           (no id)
    id: 7
    event: step      data: {"step": 7, "total_steps": 20, "preview": "data:image/png;base64,…" | null}
    id: 21
    event: end       data: <the run, as GET /v1/runs/{id} answers it>

`queued`/`running` are snapshots, sent again on every connection, so they carry no id; steps
are numbered from 1 and the end takes the number after the last step. `Last-Event-ID: n`
(sent by EventSource when it reconnects) resumes after event n: the steps after it, then the
end; a client that already has the end gets an empty stream. Steps are kept in the server's
memory while a run runs and for a while after (service/progress.py); a stream for a run that
ended long ago, or in another server process, is its status and its end. The same key rules
as `GET /v1/runs/{id}` (another key's run is 404) and one read against the read limit per
connection. A comment line every 15 s keeps idle proxies from closing the stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from incontext.service import lifecycle, store
from incontext.service.deps import KeyDep, ReadLimitDep, Service, ServiceDep
from incontext.service.models import Run
from incontext.service.schemas import RunPublic

router = APIRouter(prefix="/v1", tags=["runs"])

RECHECK_RUNNING_S = 2.0  # a run's end is announced by the dispatcher; this catches any other end
RECHECK_QUEUED_S = 1.0  # queue positions move without an announcement
KEEPALIVE_S = 15.0

LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", description="resume after this event id")]

_STREAM = {200: {"description": "text/event-stream: queued, running, step and end events", "content": {"text/event-stream": {}}}}


def sse(event: str, data: dict | str, id: int | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"id: {id}\n" if id is not None else "") + f"event: {event}\ndata: {body}\n\n"


@router.get("/runs/{run_id}/events", response_class=StreamingResponse, responses=_STREAM)
async def run_events(run_id: str, key: KeyDep, limits: ReadLimitDep, service: ServiceDep, last_event_id: LastEventId = None):
    """Stream the run's queue position, steps (with a small preview every few steps) and
    its end (the run with its outputs). Resumes after `Last-Event-ID`."""
    first = await run_in_threadpool(_read, service, key.id, run_id)  # 404 before the stream starts
    after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else 0
    headers = {**limits, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(service, key.id, first, after), media_type="text/event-stream", headers=headers)


def _read(service: Service, key_id: str, run_id: str) -> tuple[Run, int | None, str | None]:
    """The run, its queue position (if queued) and, if it ended, its public body (URLs signed now)."""
    with service.read_sessions() as session:
        run = store.get_run(session, key_id, run_id)
        position = store.queue_position(session, run) if run.status == lifecycle.QUEUED else None
        body = RunPublic.from_row(run, service.storage, synchronous=True).model_dump_json() if run.status in lifecycle.TERMINAL else None
        return run, position, body


async def _stream(service: Service, key_id: str, first: tuple, after: int) -> AsyncIterator[str]:
    progress = service.dispatcher.progress
    run, position, ended = first
    yield "retry: 1000\n\n"
    shown = None  # the last status snapshot sent
    quiet = 0.0  # seconds since anything was sent
    while True:
        for event in progress.since(run.id, after):
            yield sse("step", {"step": event.step, "total_steps": event.total_steps, "preview": event.preview}, event.id)
            after, quiet = event.id, 0.0
        if ended is not None:
            end_id = progress.last_id(run.id) + 1
            if after < end_id:
                yield sse("end", ended, end_id)
            return
        snapshot = (run.status, position)
        if snapshot != shown:
            status = "queued" if run.status == lifecycle.QUEUED else "running"  # dispatching is running to a watcher
            yield sse(status, {"status_code": run.status, "queue_position": position} if position is not None else {"status_code": run.status})
            shown, quiet = snapshot, 0.0
        timeout = RECHECK_QUEUED_S if run.status == lifecycle.QUEUED else RECHECK_RUNNING_S
        woken = await progress.wait(run.id, after, timeout)
        if woken == "step":
            continue
        quiet += timeout if woken == "timeout" else 0.0
        if quiet >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        run, position, ended = await run_in_threadpool(_read, service, key_id, run.id)
