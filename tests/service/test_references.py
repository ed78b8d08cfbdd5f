"""Several images per request, on every surface: the first is edited and decides the output's
size, the others reach the engine as `references`, in the order sent, fitted to that size.
A fifth image is refused naming the field; a reference URL gets the same network checks as
the edited image; a run queued with references before a restart runs with them after it.

In process, with an engine that records what it is asked and answers at once."""

from __future__ import annotations

import asyncio
import base64

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from incontext.engine.protocol import EditResult
from incontext.service.app import create_app
from incontext.settings import Settings

from .helpers import EngineDouble, ImageHost, data_uri, png_bytes, wait_for, wait_run

KEY = {"Authorization": "Bearer key-a"}
RUNS = "/v1/models/flux-pro/kontext/runs"
# The edited image (wide, red) and two references of other sizes and colours: the engine must
# get the references in this order, each at the edited image's output size.
EDITED = png_bytes((96, 64), color=(200, 40, 40))
GREEN = png_bytes((40, 40), color=(40, 200, 40))
BLUE = png_bytes((30, 90), color=(40, 40, 200))


class RecordingEngine(EngineDouble):
    """Answers at once with the edited image; keeps every request."""

    def __init__(self):
        self.requests = []

    async def edit(self, request, on_progress=None):
        self.requests.append(request)
        return EditResult([request.image] * request.num_images, [request.seed + i for i in range(request.num_images)], 1, timings_ms={"total": 0.0})


class StuckEngine(EngineDouble):
    """Never finishes an edit: the run stays running until the server stops."""

    async def edit(self, request, on_progress=None):
        await asyncio.Event().wait()


def settings(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path, api_keys=["key-a"], poll_interval_seconds=0.1, **overrides)


@pytest.fixture
def app(tmp_path):
    engine = RecordingEngine()
    with TestClient(create_app(settings(tmp_path), engine=engine), headers=KEY) as client:
        yield client, engine


def corner(image: Image.Image) -> tuple[int, int, int]:
    # png_bytes paints a blue patch in the second quarter; the corner keeps the image's colour.
    return image.getpixel((1, 1))


def assert_references(request, colours: list[tuple[int, int, int]]) -> None:
    """The engine got the edited image and then references of `colours`, all at its output size."""
    size = (request.width, request.height)
    assert request.image.size == size and corner(request.image) == (200, 40, 40)
    assert [r.size for r in request.references] == [size] * len(colours)
    assert [corner(r) for r in request.references] == colours


def test_runs_api_passes_image_urls_as_references_in_order(app):
    client, engine = app
    r = client.post(RUNS, json={"input": {"prompt": "put the green one left of the blue one", "image_urls": [data_uri(EDITED), data_uri(GREEN), data_uri(BLUE)]}})
    assert r.status_code == 201, r.text
    run = wait_run(client, r.json()["id"], timeout=30)
    assert run["status_code"] == "succeeded", run
    assert_references(engine.requests[-1], [(40, 200, 40), (40, 40, 200)])
    # The output has the edited image's aspect; the echoed input abbreviates every data URI.
    assert engine.requests[-1].width > engine.requests[-1].height
    echoed = run["input"]["image_urls"]
    assert len(echoed) == 3 and all(u.startswith("data:image/png;base64,<") and u.endswith("characters omitted>") for u in echoed)
    assert "image_url" not in run["input"]


def test_batch_items_and_fal_take_image_urls(app):
    client, engine = app
    r = client.post("/v1/models/flux-pro/kontext/batches", json={"input": [
        {"prompt": "a", "image_urls": [data_uri(EDITED), data_uri(BLUE)]}, {"prompt": "b", "image_url": data_uri(EDITED)},
    ]})
    assert r.status_code == 201, r.text
    wait_for(lambda: len(engine.requests) == 2, timeout=30)
    by_prompt = {q.prompt: q for q in engine.requests}
    assert_references(by_prompt["a"], [(40, 40, 200)])
    assert by_prompt["b"].references == ()

    r = client.post("/fal-ai/flux-pro/kontext", json={"prompt": "c", "image_urls": [data_uri(EDITED), data_uri(GREEN), data_uri(BLUE)]})
    assert r.status_code == 200, r.text
    assert_references(engine.requests[-1], [(40, 200, 40), (40, 40, 200)])


def test_bfl_input_image_2_to_4_are_references(app):
    client, engine = app
    body = {"prompt": "p", "input_image": base64.b64encode(EDITED).decode(), "input_image_2": "", "input_image_3": data_uri(GREEN),
            "input_image_4": base64.b64encode(BLUE).decode()}
    r = client.post("/v1/flux-kontext-pro", json=body)
    assert r.status_code == 200, r.text
    wait_for(lambda: client.get("/v1/get_result", params={"id": r.json()["id"]}).json()["status"] == "Ready", timeout=30)
    # A blank input_image_2 is no image; 3 and 4 follow the edited one in order.
    assert_references(engine.requests[-1], [(40, 200, 40), (40, 40, 200)])


def test_openai_several_image_parts_are_references(app):
    client, engine = app
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate((EDITED, BLUE, GREEN))]
    r = client.post("/v1/images/edits", data={"prompt": "p"}, files=files)
    assert r.status_code == 200, r.text
    assert_references(engine.requests[-1], [(40, 40, 200), (40, 200, 40)])


def test_replicate_input_images_are_references(app):
    client, engine = app
    r = client.post("/v1/models/black-forest-labs/flux-kontext-pro/predictions", headers={"Prefer": "wait"},
                    json={"input": {"prompt": "p", "input_images": [data_uri(EDITED), data_uri(GREEN)]}})
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    assert_references(engine.requests[-1], [(40, 200, 40)])
    assert r.json()["input"]["input_images"][1].endswith("characters omitted>")


def test_a_fifth_image_is_refused_naming_the_field(app):
    client, engine = app
    five = [data_uri(EDITED)] * 5
    r = client.post(RUNS, json={"input": {"prompt": "p", "image_urls": five}})
    assert r.status_code == 422
    assert [(e["field"], e["code"]) for e in r.json()["errors"]] == [("input.image_urls", "too_many_images")]

    r = client.post("/queue/fal-ai/flux-pro/kontext", json={"prompt": "p", "image_urls": five})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "image_urls" and r.json()["detail"][0]["type"] == "too_many_images"

    r = client.post("/v1/models/black-forest-labs/flux-kontext-pro/predictions", json={"input": {"prompt": "p", "input_images": five}})
    assert r.status_code == 422
    assert [(f["field"], f["type"]) for f in r.json()["invalid_fields"]] == [("input.input_images", "too_many_images")]

    # OpenAI's clients read every refused request as a 400, with the form field as `param`.
    r = client.post("/v1/images/edits", data={"prompt": "p"}, files=[("image[]", (f"{i}.png", EDITED, "image/png")) for i in range(5)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "image" and r.json()["error"]["code"] == "too_many_images"

    # One image field or the other: both at once is refused rather than guessed at.
    r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri(EDITED), "image_urls": [data_uri(GREEN)]}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "input.image_urls"
    assert engine.requests == []


def test_a_private_address_as_the_third_image_is_refused_like_the_first(app):
    client, engine = app
    host = ImageHost({"/a.png": (200, EDITED)})  # on loopback, which the server may not reach by default
    try:
        first = client.post(RUNS, json={"input": {"prompt": "p", "image_url": f"{host.url}/a.png"}})
        third = client.post(RUNS, json={"input": {"prompt": "p", "image_urls": [data_uri(EDITED), data_uri(GREEN), f"{host.url}/a.png"]}})
        bfl = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "input_image": data_uri(EDITED), "input_image_3": f"{host.url}/a.png"})
    finally:
        host.close()
    assert first.status_code == third.status_code == 422
    assert first.json()["code"] == third.json()["code"] == "IMAGE_FETCH_FAILED"
    assert first.json()["message"] == third.json()["message"]
    assert [e["field"] for e in third.json()["errors"]] == ["input.image_urls.2"]
    assert bfl.status_code == 422 and [d["loc"] for d in bfl.json()["detail"]] == [["body", "input_image_3"]]
    assert host.requests == [] and engine.requests == []


def test_a_run_queued_with_references_runs_with_them_after_a_restart(tmp_path):
    with TestClient(create_app(settings(tmp_path), engine=StuckEngine()), headers=KEY) as client:
        r = client.post(RUNS, json={"input": {"prompt": "p", "image_urls": [data_uri(EDITED), data_uri(GREEN), data_uri(BLUE)]}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        wait_run(client, run_id, timeout=30, until=("running",))
    # Stopped with the run in flight: the next start reads its images back from storage.
    engine = RecordingEngine()
    with TestClient(create_app(settings(tmp_path), engine=engine), headers=KEY) as client:
        run = wait_run(client, run_id, timeout=30)
    assert run["status_code"] == "succeeded", run
    assert_references(engine.requests[-1], [(40, 200, 40), (40, 40, 200)])
