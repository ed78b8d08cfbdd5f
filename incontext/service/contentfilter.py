"""The content-filter hook: an operator's function that may refuse a run's input or output.

Off unless `INCONTEXT_CONTENT_FILTER=module:function` names one. It is called twice per run:

- at submission (`stage="input"`), with the prompt and the decoded input image, before the
  run is stored: a refusal answers 422 CONTENT_REFUSED and nothing is queued;
- after the engine (`stage="output"`), with each output image as composed, before it is
  stored: a refusal fails the run with CONTENT_REFUSED (no output of it is kept), and it
  costs nothing.

    # myfilters.py; INCONTEXT_CONTENT_FILTER=myfilters:check
    def check(c: ContentCheck) -> str | None:
        if "forbidden" in c.prompt.lower():
            return "the prompt asks for something this server does not make"
        return None  # allowed

The function returns None to allow, or the reason to refuse (a sentence the client sees). It
runs in a worker thread and may take its time (a classifier). If it raises, the content is
refused as unchecked (CONTENT_FILTER_FAILED): a filter that cannot answer lets nothing through.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

from PIL import Image

from incontext.errors import ContentRefused, IncontextError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentCheck:
    stage: Literal["input", "output"]
    model_id: str  # the registered id of the model the run uses
    prompt: str
    # input: the edited image as decoded, then any references fitted to the output's size;
    # output: one output image
    images: tuple[Image.Image, ...]


ContentFilter = Callable[[ContentCheck], "str | None"]


@cache
def load(spec: str) -> ContentFilter:
    """The function `module:function` names (imported once). Raises ValueError saying why not."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the operator's to fix
        raise ValueError(f"content filter {spec!r}: cannot import {module_name}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"content filter {spec!r}: {module_name} has no function {name}")
    return function


def check(spec: str | None, content: ContentCheck) -> None:
    """Raise ContentRefused if the filter `spec` names refuses `content`; nothing when unset."""
    if not spec:
        return
    try:
        reason = load(spec)(content)
    except ContentRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong in it
        log.exception("content filter %s failed on the %s of a run", spec, content.stage)
        raise IncontextError(
            f"the content filter could not check the {content.stage} ({exc.__class__.__name__}); it was refused unchecked",
            code="CONTENT_FILTER_FAILED", http_status=503,
        ) from None
    if reason is not None:
        what = "the prompt or input image" if content.stage == "input" else "an output image"
        raise ContentRefused(f"the content filter refused {what}: {reason}" if str(reason).strip() else f"the content filter refused {what}")
