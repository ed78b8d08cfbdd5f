"""Workflows on the other surfaces (issue 20): batches of the runs API, BFL's
`POST /v1/{workflow}` and Replicate's `POST /v1/models/incontext/{workflow}/predictions`, run by
the real engine on the bundled nano model in this process. What is held is what a client of
each surface notices: its runs complete and report the workflow's mask and boxes in the
surface's own shape, and a bad input is refused naming the field as that client sent it."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from incontext.service.app import create_app
from incontext.settings import Settings

from .helpers import wait_run
from .test_workflows import KEY, STEPS, H, W, assert_boxes_inside, backdrop, logo, scene, uri

NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"not an image").decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("workflow-surfaces"), api_keys=["key-a"], poll_interval_seconds=0.1,
                        engine_mode="thread", engine_compile=False)
    with TestClient(create_app(settings), headers=KEY) as c:
        yield c


def fetched(client: TestClient, url: str, mode: str = "L") -> np.ndarray:
    """A signed output URL's image (or a data URI's)."""
    if url.startswith("data:"):
        data = base64.b64decode(url.split(",", 1)[1])
    else:
        r = client.get(url)
        assert r.status_code == 200, r.text
        data = r.content
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def poll(read, done, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not done(body := read()):
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    return body


def test_a_batch_of_workflow_items_completes_with_each_items_mask_and_boxes(client):
    items = [{"image_url": uri(scene()), "prompt": prompt, "num_inference_steps": STEPS, "seed": 7, "client_ref": ref}
             for prompt, ref in (("the red circle", "circle"), ("the teal square", "square"))]
    r = client.post("/v1/models/segmentation/batches", json={"input": items, "metadata": {"job": 1}})
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["model_id"] == "segmentation"
    runs = client.get(f"/v1/batches/{batch['id']}/items").json()["items"]
    assert [run["client_ref"] for run in runs] == ["circle", "square"]
    assert [run["input"]["prompt"] for run in runs] == ["the red circle", "the teal square"]  # each item planned on its own
    for run in runs:
        done = wait_run(client, run["id"], timeout=180)
        assert done["status_code"] == "succeeded" and done["model_id"] == "segmentation", done
        (out,) = done["output"]["outputs"]
        mask = fetched(client, out["mask_url"])
        assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
        assert_boxes_inside(out["boxes"])
    assert poll(lambda: client.get(f"/v1/batches/{batch['id']}").json(), lambda b: b["status_code"] == "succeeded")["model_id"] == "segmentation"


@pytest.mark.parametrize(
    "workflow, second, field, code",
    [
        ("background-replace", {}, "input.1.reference_image_url", "missing"),
        ("logo-placement", {"logo_image_url": NOT_AN_IMAGE}, "input.1.logo_image_url", "INVALID_IMAGE"),
    ],
    ids=["missing-field", "not-an-image"],
)
def test_a_bad_batch_item_is_a_422_naming_it(client, workflow, second, field, code):
    good = {"image_url": uri(scene()), "reference_image_url": uri(backdrop()), "logo_image_url": uri(logo())}
    bad = {"image_url": uri(scene()), **second}
    r = client.post(f"/v1/models/{workflow}/batches", json={"input": [good, bad]})
    assert r.status_code == 422, r.text
    assert [(e["field"], e["code"]) for e in r.json()["errors"]] == [(field, code)]
    assert client.get("/v1/runs", params={"model_id": workflow}).json()["items"] == []  # nothing was queued


def test_a_replicate_prediction_of_a_workflow_reports_the_mask_and_boxes(client):
    body = {"input": {"input_image": uri(scene()), "prompt": "the red circle", "num_inference_steps": STEPS, "seed": 7,
                      "output_format": "jpg"}}
    r = client.post("/v1/models/incontext/object-removal/predictions", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["model"] == "incontext/object-removal" and created["status"] in ("starting", "processing")
    assert created["input"]["input_image"].startswith("data:image/png;base64,<") and created["input"]["prompt"] == "the red circle"
    done = poll(lambda: client.get(created["urls"]["get"]).json(), lambda p: p["status"] in ("succeeded", "failed", "canceled"))
    assert done["status"] == "succeeded", done
    output = done["output"]
    assert set(output) >= {"image", "mask", "boxes"}
    assert fetched(client, output["image"], "RGB").shape == (H, W, 3) and fetched(client, output["mask"]).shape == (H, W)
    assert_boxes_inside(output["boxes"])
    # The same run on the runs API, under the workflow's id.
    assert client.get(f"/v1/runs/{done['id']}").json()["model_id"] == "object-removal"


def test_a_bfl_request_for_a_workflow_reports_the_mask_and_boxes(client):
    buf = io.BytesIO()
    scene().save(buf, "PNG")
    bare = base64.b64encode(buf.getvalue()).decode()  # as BFL clients send images
    body = {"input_image": bare, "input_image_2": uri(backdrop()), "steps": STEPS, "seed": 7}
    r = client.post("/v1/background-replace", json=body, headers={"x-key": "key-a"})
    assert r.status_code == 200, r.text
    submitted = r.json()
    result = poll(lambda: client.get(submitted["polling_url"], headers={"x-key": "key-a"}).json(),
                  lambda b: b["status"] in ("Ready", "Error"))
    assert result["status"] == "Ready", result
    sample, mask = fetched(client, result["result"]["sample"], "RGB"), fetched(client, result["result"]["mask"])
    assert sample.shape == (H, W, 3) and mask.shape == (H, W)
    # What the model left alone is the input's, bit for bit.
    assert np.array_equal(sample[mask == 0], np.asarray(scene())[mask == 0])
    assert_boxes_inside(result["result"]["boxes"])


@pytest.mark.parametrize(
    "path, body, headers, status, named",
    [
        # Kontext's list of images is not a background: background-replace says which field it needs.
        ("/v1/models/incontext/background-replace/predictions", {"input": {"input_images": [uri(scene()), uri(backdrop())]}}, {},
         422, ("invalid_fields", "field", "input.input_image", "input.reference_image")),
        ("/v1/models/incontext/logo-placement/predictions", {"input": {"input_image": uri(scene()), "logo_image": NOT_AN_IMAGE}}, {},
         422, ("invalid_fields", "field", "input.logo_image")),
        ("/v1/logo-placement", {"input_image": uri(scene())}, {"x-key": "key-a"}, 422, ("detail", "loc", ["body", "logo_image"])),
        ("/v1/segmentation", {"input_image": uri(scene()), "prompt": "the red circle", "output_format": "jpeg"}, {"x-key": "key-a"},
         422, ("detail", "loc", ["body", "output_format"])),
        ("/v1/models/incontext/no-such-workflow/predictions", {"input": {"input_image": uri(scene()), "prompt": "x"}}, {}, 404, None),
    ],
    ids=["replicate-kontext-images", "replicate-bad-logo", "bfl-missing-logo", "bfl-segmentation-jpeg", "replicate-unknown"],
)
def test_a_wrong_field_combination_is_refused_naming_the_field(client, path, body, headers, status, named):
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    if named is None:
        assert "unknown model 'incontext/no-such-workflow'" in r.text
        return
    key, attribute, *fields = named
    assert [e[attribute] for e in r.json()[key]] == fields
