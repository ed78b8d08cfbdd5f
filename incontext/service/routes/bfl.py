"""The BFL-style surface: `POST /v1/flux-kontext-pro` → `{id, polling_url}`, then
`GET /v1/get_result?id=` until `Ready` (or `Error`), and an optional signed webhook.

A client written for the hosted BFL API switches by changing its base URL and key. The run
is an ordinary stored run (recorded as model `flux-pro/kontext`), so it also shows in
`GET /v1/runs`; any run of the key can be polled here. Errors are FastAPI-shaped, as the
hosted API's are: `{"detail": "message"}`, and for 422 `{"detail": [{loc, msg, type}]}`.
The workflows are served as `POST /v1/{workflow}` (routes/workflows.py, with WORKFLOW_FIELDS'
names); their get_result adds `boxes` (and `placement`) beside `mask`.

Webhook signing (when `webhook_secret` is given; see docs/other-surfaces.md):
- `X-Webhook-Signature: sha256=<lowercase hex HMAC-SHA256(key=webhook_secret, msg=raw body)>`
- Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
  HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the base64-decoded part after
  `whsec_` if the secret has that form (so Standard Webhooks libraries verify it), else with
  the secret's UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from incontext.imageio import ASPECT_RATIOS
from incontext.service import callbacks, conditional, lifecycle, netpolicy, outputs, store, submission, surfaces
from incontext.service.conditional import IfNoneMatch
from incontext.service.deps import ServiceDep, count_read
from incontext.service.errors import RunNotFound, ValidationFailed, field_error
from incontext.service.models import ApiKey, Run
from incontext.service.schemas import MAX_PROMPT_LENGTH, MAX_SEED, public_output
from incontext.service.storage import Storage
from incontext.service.runparams import RunParams

STYLE = "bfl"
# Our input names → theirs, for error messages.
NAMES = {"image_url": "input_image", "enhance_prompt": "prompt_upsampling", "mask_image_url": "mask"}
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")


def render_error(problem: surfaces.Problem) -> JSONResponse:
    if problem.status == 422 and problem.errors:
        detail: Any = [
            {"loc": e["loc"] if e["loc"][:1] in (["body"], ["query"], ["header"]) else ["body", *e["loc"]], "msg": e["message"], "type": e["code"]}
            for e in problem.errors
        ]
    else:
        detail = problem.message
    return JSONResponse({"detail": detail}, status_code=problem.status, headers=problem.headers)


router = APIRouter(prefix="/v1", tags=["bfl"], route_class=surfaces.route_class(render_error))
BflKeyDep = Annotated[ApiKey, Depends(surfaces.key_from_headers)]


async def read_limit(key: BflKeyDep, service: ServiceDep) -> dict[str, str]:
    return count_read(service, key)


BflReadLimitDep = Annotated[dict[str, str], Depends(read_limit)]


def _public_webhook(value: str | None) -> str | None:
    if value is not None and (reason := netpolicy.url_refusal(value)):
        raise ValueError(f"webhook_url: {reason}")
    return value


class FluxKontextRequest(BaseModel):
    """The body of the hosted `POST /v1/flux-kontext-pro`."""

    model_config = ConfigDict(extra="ignore")

    # input_image required (the hosted API also generates from a prompt alone; this server only
    # edits), prompt bounded as KontextInput bounds it.
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="the edit instruction")
    input_image: str = Field(min_length=1, description="the image to edit: base64 (bare), a data: URI, or an http(s) URL; required here")
    # Blank reads as absent, as it always did here: clients fill unused slots with "".
    input_image_2: str | None = Field(
        None, description="a reference image the prompt may draw on, as input_image takes it, fitted to the output's size; blank: none"
    )
    input_image_3: str | None = Field(None, description="a further reference image, as input_image_2")
    input_image_4: str | None = Field(None, description="a further reference image, as input_image_2")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; reported in result.seed")
    aspect_ratio: str | None = Field(
        None, description="W:H between 21:9 and 9:21, mapped to the nearest of 21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21; default: the input's",
        json_schema_extra={"pattern": _RATIO.pattern},  # the form; the range is in words (no pattern can say it)
    )
    output_format: Literal["jpeg", "png"] = Field("png", description="jpeg or png (jpg is read as jpeg)")
    safety_tolerance: int = Field(2, ge=0, le=6, description="recorded only: this server has no moderation (0 is recorded as 1)")
    prompt_upsampling: bool = Field(False, description="recorded only: this server has no prompt enhancer")
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the get_result body when the run ends")
    webhook_secret: str | None = Field(None, max_length=512, description="signs the webhook; see the X-Webhook-Signature docs")
    preserve: Literal["auto", "off"] = Field(
        "auto",
        description="extension: auto keeps the input's own pixels (at its own size when the aspect ratio is kept) wherever "
        "the edit did not happen; off returns the model's raw output at its working size",
    )
    return_mask: bool = Field(False, description="extension: result.mask (signed URL of the edited region as a PNG) and result.changed_share")
    # The name and meaning of BFL's own fill endpoint (flux-pro-1.0-fill): white is edited.
    mask: str | None = Field(
        None, description="extension (as BFL's fill endpoint names it): where the edit may happen, as input_image takes an "
        "image; white may change, black keeps the input's pixels bit for bit; stretched to input_image's size; blank: none",
    )

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() in ("jpg", "jpeg") else value

    _http = field_validator("webhook_url")(_public_webhook)


# The workflows (routes/workflows.py: POST /v1/object-removal, …): their fields under BFL's
# names where BFL has one (input_image; mask, steps and guidance as its fill endpoint names
# them), the others named as the image they are; the second image is also read as input_image_2,
# where BFL's Kontext takes a second image.
WORKFLOW_FIELDS = {
    "image_url": "input_image", "reference_image_url": "reference_image", "logo_image_url": "logo_image", "mask_image_url": "mask",
    "prompt": "prompt", "seed": "seed", "num_inference_steps": "steps", "guidance_scale": "guidance", "output_format": "output_format",
}
WORKFLOW_ALSO = {"reference_image": ("input_image_2",), "logo_image": ("input_image_2",)}
WORKFLOW_IMAGES = "bare base64, a data: URI or an http(s) URL, as input_image on /v1/flux-kontext-pro"


class WorkflowRequest(BaseModel):
    """What every workflow's BFL body has besides the workflow's fields (routes/workflows.py adds them)."""

    model_config = ConfigDict(extra="ignore")

    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the get_result body when the run ends")
    webhook_secret: str | None = Field(None, max_length=512, description="signs the webhook; see the X-Webhook-Signature docs")

    @model_validator(mode="before")
    @classmethod
    def _blank_mask(cls, values: Any) -> Any:
        # Blank reads as absent, as on /v1/flux-kontext-pro: clients fill unused slots with "".
        if isinstance(values, dict) and isinstance(values.get("mask"), str) and not values["mask"].strip():
            return {k: v for k, v in values.items() if k != "mask"}
        return values

    @field_validator("output_format", mode="before", check_fields=False)
    @classmethod
    def _jpg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() in ("jpg", "jpeg") else value

    _http = field_validator("webhook_url")(_public_webhook)


class Submitted(BaseModel):
    id: str
    polling_url: str


class ResultPublic(BaseModel):
    id: str
    status: Literal["Pending", "Ready", "Error", "Task not found", "Request Moderated", "Content Moderated"] = Field(
        description="never Request Moderated or Content Moderated here: this server does not moderate"
    )
    result: dict[str, Any] | None = Field(
        description="on Ready: sample (signed URL, expires), samples, prompt, seed, start_time, end_time, duration (seconds); "
        "with return_mask also mask (signed URL of the edited region, PNG; null without a change map) and changed_share (0..1)"
    )
    progress: float | None = Field(description="0..1 while running; null while queued")
    details: dict[str, Any] | None = Field(description="on Error: code, message, stage")


def aspect_ratio(value: str | None) -> str | None:
    """W:H (any numbers between 21:9 and 9:21) → the nearest named ratio; named values pass."""
    if value is None or value.strip().lower() in ASPECT_RATIOS:
        return value
    match = _RATIO.match(value)
    if match and float(match[2]) > 0 and float(match[1]) > 0:
        width, height = float(match[1]), float(match[2])
        if surfaces.within_ratio_range(width, height):
            return surfaces.nearest_aspect_ratio(width, height)
    message = "aspect_ratio must be W:H between 21:9 and 9:21"
    raise ValidationFailed(message, errors=[field_error("aspect_ratio", message, "value_error")])


@router.post("/flux-kontext-pro", response_model=Submitted, responses={401: {"description": '`{"detail": "..."}`'}})
async def create_kontext_edit(body: FluxKontextRequest, request: Request, key: BflKeyDep, service: ServiceDep):
    """Queue an edit; poll `polling_url` (with the same key) until `status` is `Ready` or `Error`.
    Key: `x-key` or `Authorization: Bearer`."""
    images, names = reference_images(body)
    item = surfaces.kontext_input(
        {
            "prompt": body.prompt,
            **images,
            "aspect_ratio": aspect_ratio(body.aspect_ratio),
            "output_format": body.output_format,
            "seed": body.seed,
            "safety_tolerance": str(max(1, body.safety_tolerance)),
            "enhance_prompt": body.prompt_upsampling,
            "preserve": body.preserve,
            "return_mask": body.return_mask,
            **({"mask_image_url": surfaces.image_reference(body.mask)} if (body.mask or "").strip() else {}),
        },
        names,
    )
    run_request = submission.RunRequest(
        model_id=surfaces.SURFACE_MODEL_ID, items=[item], surface="POST /v1/flux-kontext-pro", callback=webhook(body), names=names
    )
    return await submitted(run_request, request, key, service)


def webhook(body: FluxKontextRequest | WorkflowRequest) -> submission.Callback | None:
    return submission.Callback(body.webhook_url, style=STYLE, secret=body.webhook_secret) if body.webhook_url else None


async def submitted(run_request: submission.RunRequest, request: Request, key: ApiKey, service) -> JSONResponse:
    """Submit the run and answer as BFL does: `{id, polling_url}`."""
    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id)
    run_id, limits = accepted.runs[0].id, accepted.headers
    polling_url = f"{service.storage.base_url}/v1/get_result?id={run_id}"
    return JSONResponse({"id": run_id, "polling_url": polling_url}, headers=limits)


def reference_images(body: FluxKontextRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """input_image (and input_image_2..4, in number order) as our image fields, and the names
    our errors give them back (image_urls.1 → input_image_3 when input_image_2 is absent)."""
    given = [name for name in ("input_image", "input_image_2", "input_image_3", "input_image_4") if (getattr(body, name) or "").strip()]
    if len(given) == 1:
        return {"image_url": surfaces.image_reference(body.input_image)}, NAMES
    urls = [surfaces.image_reference(getattr(body, name)) for name in given]
    return {"image_urls": urls}, {**NAMES, **{f"image_urls.{i}": name for i, name in enumerate(given)}}


@router.get(
    "/get_result", response_model=ResultPublic,
    responses={404: {"model": ResultPublic, "description": "status `Task not found`"}, **conditional.NOT_MODIFIED},
)
def get_result(
    key: BflKeyDep,
    limits: BflReadLimitDep,
    service: ServiceDep,
    id: Annotated[str, Query(description="the id from the submit answer")],
    if_none_match: IfNoneMatch = None,
):
    """The run's status in BFL terms: queued or running → `Pending`; succeeded → `Ready`;
    failed or canceled → `Error`; unknown (or another key's) → `Task not found` with HTTP 404.
    An `If-None-Match` holding the current ETag gets 304 with no body."""
    with service.read_sessions() as session:
        try:
            run = store.get_run(session, key.id, id)
        except RunNotFound:
            body = {"id": id, "status": "Task not found", "result": None, "progress": None, "details": None}
            return JSONResponse(body, status_code=404, headers=limits)
        body = result_body(run, service.storage, _progress(session, run))
    # Serialised as JSONResponse does, so the ETag is the hash of the bytes sent.
    content = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return conditional.answer(content, if_none_match, headers=limits)


def result_body(run: Run, storage: Storage, progress: float | None = None) -> dict:
    body = {"id": run.id, "status": "Pending", "result": None, "progress": progress, "details": None}
    if run.status == lifecycle.SUCCEEDED:
        # The run's own answer (get_result, its webhook): inline for a sync_mode run's hold.
        output = public_output(run.output, storage, inline=outputs.inline_now(run))
        body.update(status="Ready", progress=1.0, result={
            "sample": output["image_urls"][0] if output["image_urls"] else None,  # None: a legacy sync_mode run's, after its hold
            "samples": output["image_urls"],
            "prompt": RunParams.of(run).prompt,
            "seed": output["outputs"][0]["seed"],
            "start_time": run.started_at.timestamp() if run.started_at else None,
            "end_time": run.completed_at.timestamp(),
            "duration": (run.completed_at - run.started_at).total_seconds() if run.started_at else None,
        })
        params, first = RunParams.of(run), output["outputs"][0]
        if params.return_mask:  # our extension: only for clients that asked for it (a workflow always does)
            body["result"].update(mask=first["mask_url"], changed_share=first["changed_share"])
        if params.workflow:  # what a workflow promises beside its mask
            body["result"].update({k: first[k] for k in ("boxes", "placement") if k in first})
    elif run.status == lifecycle.CANCELED:
        body.update(status="Error", details={"code": "CANCELED", "message": "the run was canceled", "stage": None})
    elif run.status == lifecycle.FAILED:
        body.update(status="Error", details={"code": run.failure_code, "message": run.failure_message, "stage": run.failure_stage_code})
    return body


def _progress(session, run: Run) -> float | None:
    if run.status != lifecycle.RUNNING:
        return None
    steps = [log.meta for log in store.run_logs(session, run.id) if log.meta and "step" in log.meta]
    return round(steps[-1]["step"] / steps[-1]["total_steps"], 3) if steps else 0.0


# The webhook: the get_result body of the ended run, signed with the request's webhook_secret.
def webhook_headers(body: bytes, params: RunParams, msg_id: str, timestamp: int, key_secrets: list[str]) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    secret = params.webhook_secret
    if secret:
        headers["X-Webhook-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        signed = f"{msg_id}.{timestamp}.".encode() + body
        headers["webhook-signature"] = "v1," + base64.b64encode(hmac.new(_standard_key(secret), signed, hashlib.sha256).digest()).decode()
    return headers


def _standard_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


callbacks.CALLBACK_STYLES[STYLE] = callbacks.CallbackStyle(envelope=lambda session, run, storage: result_body(run, storage), headers=webhook_headers)
