"""What the BFL, OpenAI, Replicate and fal surfaces share.

Each turns its clients' bodies into a `KontextInput` and a `submission.RunRequest`, and
creates the run through the one intake path of `POST /v1/models/{model_id}/runs`:

    surface route → RunRequest → submission.submit → dispatcher → engine

so their runs are durable, priced, rate-limited and listed by `GET /v1/runs`. Besides that:
the key from `x-key` or `Authorization: Bearer`, image strings and bytes as data URIs, sizes
mapped to the nearest aspect ratio, and a route class that renders every error (auth,
validation, image problems, rate limit) in the surface's own shape.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from incontext.errors import IncontextError
from incontext.imageio import ASPECT_RATIOS
from incontext.service import auth, submission
from incontext.service.deps import Service
from incontext.service.errors import STATUS_CODES, Conflict, Unauthorized, ValidationFailed, field_error
from incontext.service.models import ApiKey, Run
from incontext.service.schemas import KontextInput

log = logging.getLogger(__name__)

# The id other surfaces' runs are recorded under (GET /v1/runs?model_id=flux-pro/kontext finds
# them): a hosted alias of the default model, present in every registry.
SURFACE_MODEL_ID = "flux-pro/kontext"

# Named ratios only: the "square_hd"-style aliases and match_input_image map onto these.
RATIOS = {name: wh for name, wh in ASPECT_RATIOS.items() if ":" in name}
_MAX_RATIO = max(w / h for w, h in RATIOS.values())


# Keys.
async def key_from_headers(request: Request) -> ApiKey:
    """The caller's key from `x-key` (BFL clients) or `Authorization: Bearer` (everyone else;
    `Key` as fal clients send it, `Token` as older Replicate clients do). A blank `x-key` is
    refused like a wrong one, not passed over for `Authorization`: the key a request names is
    the one checked."""
    if "x-key" in request.headers:
        token = request.headers["x-key"].strip()
    else:
        scheme, _, rest = request.headers.get("authorization", "").partition(" ")
        token = rest.strip() if scheme.lower() in ("bearer", "key", "token") else ""
    if not token:
        raise Unauthorized("send your API key as 'x-key: <key>' or 'Authorization: Bearer <key>'")
    key = await auth.lookup(request, token)
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    return key


# Errors, one shape for every cause; each surface renders it its own way.
@dataclass
class Problem:
    status: int
    code: str  # ours: VALIDATION_ERROR, INVALID_IMAGE, UNAUTHORIZED, …
    message: str
    errors: list[dict] = field(default_factory=list)  # field_error() dicts; `loc` as the client sent it
    headers: dict[str, str] = field(default_factory=dict)


def problem_from(exc: Exception) -> Problem:
    if isinstance(exc, IncontextError):
        return Problem(exc.http_status, exc.code, exc.message, getattr(exc, "errors", []), getattr(exc, "headers", {}))
    if isinstance(exc, RequestValidationError):
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            errors.append({"field": ".".join(p for p in loc if p != "body"), "loc": loc, "message": err["msg"], "code": err["type"]})
        summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:3])
        return Problem(422, "VALIDATION_ERROR", f"invalid request: {summary}", errors)
    if isinstance(exc, HTTPException):
        return Problem(exc.status_code, STATUS_CODES.get(exc.status_code, "HTTP_ERROR"), str(exc.detail), [], dict(exc.headers or {}))
    log.exception("unhandled error", exc_info=exc)
    return Problem(500, "INTERNAL_ERROR", "internal server error")


def route_class(render: Callable[[Problem], Response]) -> type[APIRoute]:
    """An APIRoute whose every failure (dependencies and body validation included) is
    answered by `render`, not by the app's `{code, message, errors}` handlers."""

    class SurfaceRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # noqa: BLE001 (rendered, and logged when unexpected)
                    return render(problem_from(exc))

            return route

    return SurfaceRoute


# Inputs.
def kontext_input(values: dict, names: dict[str, str]) -> KontextInput:
    """Validate against the one input model every surface shares; errors name the surface's fields."""
    try:
        return KontextInput.model_validate(values)
    except ValidationError as exc:
        errors = [field_error(submission.surface_field(".".join(map(str, e["loc"])), names), e["msg"], e["type"]) for e in exc.errors()]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
        raise ValidationFailed(f"invalid request: {summary}", errors=errors) from None


_SIGNATURES = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


def data_uri(data: bytes) -> str:
    """Image bytes as a data URI. The media type is only a label (the decoder sniffs the
    real format); an unknown one is left empty rather than guessed."""
    mime = next((m for magic, m in _SIGNATURES if data.startswith(magic)), "")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_reference(value: str) -> str:
    """An http(s) URL or data URI as it is; a bare base64 string (as BFL clients send) as a data URI."""
    text = value.strip()
    if text[:5].lower() == "data:" or urlsplit(text).scheme in ("http", "https"):
        return text
    try:
        head = base64.b64decode(re.sub(r"\s+", "", text[:64])[:32], validate=False)
    except (binascii.Error, ValueError):
        head = b""
    mime = next((m for magic, m in _SIGNATURES if head.startswith(magic)), "")
    return f"data:{mime};base64,{text}"


def nearest_aspect_ratio(width: float, height: float) -> str:
    """The named ratio (21:9 … 9:21) nearest to width:height, on a log scale."""
    ratio = width / height
    return min(RATIOS, key=lambda n: abs(math.log(RATIOS[n][0] / RATIOS[n][1] / ratio)))


def within_ratio_range(width: float, height: float) -> bool:
    return 1 / _MAX_RATIO - 1e-6 <= width / height <= _MAX_RATIO + 1e-6


# Runs.
def load_run(service: Service, run_id: str) -> Run | None:
    """A detached snapshot of the run (the session is closed before it is read)."""
    with service.sessions() as session:
        return session.get(Run, run_id)


def cancel_run(service: Service, run_id: str, reason: str) -> None:
    """Cancel as POST /v1/runs/{id}/cancel does; nothing if the run already ended."""
    try:
        submission.cancel(service, run_id, reason)
    except Conflict:
        pass
