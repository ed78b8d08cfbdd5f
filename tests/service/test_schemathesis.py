"""schemathesis over every operation of /openapi.json: generated requests, valid and not, to
the app on a loopback server (an engine that answers at once, so runs reach every status's
shape). No answer may be a 5xx; every answer must match the document (status code, content
type, headers, body schema); and no request the document calls valid may be refused (the
document is as strict as the routes). Held: a client generated from the document gets what
it was promised, and a hostile one cannot make the server fail.

Not held: that every request the document calls invalid is refused. A query string cannot
carry the values the generator makes invalid ones with (an array for `cursor` goes as a
repeated parameter, which reads as its last value), so that check reports HTTP's limits.
Runs in about 25-60 s on 2 shared cores."""

from __future__ import annotations

import socket
import threading
import time

import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from incontext.engine.protocol import EditResult, StepProgress
from incontext.service.app import create_app
from incontext.settings import Settings

from .helpers import EngineDouble

KEY = "key-a"
AUTH = {"Authorization": f"Bearer {KEY}"}
from incontext.workflows import WORKFLOWS  # noqa: E402 (beside the operations it names)

EXAMPLES_PER_OPERATION = 6  # × 2 modes × 45 operations
# Operations that take an image whose content decides: a string or file part no schema can tell
# from an image the server fetches or decodes. A request the document calls valid may be refused
# there, but only with a documented 4xx that names the image, or a 422 naming fields it sent whose
# rule the document states in words (_names_a_sent_field); every other check
# (no 5xx, status, content type, body schema) holds for them as for every operation.
IMAGE_CONTENT = {"POST /v1/flux-kontext-pro", "POST /v1/images/edits", "POST /v1/predictions"} | {
    # The workflows' fixed paths (routes/workflows.py) run whatever image they are sent, on the
    # runs API, batches, BFL's, Replicate's and fal's; the runs API's own {model_id:path} route
    # meets unknown models first.
    f"POST {prefix}{workflow}{suffix}" for workflow in WORKFLOWS
    for prefix, suffix in (("/v1/models/", "/runs"), ("/v1/models/", "/batches"), ("/v1/", ""),
                           ("/v1/models/incontext/", "/predictions"), ("/fal-ai/", ""), ("/queue/fal-ai/", ""))
}


def _names_a_sent_field(case, response) -> bool:
    """A 422 whose errors name fields the request sent: a document-valid value refused for a
    rule the document states in words (an aspect ratio outside 21:9 … 9:21, a webhook_url
    that is no public URL), never a 5xx or an unnamed refusal."""
    body = case.body if isinstance(case.body, dict) else {}
    try:
        detail = response.json().get("detail")
    except ValueError:
        return False
    locs = [e.get("loc", []) for e in detail] if isinstance(detail, list) else []
    return response.status_code == 422 and bool(locs) and all(len(loc) > 1 and loc[1] in body for loc in locs)


class InstantEngine(EngineDouble):
    """Every edit succeeds at once with its input as the output."""

    async def edit(self, request, on_progress=None) -> EditResult:
        if on_progress:
            on_progress(StepProgress(request.num_inference_steps, request.num_inference_steps))
        images = [request.image] * request.num_images
        seeds = [request.seed + i for i in range(request.num_images)]
        return EditResult(images, seeds, request.num_inference_steps, timings_ms={"total": 0.0})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("schemathesis"),
        api_keys=[KEY],
        rate_limit_per_minute=10**6,
        max_active_images_per_key=10**6,
        read_rate_limit_per_minute=0,
        fetch_timeout_seconds=1,
        poll_interval_seconds=0.2,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings, engine=InstantEngine())
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


def test_every_operation_answers_as_documented_and_never_5xx(server):
    api = schemathesis.openapi.from_url(f"{server}/openapi.json")
    failures, operations = [], 0
    for loaded in api.get_all_operations():
        operation = loaded.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,  # the same requests every run: a failure reproduces
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            def check(case):
                image_decides = operation.label in IMAGE_CONTENT and mode is GenerationMode.POSITIVE
                excluded = [negative_data_rejection] + ([positive_data_acceptance] if image_decides else [])
                response = case.call(base_url=server, headers=AUTH)
                case.validate_response(response, excluded_checks=excluded)
                if image_decides and response.status_code >= 400 and response.status_code not in (401, 403):  # not the generated credentials
                    assert response.status_code < 500, response.text
                    assert "image" in response.text.lower() or _names_a_sent_field(case, response), response.text

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # an operation with no parameters and no body has no invalid request to make
                if mode is not GenerationMode.NEGATIVE:
                    raise
            except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, not just the first
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert operations >= 30
    assert not failures, "\n\n".join(failures)
