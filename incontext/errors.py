"""Errors with stable codes: every user-facing failure is one of these, never a traceback."""

from __future__ import annotations


class IncontextError(Exception):
    """An error a user can act on. `code` is stable (clients switch on it); `message` is for people."""

    code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidImage(IncontextError):
    code = "INVALID_IMAGE"
    http_status = 422


class ImageTooLarge(IncontextError):
    code = "IMAGE_TOO_LARGE"
    http_status = 413


class UnsupportedFormat(IncontextError):
    code = "UNSUPPORTED_FORMAT"
    http_status = 415


class InvalidInput(IncontextError):
    code = "INVALID_INPUT"
    http_status = 422


class ModelError(IncontextError):
    """A model directory is missing a part, or a part does not match the others."""

    code = "MODEL_INVALID"
    http_status = 500


class ModelNotFound(IncontextError):
    code = "MODEL_UNAVAILABLE"
    http_status = 404


class UnknownModel(ModelNotFound):
    """No model has this id or alias. MODEL_UNAVAILABLE stays for a model that exists but
    cannot serve now; a client tells a typo from an outage by the code."""

    code = "MODEL_NOT_FOUND"


class ContentRefused(IncontextError):
    """The operator's content filter (INCONTEXT_CONTENT_FILTER) refused a run's input or output."""

    code = "CONTENT_REFUSED"
    http_status = 422


class Cancelled(IncontextError):
    code = "CANCELED"
    http_status = 409


class EngineLost(IncontextError):
    """The engine's process died while it had the request. Nothing says the request was at
    fault (the OOM killer, a signal, a driver fault), so the service queues its run again;
    a run the engine keeps dying on fails with this code after a few tries."""

    code = "ENGINE_CRASHED"
    http_status = 503
