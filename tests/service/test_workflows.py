"""Workflows over HTTP (issue 20): object-removal, background-replace, logo-placement and
segmentation as model ids on the runs API, run by the real engine on the bundled nano model in
this process. The contract is what is held here (images and masks that decode, boxes inside
the image and consistent with the mask, pixels kept bit for bit where promised, 422s naming
the field), not whether the small model's edits are right."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from incontext.service.app import create_app
from incontext.settings import Settings

from .helpers import textured_scene, wait_run

KEY = {"Authorization": "Bearer key-a"}
W, H = 96, 64
STEPS = 4
IDS = ("object-removal", "background-replace", "logo-placement", "segmentation")


def scene() -> Image.Image:
    return textured_scene((W, H))


def backdrop() -> Image.Image:
    """A reference: blue above, green below."""
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[: H // 2] = (40, 80, 220)
    pixels[H // 2 :] = (40, 180, 60)
    return Image.fromarray(pixels)


def logo() -> Image.Image:
    """A wide yellow logo with a black bar."""
    pixels = np.full((20, 40, 3), (250, 210, 20), np.uint8)
    pixels[8:12, 4:36] = 0
    return Image.fromarray(pixels)


def uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decoded(url: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert(mode))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("workflows"), api_keys=["key-a"], poll_interval_seconds=0.1,
                        engine_mode="thread", engine_compile=False)
    with TestClient(create_app(settings), headers=KEY) as c:
        yield c


def run(client: TestClient, workflow: str, **input_) -> dict:
    """The run, succeeded, its images inline."""
    body = {"image_url": uri(scene()), "num_inference_steps": STEPS, "seed": 7, "sync_mode": True, **input_}
    r = client.post(f"/v1/models/{workflow}/runs", json={"input": body})
    assert r.status_code == 201, r.text
    assert r.json()["model_id"] == workflow
    done = wait_run(client, r.json()["id"], timeout=120)
    assert done["status_code"] == "succeeded", done
    return done


def assert_boxes_inside(boxes: list, width: int = W, height: int = H) -> None:
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def assert_boxes_bound(boxes: list, region: np.ndarray) -> None:
    """Every box holds some of the region, and the boxes together hold all of it."""
    covered = np.zeros_like(region, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        assert region[y0:y1, x0:x1].any()
        covered[y0:y1, x0:x1] = True
    assert not (region & ~covered).any()


def test_object_removal_returns_the_image_and_the_removed_region(client):
    done = run(client, "object-removal", prompt="the red circle")
    (out,) = done["output"]["outputs"]
    image, region = decoded(out["url"]), decoded(out["mask_url"], "L")
    source = np.asarray(scene())
    assert image.shape == source.shape and region.shape == (H, W)
    assert out["content_type"] == "image/png"  # a workflow's default: bit for bit where kept
    # Outside the removed region every pixel is the input's.
    assert np.array_equal(image[region == 0], source[region == 0])
    # Its changed share is the returned image's, after the workflow put pixels back.
    assert out["changed_share"] == round(float(np.any(image != source, axis=-1).mean()), 4)
    assert_boxes_inside(out["boxes"])
    if region.any():
        assert_boxes_bound(out["boxes"], region > 0)
    assert done["input"]["prompt"] == "the red circle" and done["input"]["image_url"].startswith("data:image/png;base64,<")
    assert done["cost"] == "0.04"
    # Listed under the workflow's id, though its edit ran on the default model.
    listed = client.get("/v1/runs", params={"model_id": "object-removal"}).json()["items"]
    assert done["id"] in [r["id"] for r in listed] and {r["model_id"] for r in listed} == {"object-removal"}


def test_segmentation_returns_a_binary_mask_and_boxes_consistent_with_it(client):
    done = run(client, "segmentation", prompt="the red circle")
    (out,) = done["output"]["outputs"]
    image, mask = decoded(out["url"], "L"), decoded(out["mask_url"], "L")
    assert mask.shape == (H, W)  # the input's own size, not the model's
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(image, mask)  # the run's image is the mask
    assert out["changed_share"] is None  # a mask, not an edit of the input
    assert_boxes_inside(out["boxes"])
    # Each box is a region of the mask; the mask outside the boxes is specks (each under a
    # thousandth of the image), at most a few of them.
    covered = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in out["boxes"]:
        assert (mask[y0:y1, x0:x1] > 0).any()
        covered[y0:y1, x0:x1] = True
    assert ((mask > 0) & ~covered).mean() < 0.02


def test_the_removal_workflows_ask_the_model_for_a_mask_beside_the_removal(client, monkeypatch):
    # Each run's two edits reach the engine together (one batch), same input, same seed: the
    # removal and the model's drawing of a mask of the thing, which picks what was meant.
    from incontext.engine.local import LocalEngine

    seen = []
    edit = LocalEngine.edit

    async def recording(self, request, on_progress=None):
        seen.append(request)
        return await edit(self, request, on_progress)

    cancelled = []
    cancel = LocalEngine.cancel

    def recording_cancel(self, request_id):
        cancelled.append(request_id)
        return cancel(self, request_id)

    monkeypatch.setattr(LocalEngine, "edit", recording)
    monkeypatch.setattr(LocalEngine, "cancel", recording_cancel)
    for workflow in ("segmentation", "object-removal"):
        seen.clear()
        cancelled.clear()
        done = run(client, workflow, prompt="the red circle")
        # The bundled model's selector picks the circle: a segmentation needs no removal then.
        assert cancelled == ([done["id"]] if workflow == "segmentation" else [])
        removal, drawing = sorted(seen, key=lambda r: r.request_id)
        assert (removal.request_id, drawing.request_id) == (done["id"], done["id"] + "/select")
        assert (removal.prompt, drawing.prompt) == ("remove the red circle", "make a mask of the red circle")
        assert drawing.seed == removal.seed and drawing.num_images == 1
        assert drawing.thing_mask and not removal.thing_mask  # a mask request: the bundled model's selector answers it
        assert np.array_equal(np.asarray(drawing.image), np.asarray(removal.image))
    seen.clear()
    run(client, "background-replace", reference_image_url=uri(backdrop()))
    assert len(seen) == 1  # the other workflows make one edit


def test_background_replace_keeps_every_pixel_outside_its_change_region(client):
    done = run(client, "background-replace", reference_image_url=uri(backdrop()))
    (out,) = done["output"]["outputs"]
    image, region = decoded(out["url"]), decoded(out["mask_url"], "L")
    source = np.asarray(scene())
    assert image.shape == source.shape
    assert np.array_equal(image[region == 0], source[region == 0])
    assert_boxes_inside(out["boxes"])
    assert done["input"]["reference_image_url"].startswith("data:image/png;base64,<")
    # Only the backdrop may change: the circle and the square (but for a pixel of rim) are the input's.
    yy, xx = np.mgrid[: source.shape[0], : source.shape[1]]
    subject = ((xx - 24) ** 2 + (yy - 32) ** 2 < 12**2) | ((yy >= 17) & (yy < 47) & (xx >= 61) & (xx < 87))
    assert np.array_equal(image[subject], source[subject]) and not (region[subject] > 0).any()


def test_logo_placement_with_a_mask_changes_nothing_outside_it(client):
    mask = np.zeros((H, W), np.uint8)
    mask[40:60, 60:92] = 255
    done = run(client, "logo-placement", logo_image_url=uri(logo()), mask_image_url=uri(Image.fromarray(mask, "L")))
    (out,) = done["output"]["outputs"]
    image, source = decoded(out["url"]), np.asarray(scene())
    assert np.array_equal(image[mask == 0], source[mask == 0])
    assert out["placement"] == [60, 40, 92, 60]  # the mask's bounding box
    # The logo's own pixels, its 2:1 fitted to the box (32 × 16, centred): yellow, and the black bar.
    assert tuple(image[44, 76]) == (250, 210, 20) and tuple(image[50, 76]) == (0, 0, 0)


def test_logo_placement_without_a_mask_reports_its_placement_and_keeps_it(client):
    done = run(client, "logo-placement", logo_image_url=uri(logo()))
    (out,) = done["output"]["outputs"]
    x0, y0, x1, y1 = out["placement"]
    assert_boxes_inside([out["placement"]])
    # The logo's 2:1 in a quarter of the image's width and height.
    assert (x1 - x0, y1 - y0) == (24, 12)
    image, source = decoded(out["url"]), np.asarray(scene())
    outside = np.ones((H, W), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(image[outside], source[outside])
    assert out["changed_share"] == round(float(np.any(image != source, axis=-1).mean()), 4) > 0  # the logo counts
    assert "placement" not in done["input"] and "mask_image_url" not in done["input"]  # the echo is what the client sent


@pytest.mark.parametrize(
    "workflow, input_, field, code",
    [
        ("background-replace", {}, "input.reference_image_url", "missing"),
        ("logo-placement", {"logo_image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
         "input.logo_image_url", "INVALID_IMAGE"),
        ("segmentation", {}, "input.prompt", "missing"),
        ("logo-placement", {"logo_image_url": uri(logo()), "mask_image_url": uri(Image.new("L", (W, H), 0))},
         "input.mask_image_url", "INVALID_MASK"),
    ],
    ids=["missing-reference", "non-image-logo", "missing-prompt", "black-mask"],
)
def test_bad_input_is_a_422_naming_the_field(client, workflow, input_, field, code):
    r = client.post(f"/v1/models/{workflow}/runs", json={"input": {"image_url": uri(scene()), **input_}})
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [(e["field"], e["code"]) for e in errors] == [(field, code)]


def test_the_workflows_are_listed_described_and_in_the_openapi_document(client):
    listed = client.get("/v1/models").json()
    cards = {m["id"]: m for m in listed["items"]}
    assert {m["id"] for m in listed["data"]} >= set(IDS)
    spec = client.get("/openapi.json").json()
    for workflow in IDS:
        assert cards[workflow]["kind"] == "workflow" and cards[workflow]["runs_on"] == "incontext/nano"
        card = client.get(f"/v1/models/{workflow}").json()
        assert {i["name"] for i in card["inputs"]} >= {"image_url", "seed", "num_inference_steps"}
        assert card["price_per_image"] == "0.04"
        text = client.get(f"/v1/models/{workflow}/llms.txt").text
        assert text.startswith(f"# {workflow}\n") and f"/v1/models/{workflow}/runs" in text
        op = spec["paths"][f"/v1/models/{workflow}/runs"]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        body = spec["components"]["schemas"][ref]
        input_ref = body["properties"]["input"]["$ref"].rsplit("/", 1)[1]
        assert "image_url" in spec["components"]["schemas"][input_ref]["required"]
    background = client.get("/v1/models/background-replace").json()
    assert next(i for i in background["inputs"] if i["name"] == "reference_image_url")["required"]
    assert "object-removal" in client.get("/v1/docs/workflows.md").text


def test_fal_clients_call_the_workflows_by_their_ids(client):
    fal_key = {"Authorization": "Key key-a"}
    body = {"image_url": uri(scene()), "prompt": "the red circle", "num_inference_steps": STEPS, "seed": 7, "sync_mode": True}
    r = client.post("/fal-ai/segmentation", json=body, headers=fal_key)
    assert r.status_code == 200, r.text
    result = r.json()
    (image,) = result["images"]
    mask = decoded(result["mask"]["url"], "L")
    assert (image["width"], image["height"]) == (W, H) and mask.shape == (H, W)
    assert set(np.unique(mask)) <= {0, 255}
    assert_boxes_inside(result["boxes"])
    # The queue, and an input error named as fal names fields (the body's own).
    queued = client.post("/queue/fal-ai/background-replace", json={"image_url": uri(scene())}, headers=fal_key)
    assert queued.status_code == 422
    assert [(d["loc"], d["type"]) for d in queued.json()["detail"]] == [(["body", "reference_image_url"], "missing")]
    bad = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    queued = client.post("/queue/fal-ai/logo-placement", json={"image_url": uri(scene()), "logo_image_url": bad}, headers=fal_key)
    assert [(d["loc"], d["type"]) for d in queued.json()["detail"]] == [(["body", "logo_image_url"], "INVALID_IMAGE")]
