"""A client's mask (issue 20): white where the edit may happen, black where the output keeps
the input's pixels bit for bit, on the runs API and the other surfaces, through a chain of
runs, and after a restart. Over HTTP, in process, with the real engine on the bundled nano
model (small inputs: the model works at 128², so an edit takes a second or two)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from incontext.engine.protocol import EditResult
from incontext.errors import IncontextError
from incontext.service import outputs
from incontext.service.app import create_app
from incontext.service.inputs import RunInput
from incontext.service.models import Run
from incontext.service.runparams import RunParams
from incontext.service.storage import Storage
from incontext.settings import Settings

from .helpers import textured_scene, wait_run

KEY = {"Authorization": "Bearer key-a"}
RUNS = "/v1/models/flux-pro/kontext/runs"
W, H = 96, 64
STEPS = 4  # enough for the model to redraw the picture; the test is where it may


def scene() -> Image.Image:
    return textured_scene((W, H))


def left_mask(columns: int = W // 2, size: tuple[int, int] = (W, H)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, :columns] = 255
    return Image.fromarray(mask, mode="L")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def decoded(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # The real engine, in this process (engine_mode thread), on the default (bundled nano) model.
    settings = Settings(data_dir=tmp_path_factory.mktemp("masks"), api_keys=["key-a"], poll_interval_seconds=0.1,
                        engine_mode="thread", engine_compile=False)
    with TestClient(create_app(settings), headers=KEY) as c:
        yield c


def edit(client: TestClient, image_url: str, mask_image_url: str | None = None, **input_) -> dict:
    """The run, succeeded, its images inline."""
    body = {"prompt": "make the circle blue", "image_url": image_url, "num_inference_steps": STEPS, "seed": 7,
            "output_format": "png", "sync_mode": True, "return_mask": True, **input_}
    if mask_image_url is not None:
        body["mask_image_url"] = mask_image_url
    r = client.post(RUNS, json={"input": body})
    assert r.status_code == 201, r.text
    run = wait_run(client, r.json()["id"], timeout=120)
    assert run["status_code"] == "succeeded", run
    return run


@pytest.mark.parametrize("preserve", ["auto", "off"])
def test_runs_api_keeps_every_pixel_outside_the_mask(client, preserve):
    source = np.asarray(scene())
    run = edit(client, uri(scene()), uri(left_mask()), preserve=preserve)
    (out,) = run["output"]["outputs"]
    image, region = decoded(out["url"]), decoded(out["mask_url"])[..., 0]
    # At the input's own size (also with preserve off: a mask is honoured at it), the right
    # half is the input's, bit for bit, and the edited region lies inside the mask.
    assert image.shape == source.shape
    assert np.array_equal(image[:, W // 2 :], source[:, W // 2 :])
    assert not region[:, W // 2 :].any()
    assert out["changed_share"] <= 0.5
    assert out["changed_share"] == pytest.approx(float((image != source).any(-1).mean()), abs=1e-4)
    if preserve == "off":
        # The model's raw output in the left half: it did redraw there, so the right half
        # above was kept by the mask, not by a model that changed nothing.
        assert out["changed_share"] > 0.25
    assert run["input"]["mask_image_url"].startswith("data:image/png;base64,<")  # echoed, abbreviated


def test_a_mask_of_another_size_is_stretched_and_mask_url_is_read_as_mask_image_url(client):
    source = np.asarray(scene())
    # A quarter-size mask whose left third is white, sent under fal's name for the field.
    run = edit(client, uri(scene()), None, mask_url=uri(left_mask(8, (24, 16))), preserve="off")
    (out,) = run["output"]["outputs"]
    image = decoded(out["url"])
    assert np.array_equal(image[:, W // 3 :], source[:, W // 3 :])
    assert 0 < out["changed_share"] <= 1 / 3


def test_a_chain_of_runs_keeps_the_pixels_outside_the_mask(client):
    source = np.asarray(scene())
    mask = uri(left_mask())
    first = edit(client, uri(scene()), mask, sync_mode=False)
    # The next turn edits the first's output by its URL (multi-turn), under the same mask.
    second = edit(client, first["output"]["outputs"][0]["url"], mask, prompt="make it darker", preserve="off")
    assert second["parent_run_id"] == first["id"]
    image = decoded(second["output"]["outputs"][0]["url"])
    assert np.array_equal(image[:, W // 2 :], source[:, W // 2 :])


@pytest.mark.parametrize(
    "mask, says",
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not an image"),
        (uri(Image.new("L", (W, H), 0)), "black everywhere"),
    ],
    ids=["not-an-image", "all-black"],
)
def test_an_invalid_mask_is_refused_naming_the_field(client, mask, says):
    r = client.post(RUNS, json={"input": {"prompt": "make the circle blue", "image_url": uri(scene()), "mask_image_url": mask}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "INVALID_MASK" and says in body["message"]
    assert [(e["field"], e["code"]) for e in body["errors"]] == [("input.mask_image_url", "INVALID_MASK")]


def openai_mask(columns: int = W // 2) -> bytes:
    """OpenAI's kind: fully transparent where the image may be edited, opaque elsewhere."""
    rgba = np.full((H, W, 4), 255, np.uint8)
    rgba[:, :columns, 3] = 0
    return png(Image.fromarray(rgba, mode="RGBA"))


def test_openai_images_edits_takes_a_transparent_mask(client):
    source = np.asarray(scene())
    files = [("image", ("in.png", png(scene()), "image/png")), ("mask", ("mask.png", openai_mask(), "image/png"))]
    data = {"prompt": "make the circle blue", "output_format": "png", "preserve": "off", "return_mask": "true", "seed": "7"}
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
    assert image.shape == source.shape
    assert np.array_equal(image[:, W // 2 :], source[:, W // 2 :])
    assert 0.25 < item["changed_share"] <= 0.5  # the transparent half is the model's


@pytest.mark.parametrize("mask", [b"not an image", png(Image.new("RGB", (W, H), "white"))], ids=["not-an-image", "opaque"])
def test_openai_refuses_a_mask_that_is_no_image_or_has_no_transparency(client, mask):
    files = [("image", ("in.png", png(scene()), "image/png")), ("mask", ("mask.png", mask, "image/png"))]
    r = client.post("/v1/images/edits", data={"prompt": "p"}, files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("mask", "invalid_mask")


BLACK = uri(Image.new("L", (W, H), 0))


def test_every_json_surface_names_its_own_mask_field_when_refusing(client):
    image = uri(scene())
    bfl = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "input_image": image, "mask": BLACK}).json()
    assert [(d["loc"], d["type"]) for d in bfl["detail"]] == [(["body", "mask"], "INVALID_MASK")]
    replicate = client.post("/v1/models/black-forest-labs/flux-kontext-pro/predictions",
                            json={"input": {"prompt": "p", "input_image": image, "mask": BLACK}}).json()
    assert [(f["field"], f["type"]) for f in replicate["invalid_fields"]] == [("mask", "INVALID_MASK")]
    fal = client.post("/queue/fal-ai/flux-pro/kontext", json={"prompt": "p", "image_url": image, "mask_url": BLACK}).json()
    assert [(d["loc"], d["type"]) for d in fal["detail"]] == [(["body", "mask_url"], "INVALID_MASK")]


def test_bfl_takes_a_bare_base64_mask(client):
    source = np.asarray(scene())
    bare = base64.b64encode(png(left_mask())).decode()
    body = {"prompt": "make the circle blue", "input_image": uri(scene()), "mask": bare, "output_format": "png", "seed": 7, "preserve": "off"}
    r = client.post("/v1/flux-kontext-pro", json=body)
    assert r.status_code == 200, r.text
    run = wait_run(client, r.json()["id"], timeout=120)
    assert run["status_code"] == "succeeded", run
    sample = client.get(run["output"]["outputs"][0]["url"])
    image = np.asarray(Image.open(io.BytesIO(sample.content)).convert("RGB"))
    assert np.array_equal(image[:, W // 2 :], source[:, W // 2 :])


def test_a_run_read_back_after_a_restart_keeps_its_mask(tmp_path):
    """The output stage of a run the dispatcher read back from storage (after a restart: its
    input decoded again, no mask in memory) reads the mask from storage too, and a run whose
    mask file is gone fails rather than edit where its client forbade it."""
    storage = Storage(tmp_path, secret=b"s", base_url="http://testserver", ttl_seconds=60)
    settings = Settings(data_dir=tmp_path)
    run_id = "0190a0b0-0000-7000-8000-000000000001"
    storage.save_input(run_id, png(scene()))
    storage.save_input_mask(run_id, png(left_mask()))
    params = RunParams(prompt="p", seed=1, num_images=1, guidance_scale=3.5, num_inference_steps=1, output_format="png",
                       width=W, height=H, unit_price_micros=0, preserve="off", mask=True)
    run = Run(id=run_id, params=params.model_dump(mode="json"), input={}, engine_model_id="m")
    read_back = RunInput.fit(scene(), W, H)  # as dispatcher._read_input builds it
    blue = Image.new("RGB", (W, H), (0, 0, 255))
    result = EditResult([blue], [1], 1, change_maps=[np.zeros((H // 16, W // 16), np.float32)])
    stored = outputs.store(run, read_back, result, storage, settings)
    image = np.asarray(Image.open(storage.output_path(stored["outputs"][0]["file"])).convert("RGB"))
    assert np.array_equal(image[:, W // 2 :], np.asarray(scene())[:, W // 2 :])
    assert (image[:, : W // 2] == (0, 0, 255)).all()
    storage.delete_input(run_id)
    with pytest.raises(IncontextError) as lost:
        outputs.store(run, read_back, result, storage, settings)
    assert lost.value.code == "INPUT_LOST"


@pytest.fixture
def http_server(tmp_path):
    """The same app served over real HTTP (uvicorn in a thread), for the CLI's own client."""
    import threading
    import time

    import uvicorn

    from .helpers import free_port

    settings = Settings(data_dir=tmp_path / "data", api_keys=["key-a"], poll_interval_seconds=0.1, engine_mode="thread", engine_compile=False)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_cli_edit_with_server_sends_the_mask(http_server, tmp_path):
    from typer.testing import CliRunner

    from incontext.cli import app

    scene().save(tmp_path / "in.png")
    left_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    r = CliRunner().invoke(app, ["edit", str(tmp_path / "in.png"), "make the circle blue", "-o", str(out), "--seed", "7", "--steps", str(STEPS),
                                 "--preserve", "off", "--mask", str(tmp_path / "mask.png"), "--server", http_server, "--api-key", "key-a"])
    assert r.exit_code == 0, r.output
    image = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(image[:, W // 2 :], np.asarray(scene())[:, W // 2 :])
    assert not np.array_equal(image[:, : W // 2], np.asarray(scene())[:, : W // 2])
