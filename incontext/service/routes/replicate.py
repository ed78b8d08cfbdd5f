"""The Replicate-style surface, as the `replicate` Python client speaks it:

    POST /v1/models/{owner}/{name}/predictions   {input, webhook, webhook_events_filter}
         (`Prefer: wait` or `wait=N`: answer when done, or after N ≤ 60 s as it is then)
    POST /v1/predictions   {version, input, …}   (a version of GET …/versions, or a model id)
    GET  /v1/models/{owner}/{name}/versions[/{id}]   (one version per model of this server)
    GET  /v1/predictions/{id}   POST /v1/predictions/{id}/cancel   GET /v1/predictions
    GET  /v1/webhooks/default/secret   (the key's newest callback secret, made if none)

A prediction is an ordinary stored run (listed by GET /v1/runs, priced, rate-limited); any run
of the key can be read here. Kontext's Replicate inputs map onto ours: input_image → image_url
(or input_images, FLUX.2's list there, → image_urls: the edited image, then references),
prompt_upsampling → enhance_prompt, safety_tolerance 0–6 (0 recorded as 1), output_format
jpg|png (png by default, as there). `output` is one URL string, as for Kontext there.
The workflows are models `incontext/{workflow}` (routes/workflows.py, with WORKFLOW_FIELDS'
names), their `output` an object `{image, mask, boxes}` (and `placement`).
Statuses: queued/dispatching → starting, running → processing. `logs` is the run's log as
text, steps written as tqdm lines, so `prediction.progress` parses them.

Errors are Replicate's problem details: `{title, detail, status}` (+ `invalid_fields` for 422).
Webhooks POST the prediction as it is at each event, signed per Standard Webhooks with the
key's callback secrets (`webhook-id`, `webhook-timestamp`, `webhook-signature`), so
`replicate.webhooks.validate` verifies them with the secret from GET /v1/webhooks/default/secret.
Events, as Replicate sends them: `start` (created), `logs` (step lines written, at most every
0.5 s), `output` (the image stored, just before the end), `completed` (succeeded, failed or
canceled). No `webhook_events_filter` means all four; a filter sends only the events it lists.
`webhook_completed` (the client's older field) is a URL for `completed` alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from incontext.engine.protocol import MAX_IMAGES
from incontext.service import callbacks, lifecycle, netpolicy, outputs, store, submission, surfaces
from incontext.service.deps import Service, ServiceDep, count_read
from incontext.models.registry import ModelPreset, Registry
from incontext.service.errors import Conflict, NotFound, ValidationFailed, field_error
from incontext.service.models import ApiKey, Run
from incontext.service.runparams import RunParams
from incontext.service.schemas import IMAGE_LIST_SCHEMA, MAX_PROMPT_LENGTH, MAX_SEED, CallbackUrl, ImageList, one_of_images, public_output
from incontext.service.storage import Storage

STYLE = "replicate"
NAMES = {
    "image_url": "input_image", "image_urls": "input_images", **{f"image_urls.{i}": f"input_images.{i}" for i in range(MAX_IMAGES)},
    "enhance_prompt": "prompt_upsampling", "mask_image_url": "mask",
}
MAX_WAIT_S = 60  # Replicate's own cap on Prefer: wait
POLL_S = 0.2
_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$", re.IGNORECASE)
STATUSES = {
    lifecycle.QUEUED: "starting", lifecycle.DISPATCHING: "starting", lifecycle.RUNNING: "processing",
    lifecycle.SUCCEEDED: "succeeded", lifecycle.FAILED: "failed", lifecycle.CANCELED: "canceled",
}
EVENTS = ("start", "output", "logs", "completed")


def render_error(problem: surfaces.Problem) -> JSONResponse:
    body: dict[str, Any] = {"title": problem.code.replace("_", " ").capitalize(), "detail": problem.message, "status": problem.status}
    if problem.errors:
        body["invalid_fields"] = [{"type": e["code"], "field": e["field"], "description": e["message"]} for e in problem.errors]
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type="application/problem+json")


router = APIRouter(prefix="/v1", tags=["replicate"], route_class=surfaces.route_class(render_error))
ReplicateKeyDep = Annotated[ApiKey, Depends(surfaces.key_from_headers)]


class KontextPredictionInput(BaseModel):
    """Replicate's inputs of black-forest-labs/flux-kontext-pro."""

    # One of input_image and input_images (FLUX.2's list on Replicate), as the route takes them.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [{"required": ["input_image"]}, {"required": ["input_images"]}]})

    @model_validator(mode="before")
    @classmethod
    def _one_of_images(cls, values: Any) -> Any:
        return one_of_images(values, "input_image", "input_images")

    # An image required (Replicate's model also generates from a prompt alone; this server
    # only edits), prompt bounded as KontextInput bounds it.
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="the edit instruction")
    input_image: Annotated[str | None, WithJsonSchema({"type": "string", "minLength": 1})] = Field(
        None, min_length=1, description="the image to edit: http(s) URL or data: URI; or send input_images"
    )
    input_images: Annotated[ImageList | None, WithJsonSchema(IMAGE_LIST_SCHEMA)] = Field(
        None, description=f"instead of input_image, 1–{MAX_IMAGES} images: the first is edited and decides the output's size, "
        "the others are references the prompt may draw on, fitted to that size",
    )
    aspect_ratio: str = Field("match_input_image", description="match_input_image, or 21:9 … 9:21")
    output_format: Literal["jpg", "jpeg", "png"] = "png"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    safety_tolerance: int = Field(2, ge=0, le=6, description="recorded only: this server has no moderation (0 is recorded as 1)")
    prompt_upsampling: bool = Field(False, description="recorded only: this server has no prompt enhancer")
    # The name and meaning of Replicate's flux-fill-pro input: white is inpainted, black kept.
    mask: str | None = Field(
        None, min_length=1, description="extension (as black-forest-labs/flux-fill-pro names it): where the edit may happen, "
        "http(s) URL or data: URI; white may change, black keeps the input's pixels bit for bit; stretched to the image's size",
    )


# The workflows (routes/workflows.py: POST /v1/models/incontext/object-removal/predictions, …),
# under this server's owner as its own model is (incontext/nano). Their fields under Replicate's
# names where its Kontext and FLUX models have one (input_image; mask as flux-fill-pro names it,
# guidance as flux-kontext-dev does), the others named as the image they are.
WORKFLOW_OWNER = "incontext"
WORKFLOW_FIELDS = {
    "image_url": "input_image", "reference_image_url": "reference_image", "logo_image_url": "logo_image", "mask_image_url": "mask",
    "prompt": "prompt", "seed": "seed", "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance",
    "output_format": "output_format",
}
WORKFLOW_IMAGES = "http(s) URL or data: URI, as input_image on black-forest-labs/flux-kontext-pro"


class WorkflowPredictionInput(BaseModel):
    """What every workflow's Replicate input has besides the workflow's fields (routes/workflows.py adds them)."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("output_format", mode="before", check_fields=False)
    @classmethod
    def _jpg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() in ("jpg", "jpeg") else value


class PredictionCreate(BaseModel):
    # The document asks for one of webhook and webhook_completed: callback() refuses two
    # different URLs, and a schema cannot say "the same URL if both".
    model_config = ConfigDict(extra="ignore", json_schema_extra={"not": {"required": ["webhook", "webhook_completed"]}})

    input: KontextPredictionInput
    webhook: CallbackUrl | None = Field(None, max_length=2048)
    webhook_completed: CallbackUrl | None = Field(None, max_length=2048, description="older field: a URL told of `completed` only")
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = Field(
        None, description="the events POSTed to `webhook`; all four when absent"
    )

    @field_validator("webhook", "webhook_completed")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and (reason := netpolicy.url_refusal(value)):
            raise ValueError(f"webhook: {reason}")
        return value

    def callback(self) -> submission.Callback | None:
        """Where the prediction's events go. A run has one callback URL: `webhook_completed`
        beside a different `webhook` is refused rather than half ignored."""
        if self.webhook and self.webhook_completed and self.webhook_completed != self.webhook:
            message = "webhook_completed differs from webhook: this server sends a prediction's events to one URL"
            raise ValidationFailed(message, errors=[field_error("webhook_completed", message, "value_error")])
        if self.webhook:
            events = list(EVENTS) if self.webhook_events_filter is None else list(dict.fromkeys(self.webhook_events_filter))
            return submission.Callback(self.webhook, style=STYLE, events=events)
        if self.webhook_completed:
            return submission.Callback(self.webhook_completed, style=STYLE, events=["completed"])
        return None


class VersionedPredictionCreate(PredictionCreate):
    version: str = Field(description="a version id from GET /v1/models/{owner}/{name}/versions, owner/name:version, or a model id")


PreferWait = Annotated[str | None, Header(description="wait, or wait=N (seconds, at most 60): answer when done")]


@router.post("/models/{owner}/{name}/predictions", status_code=201)
async def create_prediction(
    owner: str, name: str, body: PredictionCreate, request: Request, key: ReplicateKeyDep, service: ServiceDep, prefer: PreferWait = None,
):
    """Create a prediction of `owner/name` (black-forest-labs/flux-kontext-pro, or any model id of this server)."""
    return await _create(f"{owner}/{name}", body, request, key, service, prefer)


@router.post("/predictions", status_code=201)
async def create_versioned_prediction(
    body: VersionedPredictionCreate, request: Request, key: ReplicateKeyDep, service: ServiceDep, prefer: PreferWait = None,
):
    """Create a prediction of a model version (what `replicate.run("owner/name:version")` sends)."""
    return await _create(_model_of_version(service, body.version), body, request, key, service, prefer)


@router.get("/models/{owner}/{name}/versions")
def list_versions(owner: str, name: str, key: ReplicateKeyDep, service: ServiceDep):
    """The model's one version here: `{previous, next, results}`."""
    return {"previous": None, "next": None, "results": [version_body(service.registry.registered(f"{owner}/{name}"))]}


@router.get("/models/{owner}/{name}/versions/{version_id}")
def get_version(owner: str, name: str, version_id: str, key: ReplicateKeyDep, service: ServiceDep):
    preset = service.registry.registered(f"{owner}/{name}")
    if version_id != version_of(preset):
        raise NotFound(f"model {owner}/{name} has no version {version_id}; its version is {version_of(preset)}")
    return version_body(preset)


async def _create(model_id: str, body: PredictionCreate, request: Request, key: ApiKey, service, prefer: str | None) -> JSONResponse:
    given = body.input
    item = surfaces.kontext_input(
        {
            "prompt": given.prompt, **({"image_url": given.input_image} if given.input_images is None else {"image_urls": given.input_images}),
            "aspect_ratio": given.aspect_ratio, "output_format": given.output_format,
            "seed": given.seed, "safety_tolerance": max(1, given.safety_tolerance), "enhance_prompt": given.prompt_upsampling,
            **({"mask_image_url": given.mask} if given.mask is not None else {}),
        },
        NAMES,
    )
    surface = f"POST /v1/models/{model_id}/predictions" if not isinstance(body, VersionedPredictionCreate) else "POST /v1/predictions"
    run_request = submission.RunRequest(model_id=model_id, items=[item], surface=surface, callback=body.callback(), names=NAMES)
    return await answer(run_request, request, key, service, prefer)


async def answer(run_request: submission.RunRequest, request: Request, key: ApiKey, service, prefer: str | None) -> JSONResponse:
    """Submit the prediction and answer with it (201), when done if `prefer` says wait."""
    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id)
    run = accepted.runs[0]
    if (wait := _wait_seconds(prefer)) is not None:
        run = await _wait(service, run.id, wait)
    body_out = await run_in_threadpool(_prediction_with_logs, service, run)
    return JSONResponse(body_out, status_code=201, headers={**accepted.headers, "Location": body_out["urls"]["get"]})


@router.get("/predictions")
def list_predictions(key: ReplicateKeyDep, service: ServiceDep, cursor: Annotated[str | None, Query()] = None):
    """The key's runs, newest first: `{previous, next, results}`; `next` is a URL to GET."""
    count_read(service, key)
    with service.read_sessions() as session:
        rows, next_cursor = store.list_runs(session, key.id, limit=100, cursor=cursor)
        results = [prediction(r, service.storage) for r in rows]
    base = f"{service.storage.base_url}/v1/predictions"
    return {"previous": None, "next": f"{base}?cursor={next_cursor}" if next_cursor else None, "results": results}


@router.get("/predictions/{prediction_id}")
def get_prediction(prediction_id: str, key: ReplicateKeyDep, service: ServiceDep):
    headers = count_read(service, key)
    with service.read_sessions() as session:
        run = store.get_run(session, key.id, prediction_id)
        body = prediction(run, service.storage, logs=store.run_logs(session, run.id), synchronous=True)
    return JSONResponse(body, headers=headers)


@router.post("/predictions/{prediction_id}/cancel")
def cancel_prediction(prediction_id: str, key: ReplicateKeyDep, service: ServiceDep):
    """Cancel; a prediction that already ended is answered as it is, as Replicate does."""
    with service.read_sessions() as session:
        store.get_run(session, key.id, prediction_id)
    try:
        submission.cancel(service, prediction_id, "cancel requested through POST /v1/predictions/{id}/cancel")
    except Conflict:
        pass
    return _prediction_with_logs(service, surfaces.load_run(service, prediction_id))


@router.get("/webhooks/default/secret")
def default_webhook_secret(key: ReplicateKeyDep, service: ServiceDep):
    """`{key}`: the newest callback secret of the API key (one is made if it has none): the
    secret webhooks are signed with, for `replicate.webhooks.validate`."""
    with service.sessions() as session:
        secrets = callbacks.signing_secrets(session, key.id)
        if secrets:
            return {"key": secrets[0]}
        _, plain = callbacks.create_secret(session, key.id, "replicate default")
        session.commit()
    return {"key": plain}


# Versions: one per model of this server, its id a digest of the model's id (64 hex
# characters, as Replicate's are), so `owner/name:version` references stay stable.
def version_of(preset: ModelPreset) -> str:
    return hashlib.sha256(f"incontext:{preset.id}".encode()).hexdigest()


def version_references(registry: Registry) -> list[str]:
    """Every `version` _model_of_version maps (model ids as registered, without stray '/'),
    for the OpenAPI document."""
    references = []
    for preset in registry.models.values():
        version = version_of(preset)
        references += [version, *(f"{name}:{version}" for name in (preset.id, *preset.aliases))]
    return references + registry.ids()


def _model_of_version(service: Service, version: str) -> str:
    """The model id a `version` names: one of version_of's ids, `owner/name:id`, or a model
    id or alias. Refused with 422 on `version` otherwise."""
    name, _, version_id = version.rpartition(":") if ":" in version else ("", "", version)
    for preset in service.registry.models.values():
        if version_id == version_of(preset) and (not name or name in (preset.id, *preset.aliases)):
            return name or preset.run_model_id
    if not name and version_id.strip("/") in service.registry.ids():
        return version_id
    message = (
        f"version {version!r} is not a model version of this server; use the id from "
        "GET /v1/models/{owner}/{name}/versions, or create with POST /v1/models/{owner}/{name}/predictions"
    )
    raise ValidationFailed(message, errors=[field_error("version", message, "invalid_version")])


def version_body(preset: ModelPreset) -> dict:
    schema = {
        "openapi": "3.0.2",
        "info": {"title": preset.id, "version": "incontext"},
        "components": {"schemas": {"Input": KontextPredictionInput.model_json_schema(), "Output": {"type": "string", "format": "uri"}}},
    }
    made = (preset.directory / "model_index.json").stat().st_mtime  # when the weights were written
    created = datetime.fromtimestamp(made, UTC).isoformat()
    return {"id": version_of(preset), "created_at": created, "cog_version": "incontext", "openapi_schema": schema}


# Rendering.
def prediction(run: Run, storage: Storage, logs: list | None = None, *, synchronous: bool = False) -> dict:
    """`synchronous`: the prediction's own answer (its GET, a waited create, its webhook); a
    sync_mode run's images are data URIs there for a while after it ends (outputs.inline_now)."""
    params = RunParams.of(run)
    base = f"{storage.base_url}/v1/predictions/{run.id}"
    output = error = None
    if run.status == lifecycle.SUCCEEDED:
        public = public_output(run.output, storage, inline=synchronous and outputs.inline_now(run))
        urls = public["image_urls"]
        output = urls[0] if len(urls) == 1 else urls  # Kontext there: one URI
        if params.workflow:  # several results: an object, as a Replicate model's output with named parts is
            first = public["outputs"][0]
            output = {"image": first["url"], "mask": first["mask_url"], **{k: first[k] for k in ("boxes", "placement") if k in first}}
    elif run.status == lifecycle.FAILED:
        error = f"{run.failure_code}: {run.failure_message}"
    metrics = {}
    if run.started_at and run.completed_at:
        metrics["predict_time"] = (run.completed_at - run.started_at).total_seconds()
    if run.status == lifecycle.SUCCEEDED:
        metrics["image_count"] = len(run.output["outputs"])
    return {
        "id": run.id,
        "model": params.requested_model_id or run.model_id,  # as the client named it
        "version": hashlib.sha256(f"incontext:{run.engine_model_id}".encode()).hexdigest(),
        "input": _replicate_input(run.input, params),
        "output": output,
        "logs": _logs_text(logs or []),
        "error": error,
        "status": STATUSES[run.status],
        "source": "api",
        "data_removed": False,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "completed_at": run.completed_at.isoformat() if run.completed_at else None,
        "metrics": metrics,
        "urls": {"get": base, "cancel": f"{base}/cancel"},
    }


def _replicate_input(echo: dict, params: RunParams) -> dict:
    if params.workflow:
        reverse = WORKFLOW_FIELDS
    else:
        reverse = {ours: theirs for theirs, ours in {"input_image": "image_url", "input_images": "image_urls", "prompt_upsampling": "enhance_prompt"}.items()}
    return {reverse.get(k, k): v for k, v in echo.items()}


def _logs_text(logs: list) -> str:
    """The run's log as text; steps as tqdm lines (` 50%|█████     | 4/8`), as Replicate's
    models print them, so the client's `Prediction.progress` reads them."""
    lines = []
    for entry in logs:
        meta = entry.meta or {}
        if "step" in meta and meta.get("total_steps"):
            done, total = meta["step"], meta["total_steps"]
            filled = int(10 * done / total)
            lines.append(f"{int(100 * done / total):3d}%|{'█' * filled}{' ' * (10 - filled)}| {done}/{total}")
        else:
            lines.append(entry.message)
    return "\n".join(lines)


def _prediction_with_logs(service, run: Run) -> dict:
    with service.read_sessions() as session:
        return prediction(run, service.storage, logs=store.run_logs(session, run.id), synchronous=True)


def _wait_seconds(prefer: str | None) -> float | None:
    match = _WAIT.match(prefer or "")
    if not match:
        return None
    return min(int(match[1]), MAX_WAIT_S) if match[1] else MAX_WAIT_S


async def _wait(service, run_id: str, seconds: float) -> Run:
    """The run once it ends, or as it is after `seconds` (the client then polls urls.get)."""
    deadline = time.monotonic() + seconds
    while True:
        run = await run_in_threadpool(surfaces.load_run, service, run_id)
        if run.status in lifecycle.TERMINAL or time.monotonic() >= deadline:
            return run
        await asyncio.sleep(POLL_S)


# The webhook: the prediction at the event, signed per Standard Webhooks with the key's callback secrets.
def webhook_body(session, run: Run, storage: Storage) -> dict:
    return prediction(run, storage, logs=store.run_logs(session, run.id), synchronous=True)


def webhook_headers(body: bytes, params: RunParams, msg_id: str, timestamp: int, key_secrets: list[str]) -> dict[str, str]:
    headers = callbacks.signature_headers(body, key_secrets, msg_id, timestamp)
    return {k: v for k, v in headers.items() if not k.startswith("Runflow-")}


callbacks.CALLBACK_STYLES[STYLE] = callbacks.CallbackStyle(
    envelope=webhook_body, headers=webhook_headers, wanted=lambda params, event: event in (params.webhook_events if params.webhook_events is not None else EVENTS)
)
