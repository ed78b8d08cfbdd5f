"""What a run's output keeps of its input (incontext/service/outputs.py), over HTTP against a
server with the bundled nano model: a trained model edits a region and leaves the rest, so
the kept pixels are really checked (the tiny random model redraws every pixel)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from incontext.models.registry import BUNDLED_NANO_DIR

from .helpers import Server, create_key, data_uri, server_env, wait_run

MODEL = "flux-pro/kontext"
SHAPES = Path(__file__).parents[2] / "examples" / "shapes.png"  # 256×256 PNG
EDIT = {"prompt": "remove the red circle", "image_url": data_uri(SHAPES.read_bytes()), "seed": 0}


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("nano_server")
    srv = Server(data_dir, server_env(BUNDLED_NANO_DIR))
    key = create_key(data_dir)
    srv.start()
    with srv.client(key) as client:
        yield client
    srv.stop()


def edit(api: httpx.Client, **input_) -> dict:
    r = api.post(f"/v1/models/{MODEL}/runs", json={"input": {**EDIT, **input_}})
    assert r.status_code == 201, r.text
    run = wait_run(api, r.json()["id"])
    assert run["status_code"] == "succeeded", run
    return run


def fetch_image(url: str) -> Image.Image:
    """An output's url or mask_url (a signed file URL, or a data URI in sync_mode) as an image."""
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def test_preserve_auto_keeps_the_input_pixels_outside_the_edit_at_the_input_size(nano):
    source = np.asarray(Image.open(SHAPES).convert("RGB"))
    run = edit(nano, output_format="png", return_mask=True)
    (out,) = run["output"]["outputs"]
    assert run["output"]["image_urls"] == [out["url"]]  # images only, no masks
    image, mask = fetch_image(out["url"]), fetch_image(out["mask_url"])
    assert image.format == mask.format == "PNG" and mask.mode == "L"
    assert image.size == mask.size == (out["width"], out["height"]) == (256, 256)  # the input's, not the model's

    pixels, region = np.asarray(image.convert("RGB")), np.asarray(mask)
    assert (region == 0).any() and (region == 255).any()  # an edited region, and the rest
    differs = (pixels != source).any(axis=-1)
    assert not differs[region == 0].any()  # outside the edited region: the input, bit for bit
    assert 0 < out["changed_share"] < 1 and out["changed_share"] == round(float(differs.mean()), 4)


def test_masks_come_inline_in_sync_mode_and_only_when_asked(nano):
    (out,) = edit(nano, sync_mode=True, return_mask=True)["output"]["outputs"]
    assert out["url"].startswith("data:image/jpeg;base64,") and out["mask_url"].startswith("data:image/png;base64,")
    assert fetch_image(out["url"]).size == fetch_image(out["mask_url"]).size == (256, 256)
    (out,) = edit(nano)["output"]["outputs"]
    assert out["mask_url"] is None and 0 < out["changed_share"] < 1


def test_preserve_off_returns_the_model_output_at_its_working_size(nano):
    side = math.isqrt(nano.get(f"/v1/models/{MODEL}").json()["output"]["pixels_per_image"])  # the input is square
    run = edit(nano, output_format="png", preserve="off", return_mask=True)
    assert run["input"]["preserve"] == "off"
    (out,) = run["output"]["outputs"]
    assert (out["width"], out["height"]) == (side, side) == (128, 128)
    assert fetch_image(out["url"]).size == fetch_image(out["mask_url"]).size == (side, side)
    assert 0 < out["changed_share"] <= 1
