"""The fal-style surface, as `fal-client` speaks it. fal-client builds its URLs from two
environment variables, read when it is imported, and speaks only HTTPS:

    FAL_RUN_HOST=<host:port>              POST /fal-ai/{app}          (run: answers when done)
    FAL_QUEUE_RUN_HOST=<host:port>/queue  POST /queue/fal-ai/{app}    → {request_id, status_url, response_url, cancel_url}
                                          GET  /queue/fal-ai/{app}/requests/{id}/status   IN_QUEUE | IN_PROGRESS | COMPLETED
                                          GET  /queue/fal-ai/{app}/requests/{id}          the result
                                          PUT  /queue/fal-ai/{app}/requests/{id}/cancel

so the server must listen with TLS (uvicorn --ssl-certfile/--ssl-keyfile) under a certificate
the client trusts (SSL_CERT_FILE); docs/other-surfaces.md has the recipe. `{app}` is
`flux-pro/kontext` (fal's app id `fal-ai/flux-pro/kontext`), or, in status, result and cancel
URLs, its first part only (`flux-pro`), as fal-client builds them. Key: `Authorization: Key …`.

The inputs are fal's Kontext names, which are ours (image_url, prompt, guidance_scale,
num_images, output_format, safety_tolerance, aspect_ratio, seed, sync_mode), and a mask as
fal's inpainting apps take it, `mask_url` (white may change; `mask_image_url` also). A request is an
ordinary stored run. The result: `{images: [{url, width, height, content_type}], seed,
has_nsfw_concepts, prompt, timings}`. Errors are fal's: `{"detail": message}` (a list of
`{loc, msg, type}` for 422). fal-client's file upload goes to fal's own storage, not here:
send URLs or data URIs.

`?fal_webhook=<url>` on a queue submit (fal-client's `submit(..., webhook_url=…)`): when the
request ends, `{request_id, gateway_request_id, status: "OK" | "ERROR", payload, error}` is
POSTed to it, `payload` being the result (or `{"detail": …}` on error), with the retries and
history of any callback. fal signs with its own ED25519 keys, which this server does not hold:
it signs per Standard Webhooks with the key's callback secrets instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from incontext.service import callbacks, lifecycle, netpolicy, outputs, store, submission, surfaces
from incontext.service.deps import ServiceDep, count_read
from incontext.service.errors import Conflict, ServiceError, ValidationFailed, field_error
from incontext.service.models import ApiKey, Run
from incontext.service.routes import bfl
from incontext.service.runparams import RunParams
from incontext.service.schemas import CallbackUrl, KontextInput, public_output
from incontext.service.storage import Storage

OWNER = "fal-ai"
STYLE = "fal"
RUN_WAIT_S = 600.0  # the run route holds the request this long at most, then cancels
POLL_S = 0.2

NAMES = {"mask_image_url": "mask_url"}
router = APIRouter(tags=["fal"], route_class=surfaces.route_class(bfl.render_error))  # fal apps answer FastAPI-shaped errors
FalKeyDep = Annotated[ApiKey, Depends(surfaces.key_from_headers)]


async def _submit(app: str, item: KontextInput, request: Request, key: ApiKey, service, webhook: str | None = None, **workflow) -> Run:
    """`workflow`: a workflow's `plan`, `echo` and `names` (routes/workflows.py), run as its id."""
    if webhook is not None and (reason := netpolicy.url_refusal(webhook)):
        message = f"fal_webhook: {reason}"
        raise ValidationFailed(message, errors=[field_error("fal_webhook", message, "value_error")])
    callback = submission.Callback(webhook, style=STYLE) if webhook else None
    # fal's inpainting apps call the mask mask_url (KontextInput reads it as mask_image_url).
    names = workflow.pop("names", NAMES)
    run_request = submission.RunRequest(model_id=f"{OWNER}/{app}", items=[item], surface=f"POST /{OWNER}/{app}", names=names, callback=callback,
                                        **workflow)
    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id)
    return accepted.runs[0]


def queued(run: Run, app: str, storage: Storage) -> JSONResponse:
    """A queue submit's answer: where to poll, read and cancel."""
    return JSONResponse(_handle(run.id, app, storage) | {"status": "IN_QUEUE", "queue_position": 0, "gateway_request_id": run.id})


async def finished(run: Run, app: str, service) -> JSONResponse:
    """A synchronous run's answer, once the run ends: its result; canceled if not done in time."""
    deadline = time.monotonic() + RUN_WAIT_S
    while run.status not in lifecycle.TERMINAL:
        if time.monotonic() > deadline:
            await run_in_threadpool(surfaces.cancel_run, service, run.id, f"not done within {RUN_WAIT_S:g} s for POST /{OWNER}/{app}")
            raise ServiceError(f"request {run.id} did not finish in time and was canceled", code="TIMEOUT", http_status=504)
        await asyncio.sleep(POLL_S)
        run = await run_in_threadpool(surfaces.load_run, service, run.id)
    return JSONResponse(_result_or_raise(run, service.storage), headers={"x-fal-request-id": run.id})


@router.post("/queue/fal-ai/{app:path}")
async def submit_request(
    app: str, request: Request, key: FalKeyDep, service: ServiceDep, values: Annotated[KontextInput, Body()],
    fal_webhook: Annotated[CallbackUrl | None, Query(max_length=2048, description="POSTed the result when the request ends")] = None,
):
    """Queue a request; poll status_url, then GET response_url (or hear of the end at fal_webhook)."""
    return queued(await _submit(app, values, request, key, service, webhook=fal_webhook), app, service.storage)


@router.post("/fal-ai/{app:path}")
async def run_request(app: str, request: Request, key: FalKeyDep, service: ServiceDep, values: Annotated[KontextInput, Body()]):
    """Run and answer with the result (fal's synchronous `run`); canceled if not done in time."""
    return await finished(await _submit(app, values, request, key, service), app, service)


@router.get("/queue/fal-ai/{app:path}/requests/{request_id}/status")
def request_status(app: str, request_id: str, key: FalKeyDep, service: ServiceDep, logs: Annotated[bool, Query()] = False):
    count_read(service, key)
    with service.read_sessions() as session:
        run = store.get_run(session, key.id, request_id)
        body = _handle(run.id, app, service.storage)
        entries = [
            {"message": e.message, "level": e.level_code.upper(), "source": "server", "timestamp": e.timestamp.isoformat()}
            for e in store.run_logs(session, run.id)
        ] if logs else None
        if run.status in (lifecycle.QUEUED, lifecycle.DISPATCHING):
            body.update(status="IN_QUEUE", queue_position=store.queue_position(session, run) if run.status == lifecycle.QUEUED else 0)
        elif run.status == lifecycle.RUNNING:
            body.update(status="IN_PROGRESS", logs=entries)
        else:
            body.update(status="COMPLETED", logs=entries, metrics=_metrics(run))
            if run.status == lifecycle.FAILED:
                body.update(error=run.failure_message, error_type=run.failure_code)
            elif run.status == lifecycle.CANCELED:
                body.update(error="the request was canceled", error_type="request_canceled")
    return body


@router.get("/queue/fal-ai/{app:path}/requests/{request_id}")
def request_result(app: str, request_id: str, key: FalKeyDep, service: ServiceDep):
    count_read(service, key)
    with service.read_sessions() as session:
        run = store.get_run(session, key.id, request_id)
    if run.status not in lifecycle.TERMINAL:
        raise ServiceError("the request is still in progress", code="REQUEST_IN_PROGRESS", http_status=400)
    return JSONResponse(_result_or_raise(run, service.storage), headers={"x-fal-request-id": run.id})


class CancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]


@router.put(
    "/queue/fal-ai/{app:path}/requests/{request_id}/cancel", status_code=202, response_model=CancelAnswer,
    responses={400: {"model": CancelAnswer, "description": "`ALREADY_COMPLETED`: the request had ended"}},
)
def cancel_request(app: str, request_id: str, key: FalKeyDep, service: ServiceDep):
    """202 `CANCELLATION_REQUESTED`; 400 `ALREADY_COMPLETED` if it had ended (as fal answers)."""
    with service.read_sessions() as session:
        store.get_run(session, key.id, request_id)
    try:
        submission.cancel(service, request_id, f"cancel requested through PUT /queue/{OWNER}/{app}/requests/{{id}}/cancel")
    except Conflict:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)


def _handle(run_id: str, app: str, storage: Storage) -> dict:
    # fal-client builds these URLs itself from the app's first part (owner/alias); give the same.
    base = f"{storage.base_url}/queue/{OWNER}/{app.split('/')[0]}/requests/{run_id}"
    return {"request_id": run_id, "response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel", "logs": None, "metrics": {}}


def _metrics(run: Run) -> dict:
    if run.started_at and run.completed_at:
        return {"inference_time": (run.completed_at - run.started_at).total_seconds()}
    return {}


def _result_or_raise(run: Run, storage: Storage) -> dict:
    if run.status == lifecycle.FAILED:
        raise ServiceError(run.failure_message or "the request failed", code=run.failure_code or "INTERNAL_ERROR", http_status=500)
    if run.status == lifecycle.CANCELED:
        raise ServiceError("the request was canceled", code="CANCELED", http_status=400)
    # Every caller is the request's own answer (its result, the sync route, its webhook).
    output = public_output(run.output, storage, inline=outputs.inline_now(run))
    images = [{k: o[k] for k in ("url", "width", "height", "content_type")} for o in output["outputs"]]
    params = RunParams.of(run)
    result = {
        "images": images,
        "seed": output["seed"],
        "has_nsfw_concepts": [False] * len(images),  # no safety checker here
        "prompt": params.prompt,
        "timings": {"inference": _metrics(run).get("inference_time")},
    }
    if params.workflow:  # a workflow's results, as fal's segmentation and inpainting apps name a mask
        first = output["outputs"][0]
        result["mask"] = {"url": first["mask_url"], "width": first["width"], "height": first["height"], "content_type": "image/png"}
        result.update({k: first[k] for k in ("boxes", "placement") if k in first})
    return result


# The webhook: fal's body, signed per Standard Webhooks with the key's callback secrets.
def webhook_body(session, run: Run, storage: Storage) -> dict:
    body = {"request_id": run.id, "gateway_request_id": run.id, "status": "OK", "payload": None, "error": None}
    try:
        body["payload"] = _result_or_raise(run, storage)
    except ServiceError as exc:
        body.update(status="ERROR", error=exc.message, payload={"detail": exc.message})
    return body


def webhook_headers(body: bytes, params: RunParams, msg_id: str, timestamp: int, key_secrets: list[str]) -> dict[str, str]:
    headers = callbacks.signature_headers(body, key_secrets, msg_id, timestamp)
    return {k: v for k, v in headers.items() if not k.startswith("Runflow-")}


callbacks.CALLBACK_STYLES[STYLE] = callbacks.CallbackStyle(envelope=webhook_body, headers=webhook_headers)
