"""The server's log lines: text for people, or JSON for a log pipeline, each carrying the run
(and HTTP request) it is about.

    INCONTEXT_LOG_FORMAT=json incontext serve
    {"time": "2026-01-05 10:12:03,211", "level": "INFO", "logger": "incontext.service.dispatcher",
     "message": "run 0194…: succeeded", "run_id": "0194…"}

What a line is about travels in context variables, not in every call: the dispatcher binds
a run's id in the task that drives it (and the threads that task hands work to), the
callback sender in the task that delivers one, the request-id middleware (app.py) for an
HTTP request. A filter on the handler copies them onto every record, so the lines of any
module (outputs, storage, the database) written meanwhile carry them too. A record given
`extra={"run_id": …}` keeps its own (the reaper speaks of runs it is not driving).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

run_id: ContextVar[str | None] = ContextVar("incontext_run_id", default=None)
request_id: ContextVar[str | None] = ContextVar("incontext_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Record attributes that are not what a line says: uvicorn's copy of its message with colour
# codes, and the asyncio task's name (Python 3.12 and later).
_NOT_FIELDS = ("color_message", "taskName")


def bind_run(value: str | None) -> None:
    """Lines logged from here on in this task (or thread) are about run `value`. A task
    created, or a thread started with asyncio.to_thread, after this inherits it; call it in
    the task's own coroutine, so it ends with the task."""
    run_id.set(value)


class ContextFilter(logging.Filter):
    """Copies the bound run and request ids onto each record that has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("run_id", run_id), ("request_id", request_id)):
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        reserved_attrs=[*RESERVED_ATTRS, *_NOT_FIELDS],
    )


def configure(log_format: Literal["text", "json"], level: str | int) -> None:
    """The root logger's one handler (stderr), in `log_format`, replacing any handler before it."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler], force=True)
