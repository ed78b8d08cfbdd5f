"""Errors the service adds, and the handlers that give every failure one body shape:
`{code, message, errors[]}` (errors[] lists field problems, for 422s)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from incontext.errors import IncontextError

log = logging.getLogger(__name__)

STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    507: "STORAGE_ERROR",
}


class ServiceError(IncontextError):
    """An IncontextError that may carry field errors and response headers."""

    def __init__(self, message: str, *, errors: list[dict] | None = None, headers: dict | None = None, **kw):
        super().__init__(message, **kw)
        self.errors = errors or []
        self.headers = headers or {}


class Unauthorized(ServiceError):
    code = "UNAUTHORIZED"
    http_status = 401


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"
    http_status = 403


class RunNotFound(ServiceError):
    code = "RUN_NOT_FOUND"
    http_status = 404


class NotFound(ServiceError):
    code = "NOT_FOUND"
    http_status = 404


class Conflict(ServiceError):
    code = "CONFLICT"
    http_status = 409


class RateLimited(ServiceError):
    code = "RATE_LIMITED"
    http_status = 429


class ValidationFailed(ServiceError):
    code = "VALIDATION_ERROR"
    http_status = 422


class StorageError(ServiceError):
    """A run's file could not be written (disk full, unwritable data dir): the request or run
    fails with this code and the server goes on serving."""

    code = "STORAGE_ERROR"
    http_status = 507


class ImageFetchFailed(ServiceError):
    """image_url could not be downloaded (network error, timeout, non-2xx, too large, refused host)."""

    code = "IMAGE_FETCH_FAILED"
    http_status = 422


class WorkerLost(ServiceError):
    """A run's worker stopped renewing its lease (leases.reap) once too often: the run failed
    rather than running again."""

    code = "WORKER_LOST"
    http_status = 500


def field_error(field: str, message: str, code: str) -> dict:
    return {"field": field, "loc": field.split("."), "message": message, "code": code}


def at_field(exc: IncontextError, field: str) -> ServiceError:
    """The same error (code, status), pinned to the input field that caused it."""
    return ServiceError(
        exc.message, code=exc.code, http_status=exc.http_status, errors=[field_error(field, exc.message, exc.code)]
    )


def error_body(code: str, message: str, errors: list[dict] | None = None) -> dict:
    return {"code": code, "message": message, "errors": errors or []}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IncontextError)
    async def _incontext(_: Request, exc: IncontextError):
        return JSONResponse(
            error_body(exc.code, exc.message, getattr(exc, "errors", None)),
            status_code=exc.http_status,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        code = STATUS_CODES.get(exc.status_code, "HTTP_ERROR")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = []
        for err in exc.errors():
            # Drop FastAPI's "body" root: clients name fields as they sent them (input.prompt).
            loc = [str(p) for p in err["loc"] if p != "body"]
            errors.append({"field": ".".join(loc), "loc": loc, "message": err["msg"], "code": err["type"]})
        summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:3])
        if any(e["code"] == "json_invalid" for e in errors):
            # A body that is not JSON is a malformed request (400), not a field problem (422).
            return JSONResponse(error_body("BAD_REQUEST", f"the body is not valid JSON: {summary}", errors), status_code=400)
        return JSONResponse(error_body("VALIDATION_ERROR", f"invalid request: {summary}", errors), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("INTERNAL_ERROR", "internal server error"), status_code=500)
