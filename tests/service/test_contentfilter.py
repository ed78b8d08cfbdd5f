"""The operator's content filter (INCONTEXT_CONTENT_FILTER, service/contentfilter.py) over HTTP,
in process, with an engine that answers at once: a refused input is never queued, a refused
output fails its run with nothing kept and nothing billed, a filter that raises lets nothing
through, and one that cannot be imported stops the server before it serves."""

from __future__ import annotations

import sys
import textwrap

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from incontext.engine.protocol import EditResult
from incontext.service.app import UnsafeStart, create_app
from incontext.settings import Settings

from .helpers import EngineDouble, data_uri, png_bytes, wait_run

KEY = {"Authorization": "Bearer key-a"}
RUNS = "/v1/models/flux-pro/kontext/runs"

# An operator's filter, as the settings' comment describes one: None allows, a sentence refuses.
FILTER = textwrap.dedent('''
    calls = []

    def check(content):
        calls.append((content.stage, content.model_id, content.prompt, [image.size for image in content.images]))
        if "explode" in content.prompt:
            raise RuntimeError("the classifier is down")
        if content.stage == "input" and "forbidden" in content.prompt:
            return "the prompt asks for something this server does not make"
        if content.stage == "output" and content.images[0].getpixel((0, 0)) == (0, 0, 0):
            return "a black square"
        return None
''')


class BlackSecondEngine(EngineDouble):
    """Answers at once: the first image is the input as given, every further one black."""

    def __init__(self):
        self.requests = []

    async def edit(self, request, on_progress=None):
        self.requests.append(request)
        black = Image.new("RGB", (request.width, request.height))
        images = [request.image, *[black] * (request.num_images - 1)]
        return EditResult(images, [request.seed + i for i in range(request.num_images)], 1, timings_ms={"total": 0.0})


@pytest.fixture(scope="module")
def operator_filter(tmp_path_factory):
    """The filter module, importable as the server would import it."""
    where = tmp_path_factory.mktemp("filters")
    (where / "operator_filter.py").write_text(FILTER)
    sys.path.insert(0, str(where))
    import operator_filter

    yield operator_filter
    sys.path.remove(str(where))
    sys.modules.pop("operator_filter", None)


@pytest.fixture
def app(tmp_path, operator_filter):
    operator_filter.calls.clear()
    engine = BlackSecondEngine()
    settings = Settings(data_dir=tmp_path, api_keys=["key-a"], poll_interval_seconds=0.1, content_filter="operator_filter:check")
    with TestClient(create_app(settings, engine=engine), headers=KEY) as client:
        yield client, engine, operator_filter.calls


def test_a_refused_input_is_422_and_nothing_is_queued(app):
    client, engine, calls = app
    r = client.post(RUNS, json={"input": {"prompt": "something forbidden", "image_url": data_uri(png_bytes((96, 64)))}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "CONTENT_REFUSED" and "does not make" in body["message"]
    assert [e["field"] for e in body["errors"]] == ["input"]
    assert calls == [("input", "incontext/nano", "something forbidden", [(96, 64)])]  # the image as decoded, at its size
    assert client.get("/v1/runs").json()["items"] == [] and engine.requests == []


def test_a_refused_output_fails_the_run_keeps_nothing_and_costs_nothing(app, tmp_path):
    client, engine, calls = app
    r = client.post(RUNS, json={"input": {"prompt": "make it blue", "image_url": data_uri(), "num_images": 2}})
    assert r.status_code == 201, r.text
    run = wait_run(client, r.json()["id"])
    assert run["status_code"] == "failed" and run["failure_code"] == "CONTENT_REFUSED", run
    assert "refused an output image: a black square" in run["failure_message"]
    assert run["cost"] == "0.00" and run["cost_breakdown"]["quantity"] == 0
    # The first output passed the filter and was written before the second was refused: gone too.
    assert not any((tmp_path / "outputs").rglob("*.*"))
    assert [stage for stage, *_ in calls] == ["input", "output", "output"]


def test_a_filter_that_raises_lets_nothing_through(app):
    client, engine, _ = app
    r = client.post(RUNS, json={"input": {"prompt": "explode", "image_url": data_uri()}})
    assert r.status_code == 503 and r.json()["code"] == "CONTENT_FILTER_FAILED", r.text
    assert "RuntimeError" in r.json()["message"] and "the classifier is down" not in r.json()["message"]  # its details stay in the log
    assert client.get("/v1/runs").json()["items"] == [] and engine.requests == []


def test_an_allowed_run_succeeds(app):
    client, _, calls = app
    r = client.post(RUNS, json={"input": {"prompt": "make it blue", "image_url": data_uri()}})
    assert wait_run(client, r.json()["id"])["status_code"] == "succeeded"
    assert [stage for stage, *_ in calls] == ["input", "output"]


def test_a_filter_that_cannot_be_imported_stops_the_server_starting(tmp_path):
    settings = Settings(data_dir=tmp_path, content_filter="no_such_filter_module:check")
    with pytest.raises(UnsafeStart, match="cannot import no_such_filter_module"):
        with TestClient(create_app(settings, engine=BlackSecondEngine())):
            pass
    with pytest.raises(ValueError, match="module:function"):
        Settings(data_dir=tmp_path, content_filter="no_function_named")
