"""The OpenAI-style surface: `POST /v1/images/edits` (multipart), answered when the images exist.

The OpenAI SDKs call it unchanged (`base_url=<server>/v1`, `api_key=<our key>`). The request
becomes an ordinary stored run (listed by `GET /v1/runs`, priced, rate-limited); the route
waits for it and answers `{created, data: [{b64_json | url, revised_prompt}]}`. If the client
disconnects or the wait times out, the run is canceled. Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}`; validation problems are 400, as there.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from incontext.engine.protocol import MAX_IMAGES
from incontext.errors import ImageTooLarge, IncontextError, UnknownModel
from incontext.service import inputs, lifecycle, submission, surfaces
from incontext.service.deps import KeyDep, Service, ServiceDep
from incontext.service.errors import ServiceError, ValidationFailed, at_field, field_error
from incontext.service.models import Run
from incontext.service.schemas import MAX_PROMPT_LENGTH

WAIT_TIMEOUT_S = 600.0  # the OpenAI SDKs' own default timeout
POLL_S = 0.25
# Every image is the form's `image` (image_urls.2: the third part).
NAMES = {"image_url": "image", "image_urls": "image", **{f"image_urls.{i}": "image" for i in range(MAX_IMAGES)}, "num_images": "n", "aspect_ratio": "size", "mask_image_url": "mask"}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$", re.IGNORECASE)
# Model names OpenAI clients send: served by the default model rather than refused, so
# code written for OpenAI works after changing only the base URL and key.
OPENAI_MODEL_PREFIXES = ("gpt-image", "dall-e")
_CODES = {"UNAUTHORIZED": "invalid_api_key", "RATE_LIMITED": "rate_limit_exceeded", "MODEL_UNAVAILABLE": "model_not_found", "MODEL_NOT_FOUND": "model_not_found"}


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, requests (429) or server_error")
    param: str | None = Field(description="the form field at fault, if one is")
    code: str | None = Field(description="invalid_api_key, invalid_value, missing_required_parameter, too_many_images, invalid_image, …")


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def render_error(problem: surfaces.Problem) -> JSONResponse:
    status = 400 if problem.status == 422 else problem.status
    param = problem.errors[0]["field"] or None if problem.errors else None
    if problem.code == "VALIDATION_ERROR":
        first = problem.errors[0]["code"] if problem.errors else None
        code = {"missing": "missing_required_parameter", "too_many_images": "too_many_images"}.get(first, "invalid_value")
    else:
        code = _CODES.get(problem.code, problem.code.lower())
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    body = {"error": {"message": problem.message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=problem.headers)


router = APIRouter(prefix="/v1", tags=["openai"], route_class=surfaces.route_class(render_error))


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="with response_format=b64_json")
    url: str | None = Field(None, description="with response_format=url: signed, expires (INCONTEXT_FILE_URL_TTL_SECONDS)")
    revised_prompt: str = Field(description="the prompt as used: unchanged (no prompt rewriting here)")
    # Extensions, with return_mask only: clients that did not ask see OpenAI's shape.
    mask_b64_json: str | None = Field(None, description="with return_mask and response_format=b64_json: the edited region, PNG")
    mask_url: str | None = Field(None, description="with return_mask and response_format=url: the edited region, PNG (signed, expires)")
    changed_share: float | None = Field(None, description="with return_mask: the share of pixels that differ from the input, 0..1")


class ImagesResponse(BaseModel):
    created: int = Field(description="unix seconds")
    data: list[ImageData]
    output_format: Literal["png", "jpeg"]
    size: str = Field(description="the output's real WxH")


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={status: {"model": OpenAIErrorBody, "description": "OpenAI-shaped error"} for status in ("4XX", "5XX")},
    # The images come as `image` or as `image[]`: the route needs one file and takes up to
    # MAX_IMAGES, and a null part is no file.
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {"oneOf": [
        {"required": [name], "properties": {name: {"type": "array", "minItems": 1, "maxItems": MAX_IMAGES}}} for name in ("image", "image[]")
    ]}}}}},
)
async def create_image_edit(
    request: Request,
    key: KeyDep,
    service: ServiceDep,
    # An empty form field reads as missing: the document says so with minLength.
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_LENGTH, description="the edit instruction")],
    image: Annotated[
        list[UploadFile] | None,
        File(description=f"the image to edit, then up to {MAX_IMAGES - 1} reference images the prompt may draw on (fitted to the first's output size)"),
    ] = None,
    image_array: Annotated[list[UploadFile] | None, File(alias="image[]", description="as image (the SDKs' spelling for a list)")] = None,
    n: Annotated[int, Form(ge=1, le=4, description="images to make, 1–4")] = 1,
    size: Annotated[str, Form(description="auto (the input's aspect ratio) or WxH → the nearest of 21:9 … 9:21; the model sets the resolution")] = "auto",
    response_format: Annotated[Literal["url", "b64_json"] | None, Form(description="default b64_json (url for dall-e-* models)")] = None,
    output_format: Annotated[str, Form(description="png (default) or jpeg")] = "png",
    model: Annotated[str | None, Form(description="a model id of this server; gpt-image-*/dall-e-* mean the default model")] = None,
    seed: Annotated[int | None, Form(description="extension: image i uses seed+i; random when absent")] = None,
    mask: Annotated[UploadFile | None, File(description="where the edit may happen, as OpenAI's mask: fully transparent pixels "
                                                        "may change, opaque ones keep the input's pixels bit for bit; stretched to the image's size")] = None,
    stream: Annotated[bool, Form(description="not supported")] = False,
    preserve: Annotated[
        Literal["auto", "off"],
        Form(description="extension: auto keeps the input's own pixels (at its own size when size keeps its aspect ratio) "
             "wherever the edit did not happen; off returns the model's raw output at its working size"),
    ] = "auto",
    return_mask: Annotated[bool, Form(description="extension: each data[] item also carries the edited region as a PNG "
                                                  "(mask_b64_json or mask_url, as response_format) and changed_share")] = False,
):
    """Edit an image, synchronously. Other OpenAI fields (quality, background, user,
    input_fidelity, output_compression) are accepted and ignored."""
    # 1. Check what this server cannot do, and resolve the model.
    if stream:
        raise _invalid("stream", "streaming is not supported; omit stream")
    model_id = _model_id(model, service)
    files = [*(image or []), *(image_array or [])]
    if not files:
        raise ValidationFailed("image is required", errors=[field_error("image", "image is required", "missing")])
    if len(files) > MAX_IMAGES:
        message = f"at most {MAX_IMAGES} images per request, the edited one included; {len(files)} were sent"
        raise ValidationFailed(message, errors=[field_error("image", message, "too_many_images")])

    # 2. The images as data URIs (stored with the run, as inline images are): the first is
    # edited, the others are references.
    uris = []
    for part in files:
        uris.append(surfaces.data_uri(await _read_part(part, "image", service)))
    # OpenAI's mask marks the edit with transparency; the run stores it as ours (white may change).
    mask_uri = None
    if mask is not None:
        data = await _read_part(mask, "mask", service)
        try:
            mask_uri = surfaces.data_uri(await run_in_threadpool(inputs.mask_from_alpha, data, service.settings))
        except IncontextError as exc:
            raise at_field(exc, "mask") from None
    item = surfaces.kontext_input(
        {
            "prompt": prompt,
            **({"image_url": uris[0]} if len(uris) == 1 else {"image_urls": uris}),
            "num_images": n,
            "aspect_ratio": _aspect_ratio(size),
            "output_format": output_format,
            "seed": seed,
            "preserve": preserve,
            "return_mask": return_mask,
            **({"mask_image_url": mask_uri} if mask_uri else {}),
        },
        NAMES,
    )

    # 3. Queue it as a stored run and wait for the engine.
    run_request = submission.RunRequest(model_id=model_id, items=[item], surface="POST /v1/images/edits", names=NAMES)
    accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id)
    run_id, limits = accepted.runs[0].id, accepted.headers
    run = await wait_for_run(service, run_id, request)
    headers = {**limits, "Incontext-Run-Id": run_id}
    if run.status == lifecycle.CANCELED:
        raise ServiceError(f"run {run_id} was canceled", code="CANCELED", http_status=409, headers=headers)
    if run.status != lifecycle.SUCCEEDED:
        raise ServiceError(f"run {run_id} failed: {run.failure_message}", code=run.failure_code or "INTERNAL_ERROR", http_status=500, headers=headers)

    # 4. The images, inline or as signed URLs.
    fmt = response_format or ("url" if (model or "").startswith("dall-e") else "b64_json")
    outputs = run.output["outputs"]
    content = await run_in_threadpool(_image_data, service, outputs, fmt, item.prompt, item.return_mask)
    first = outputs[0]
    body = {"created": int(time.time()), "data": content, "output_format": item.output_format, "size": f"{first['width']}x{first['height']}"}
    return JSONResponse(body, headers=headers)


@router.api_route("/images/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def other_images_route(rest: str, request: Request):
    """Every other /v1/images/* path (generations, variations, a GET of edits): an OpenAI-shaped
    error, so the SDKs raise their own NotFoundError instead of failing to parse ours."""
    if rest == "edits":
        raise ServiceError(f"{request.method} is not allowed on /v1/images/edits; POST a multipart form", code="METHOD_NOT_ALLOWED", http_status=405)
    raise ServiceError(f"/v1/images/{rest} is not served here: this server edits images (POST /v1/images/edits)", code="NOT_FOUND", http_status=404)


async def wait_for_run(service: Service, run_id: str, request: Request) -> Run:
    """Poll the stored run until it ends. A client that hangs up, or a wait past
    WAIT_TIMEOUT_S, cancels it: nobody would receive the images."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    # With the body read, receive() returns only when the client disconnects. (Awaited in a
    # task: Request.is_disconnected() never sees it through the app's http middleware.)
    client_gone = asyncio.ensure_future(request.receive())
    try:
        while True:
            run = await run_in_threadpool(surfaces.load_run, service, run_id)
            if run.status in lifecycle.TERMINAL:
                return run
            if client_gone.done():
                await run_in_threadpool(surfaces.cancel_run, service, run_id, "client disconnected from POST /v1/images/edits")
                raise ServiceError("client disconnected", code="CLIENT_CLOSED_REQUEST", http_status=499)
            if time.monotonic() > deadline:
                await run_in_threadpool(surfaces.cancel_run, service, run_id, f"not done within {WAIT_TIMEOUT_S:g} s for POST /v1/images/edits")
                raise ServiceError(
                    f"run {run_id} did not finish within {WAIT_TIMEOUT_S:g} s and was canceled", code="TIMEOUT", http_status=504,
                    headers={"Incontext-Run-Id": run_id},
                )
            await asyncio.sleep(POLL_S)
    finally:
        client_gone.cancel()


def _image_data(service: Service, outputs: list[dict], fmt: str, prompt: str, return_mask: bool) -> list[dict]:
    def file(relpath: str | None) -> str | None:
        if relpath is None:  # no mask: the engine reported no change map
            return None
        if fmt == "b64_json":
            return base64.b64encode(service.storage.output_path(relpath).read_bytes()).decode()
        return service.storage.signed_url(relpath)

    data = []
    for o in outputs:
        item = {fmt: file(o["file"]), "revised_prompt": prompt}
        if return_mask:
            item.update({f"mask_{fmt}": file(o.get("mask_file")), "changed_share": o["changed_share"]})
        data.append(item)
    return data


async def _read_part(part: UploadFile, name: str, service: Service) -> bytes:
    data = await part.read(service.settings.max_image_bytes + 1)
    if len(data) > service.settings.max_image_bytes:
        message = f"{name} is larger than the {service.settings.max_image_bytes:,}-byte limit"
        raise ServiceError(message, code=ImageTooLarge.code, http_status=413, errors=[field_error(name, message, ImageTooLarge.code)])
    return data


def _model_id(model: str | None, service: Service) -> str:
    if not model or model.startswith(OPENAI_MODEL_PREFIXES):
        return surfaces.SURFACE_MODEL_ID
    if model.strip("/") in service.registry.ids():
        return model.strip("/")
    known = ", ".join(sorted(service.registry.ids()))
    message = f"unknown model '{model}'; known models: {known} (or any gpt-image-*/dall-e-* name)"
    raise ServiceError(message, code=UnknownModel.code, http_status=404, errors=[field_error("model", message, "model_not_found")])


def _aspect_ratio(size: str) -> str | None:
    if size.strip().lower() in ("", "auto"):
        return None
    match = _SIZE.match(size)
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise _invalid("size", f"size must be 'auto' or WxH (e.g. 1024x1024), not {size!r}")
    return surfaces.nearest_aspect_ratio(int(match[1]), int(match[2]))


def _invalid(param: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[field_error(param, message, "invalid_value")])
