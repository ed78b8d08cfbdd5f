"""What clients send and see: one schema family per resource (RunCreate → RunPublic, …).

Rows never leave the service as they are; `*.from_row` picks the public fields, renders
costs as decimal strings and signs output URLs afresh on every read.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, WithJsonSchema, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from incontext.engine.protocol import MAX_IMAGES
from incontext.service import netpolicy, outputs
from incontext.service.errors import NotFound
from incontext.service.models import Batch, Run, RunLog
from incontext.service.storage import Storage

# ISO 8601 with "+00:00" (as in callbacks), not pydantic's "Z": one spelling everywhere.
Timestamp = Annotated[datetime, PlainSerializer(lambda d: d.isoformat(), return_type=str, when_used="json")]

MAX_SEED = 2**62  # seeds of one run are seed..seed+3; keep them inside a signed 64-bit int
MAX_PROMPT_LENGTH = 4000  # characters; every surface's prompt is bounded the same


def _tolerance(value: Any) -> Any:
    # Hosted docs say "1".."6" (a string); clients written against the BFL API send an int.
    if isinstance(value, float) and value.is_integer():  # JSON's 2.0 is the integer 2 (and so says JSON Schema)
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or value not in {"1", "2", "3", "4", "5", "6"}:  # a list or dict is no tolerance
        raise ValueError('safety_tolerance must be one of "1".."6"')
    return value


# What _tolerance takes, for the OpenAPI document (a plain "string" let clients send "7").
TOLERANCE_SCHEMA = {
    "anyOf": [{"type": "string", "enum": ["1", "2", "3", "4", "5", "6"]}, {"type": "integer", "minimum": 1, "maximum": 6}],
    "description": 'recorded only; "1".."6" as the hosted API spells it, or the integer',
}


def _output_format(value: Any) -> Any:
    return "jpeg" if isinstance(value, str) and value.lower() in ("jpg", "jpeg") else value


def _at_most_max_images(value: list[str]) -> list[str]:
    # A custom error type rather than pydantic's generic too_long: every surface refuses a
    # fifth image with the same code, whichever field carried it.
    if len(value) > MAX_IMAGES:
        raise PydanticCustomError(
            "too_many_images", "at most {limit} images per request, the edited one included; {count} were sent",
            {"limit": MAX_IMAGES, "count": len(value)},
        )
    return value


IMAGE_LIST_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_IMAGES}
# Several images: the first is edited and decides the output's size, the rest are references.
ImageList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), AfterValidator(_at_most_max_images), WithJsonSchema(IMAGE_LIST_SCHEMA)]


def one_of_images(values: Any, single: str, several: str) -> Any:
    """Exactly one of `single` (one image) and `several` (the images, first edited): both, or
    neither, is a 422 naming the field, as pydantic names a missing one."""
    if not isinstance(values, dict):
        return values
    has_single, has_several = values.get(single) is not None, values.get(several) is not None
    if has_single and has_several:
        error = PydanticCustomError("images_twice", "send {single} or {several}, not both", {"single": single, "several": several})
        raise ValidationError.from_exception_data("input", [InitErrorDetails(type=error, loc=(several,), input=values)])
    if not has_single and not has_several:
        raise ValidationError.from_exception_data("input", [InitErrorDetails(type="missing", loc=(single,), input=values)])
    return values


# Fields of the request body, not of `input`: sent inside it they would be ignored silently
# (no callback ever comes), so they are refused with a message saying where they belong.
_MISPLACED = ("callback_url", "metadata", "webhook_url", "webhook")


class KontextInput(BaseModel):
    """The `input` of flux-pro/kontext (and every model this server serves)."""

    # Unknown fields are ignored, as hosted APIs do, so clients sending extra options still work.
    # One of image_url and image_urls, as the routes take them (one_of_images).
    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [{"required": ["image_url"]}, {"required": ["image_urls"]}]})

    @model_validator(mode="before")
    @classmethod
    def _misplaced(cls, values: Any) -> Any:
        if isinstance(values, dict) and (found := [k for k in _MISPLACED if k in values]):
            raise ValueError(f"{found[0]} belongs at the top level of the body, beside input, not inside it")
        return one_of_images(values, "image_url", "image_urls")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="the edit instruction")
    # Absent rather than null in the document: null reads as absent, and then image_urls is required.
    image_url: Annotated[str | None, WithJsonSchema({"type": "string", "minLength": 1})] = Field(
        None, min_length=1, description="the image to edit: http(s) URL, data: URI, or an output URL of this server; or send image_urls"
    )
    image_urls: Annotated[ImageList | None, WithJsonSchema(IMAGE_LIST_SCHEMA)] = Field(
        None, description=f"instead of image_url, 1–{MAX_IMAGES} images as image_url takes them: the first is edited and "
        "decides the output's size, the others are references the prompt may draw on, fitted to that size",
    )
    aspect_ratio: str | None = Field(None, description="21:9 … 9:21 or match_input_image; default: the input's")
    num_images: int = Field(1, ge=1, le=4)
    guidance_scale: float = Field(3.5, ge=1, le=20)
    output_format: Annotated[Literal["jpeg", "png"], BeforeValidator(_output_format)] = "jpeg"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; reported in the output")
    safety_tolerance: Annotated[str, BeforeValidator(_tolerance), WithJsonSchema(TOLERANCE_SCHEMA)] = "2"
    enhance_prompt: bool = False
    sync_mode: bool = Field(False, description="the run's own answer carries its images as data URIs; listings give URLs")
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="default: the model's")
    # The modes of incontext.preserve.MODES, spelled out for the OpenAPI schema (a test compares them).
    preserve: Literal["auto", "off"] = Field(
        "auto",
        description="auto: the input's own pixels wherever the edit did not happen, at the input's size when the output "
        "keeps its aspect ratio; off: the model's raw output at its working size",
    )
    return_mask: bool = Field(False, description="also return the edited region as a PNG (outputs[].mask_url)")
    # mask_url too: fal's inpainting apps name it so, and fal clients send this very model.
    mask_image_url: str | None = Field(
        None, min_length=1, validation_alias=AliasChoices("mask_image_url", "mask_url"),
        description="where the edit may happen, as image_url takes an image: white may change, black keeps the input's "
        "pixels bit for bit (whatever preserve says), stretched to the edited image's size; also read as mask_url",
    )

    @property
    def images(self) -> list[str]:
        """Every image, the edited one first."""
        return list(self.image_urls) if self.image_urls is not None else [self.image_url]


_PORT = r"(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|\d{1,4})"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The URLs _check_callback_url takes, as near as a pattern gets (a little stricter: no user
# info, ASCII host names), so a client built from the OpenAPI document sends only URLs we take.
CALLBACK_URL_SCHEMA = {
    "type": "string",
    "format": "uri",
    "maxLength": 2048,
    "pattern": rf"^https?://(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::{_PORT})?(?:[/?#]\S*)?$",
}
CallbackUrl = Annotated[str, WithJsonSchema(CALLBACK_URL_SCHEMA)]


def _check_callback_url(value: str | None) -> str | None:
    # The sender's own check (netpolicy.url_refusal): a URL accepted here is one it can parse.
    if value is not None and (reason := netpolicy.url_refusal(value)):
        raise ValueError(f"callback_url: {reason}")
    return value


MAX_METADATA_BYTES = 16 * 1024  # as compact JSON: it is stored and echoed in every read, list and callback


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value, separators=(",", ":"), default=str)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES:,} bytes as JSON")
    return value


Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata), Field(description=f"returned untouched; at most {MAX_METADATA_BYTES:,} bytes as JSON")]


class RunCreate(BaseModel):
    input: KontextInput
    metadata: Metadata = None
    callback_url: CallbackUrl | None = Field(None, max_length=2048)
    client_ref: str | None = Field(None, max_length=255)

    _callback = field_validator("callback_url")(_check_callback_url)


class BatchItem(KontextInput):
    client_ref: str | None = Field(None, max_length=255)


class BatchCreate(BaseModel):
    input: list[BatchItem] = Field(min_length=1, max_length=100)
    metadata: Metadata = None
    callback_url: CallbackUrl | None = Field(None, max_length=2048)

    _callback = field_validator("callback_url")(_check_callback_url)


def format_cost(micros: int) -> str:
    """Millionths of a dollar → a decimal string with at least two places ("0.04", "0.00")."""
    value = Decimal(micros).scaleb(-6)
    cents = value.quantize(Decimal("0.01"))
    return f"{cents:f}" if cents == value else f"{value.normalize():f}"


def public_output(output: dict | None, storage: Storage, *, inline: bool = False) -> dict | None:
    """The stored output with URLs signed now: `outputs[]` and `image_urls[]` (images only).

    Each output: `url`, `content_type`, `width`, `height`, `seed`, `changed_share` (null when
    unknown: an engine without change maps, a run stored before preservation) and `mask_url`
    (null unless the run asked for `return_mask`). `inline`: the files as data URIs instead
    (the synchronous answer of a sync_mode run, outputs.inline_now)."""
    if output is None:
        return None

    def url(item: dict, file: str, legacy: str) -> str | None:
        if item.get(file):
            return outputs.data_uri(storage, item[file]) if inline else storage.signed_url(item[file])
        # Runs stored before sync_mode outputs were files held the data URI itself, and no file.
        return item.get(legacy) if inline else None

    items = []
    for item in output["outputs"]:
        items.append({
            "type": "image", "url": url(item, "file", "data_uri"), **{k: item[k] for k in ("content_type", "width", "height", "seed")},
            "changed_share": item.get("changed_share"), "mask_url": url(item, "mask_file", "mask_data_uri"),
            # A workflow's results (incontext/workflows.py): boxes, and logo-placement's placement.
            **{k: item[k] for k in ("boxes", "placement") if k in item},
        })
    extra = {k: v for k, v in output.items() if k != "outputs"}
    return {"outputs": items, "image_urls": [i["url"] for i in items if i["url"] is not None], **extra}


class RunPublic(BaseModel):
    id: str
    model_id: str
    status_code: str
    input: dict[str, Any]
    output: dict[str, Any] | None = Field(
        description="on succeeded: outputs[] ({type, url, content_type, width, height, seed, changed_share, mask_url}; "
        "a workflow's also boxes [[x0, y0, x1, y1], …] and, for logo-placement, placement [x0, y0, x1, y1]), "
        "image_urls[] (the images' urls), seed, num_inference_steps, timings_ms"
    )
    duration_ms: int | None
    cost: str
    cost_breakdown: dict[str, Any] = Field(
        description="an object: currency, unit (image), quantity (images billed), unit_price and total (decimal strings)"
    )
    client_ref: str | None
    batch_id: str | None
    parent_run_id: str | None
    request_id: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    callback_url: str | None
    metadata: dict[str, Any] | None
    has_logs: bool
    links: dict[str, str]
    failure_code: str | None
    failure_message: str | None
    failure_stage_code: str | None

    @classmethod
    def from_row(cls, run: Run, storage: Storage, *, synchronous: bool = False) -> RunPublic:
        """`synchronous`: the run's own answer (its GET, its callback), which carries a
        sync_mode run's images as data URIs for a while after it ends; listings do not."""
        duration = None
        if run.started_at and run.completed_at:
            duration = int((run.completed_at - run.started_at).total_seconds() * 1000)
        # An object, as Runflow publishes it; failed and canceled runs bill nothing.
        unit = (run.params or {}).get("unit_price_micros", 0)
        breakdown = {
            "currency": "USD", "unit": "image", "quantity": run.cost_micros // unit if unit else 0,
            "unit_price": format_cost(unit), "total": format_cost(run.cost_micros),
        }
        base = f"{storage.base_url}/v1/runs/{run.id}"
        links = {"self": base, "logs": f"{base}/logs", "cancel": f"{base}/cancel", "callback": f"{base}/callback"}
        if run.batch_id:
            links["batch"] = f"{storage.base_url}/v1/batches/{run.batch_id}"
        return cls(
            id=run.id,
            model_id=run.model_id,
            status_code=run.status,
            input=run.input,
            output=public_output(run.output, storage, inline=synchronous and outputs.inline_now(run)),
            duration_ms=duration,
            cost=format_cost(run.cost_micros),
            cost_breakdown=breakdown,
            client_ref=run.client_ref,
            batch_id=run.batch_id,
            parent_run_id=run.parent_run_id,
            request_id=run.request_id,
            created_at=run.created_at,
            started_at=run.started_at,
            completed_at=run.completed_at,
            callback_url=run.callback_url,
            metadata=run.meta,
            has_logs=True,  # every run logs "accepted" in the transaction that creates it
            links=links,
            failure_code=run.failure_code,
            failure_message=run.failure_message,
            failure_stage_code=run.failure_stage_code,
        )


def source_url(run: Run, storage: Storage) -> str | None:
    """The image a run edited, while it can still be shown: a fresh URL of the parent's output,
    else of the run's stored input (kept as long as its outputs), else the http(s) URL it was
    given. None once retention has deleted the files."""
    given = run.input or {}
    url = given.get("image_url") or (given.get("image_urls") or [""])[0]
    own = storage.own_output(url)
    if own:
        try:
            storage.output_path(own[1])
            return storage.signed_url(own[1])
        except NotFound:
            pass
    if input_url := storage.input_url(run.id):
        return input_url
    return url if not own and url.startswith(("http://", "https://")) else None


class LineageItem(BaseModel):
    """One turn of an edit tree: enough to draw it and to continue from any output."""

    id: str
    parent_run_id: str | None
    model_id: str
    status_code: str
    prompt: str | None
    input: dict[str, Any]
    source_url: str | None = Field(description="the image this run edited (see runs-api.md); null once its files are deleted")
    output: dict[str, Any] | None = Field(description="as on the run: outputs[], image_urls[], seed, timings_ms")
    duration_ms: int | None
    cost: str
    created_at: Timestamp
    failure_code: str | None
    failure_message: str | None

    @classmethod
    def from_row(cls, run: Run, storage: Storage) -> LineageItem:
        public = RunPublic.from_row(run, storage)
        return cls(
            id=run.id, parent_run_id=run.parent_run_id, model_id=run.model_id, status_code=run.status,
            prompt=(run.input or {}).get("prompt"), input=run.input, source_url=source_url(run, storage),
            output=public.output, duration_ms=public.duration_ms, cost=public.cost, created_at=run.created_at,
            failure_code=run.failure_code, failure_message=run.failure_message,
        )


class Lineage(BaseModel):
    run_id: str
    root_id: str
    path: list[str] = Field(description="run ids from the root down to run_id")
    items: list[LineageItem] = Field(description="every run of the tree (parents and children), oldest first")
    truncated: bool = Field(description="the tree has more runs than one answer holds (500)")


class RunList(BaseModel):
    items: list[RunPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class StatusPublic(BaseModel):
    code: str
    terminal: bool
    description: str


class StatusList(BaseModel):
    items: list[StatusPublic]


class LogPublic(BaseModel):
    id: str
    run_id: str
    level_code: str
    message: str
    timestamp: Timestamp
    meta: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: RunLog) -> LogPublic:
        return cls(id=row.id, run_id=row.run_id, level_code=row.level_code, message=row.message, timestamp=row.timestamp, meta=row.meta)


class LogList(BaseModel):
    items: list[LogPublic]


class BatchPublic(BaseModel):
    id: str
    model_id: str
    status_code: str
    counts: dict[str, int]
    cost: str
    metadata: dict[str, Any] | None
    callback_url: str | None
    created_at: Timestamp
    completed_at: Timestamp | None
    links: dict[str, str]

    @classmethod
    def from_row(cls, batch: Batch, status: str, counts: dict[str, int], cost_micros: int, storage: Storage) -> BatchPublic:
        base = f"{storage.base_url}/v1/batches/{batch.id}"
        return cls(
            id=batch.id,
            model_id=batch.model_id,
            status_code=status,
            counts=counts,
            cost=format_cost(cost_micros),
            metadata=batch.meta,
            callback_url=batch.callback_url,
            created_at=batch.created_at,
            completed_at=batch.completed_at,
            links={"self": base, "items": f"{base}/items"},
        )
