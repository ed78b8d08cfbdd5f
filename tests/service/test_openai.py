"""The OpenAI-style surface over HTTP against the real server: multipart edits answered
synchronously with n images, as b64_json or URLs; errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from incontext.service.errors import ServiceError
from incontext.service.routes import openai

from .helpers import png_bytes

SHAPES = Path(__file__).parents[2] / "examples" / "shapes.png"  # 256×256 PNG


def edit(server, data: dict, files=None, key: str | None = "alice") -> httpx.Response:
    headers = {}
    if key == "alice":
        headers["Authorization"] = f"Bearer {server.keys[0]}"
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    files = files if files is not None else [("image", ("in.png", png_bytes(), "image/png"))]
    return httpx.post(f"{server.url}/v1/images/edits", data=data, files=files, headers=headers, timeout=300)


def test_edit_returns_n_images_as_b64_json(server, api):
    usage_before = api.get("/v1/usage").json()["images"]
    r = edit(server, {"prompt": "make the square green", "n": "2", "response_format": "b64_json", "seed": "11"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["output_format"] == "png"
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert set(item) == {"b64_json", "revised_prompt"} and item["revised_prompt"] == "make the square green"
        img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert img.format == "PNG" and f"{img.width}x{img.height}" == body["size"]
        assert img.width > img.height  # size=auto keeps the input's aspect ratio

    # A stored run like any other: listed, priced per image, seeds seed + i.
    run = api.get(f"/v1/runs/{r.headers['incontext-run-id']}").json()
    assert run["status_code"] == "succeeded" and run["cost"] == "0.08" and run["model_id"] == "flux-pro/kontext"
    assert [o["seed"] for o in run["output"]["outputs"]] == [11, 12]
    assert api.get("/v1/usage").json()["images"] == usage_before + 2


def test_edit_returns_urls_jpeg_and_maps_size(server):
    r = edit(server, {"prompt": "p", "response_format": "url", "output_format": "jpeg", "size": "1024x1536"})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert set(item) == {"url", "revised_prompt"}
    f = httpx.get(item["url"])  # signed: no key
    assert f.status_code == 200 and f.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(f.content))
    assert img.height > img.width  # 1024x1536 → 2:3, from a wide input


def test_defaults_several_images_and_openai_model_names(server):
    wide, tall = png_bytes((96, 64)), png_bytes((64, 96))
    files = [("image[]", ("a.png", tall, "image/png")), ("image[]", ("b.png", wide, "image/png"))]
    # Up to four images: the first is edited, the others are references; a fifth is refused.
    r = edit(server, {"prompt": "p", "model": "gpt-image-1"}, files=files * 3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image" and r.json()["error"]["code"] == "too_many_images"
    r = edit(server, {"prompt": "p", "model": "gpt-image-1"}, files=files)
    assert r.status_code == 200, r.text
    first = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert first.height > first.width  # the first (tall) image decides the size
    r = edit(server, {"prompt": "p", "model": "gpt-image-1"}, files=files[:1])
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))  # b64_json by default
    assert img.height > img.width
    r = edit(server, {"prompt": "p", "model": "dall-e-2"})
    assert set(r.json()["data"][0]) == {"url", "revised_prompt"}  # dall-e's default is url
    r = edit(server, {"prompt": "p", "model": "black-forest-labs/flux-pro/kontext"})
    assert r.status_code == 200


def test_bad_keys_are_401_in_openai_shape(server):
    for key in (None, "ic_live_wrong"):
        r = edit(server, {"prompt": "p"}, key=key)
        assert r.status_code == 401
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key" and err["message"]


def test_errors_in_openai_shape(server):
    def error(data, files=None, status=400):
        r = edit(server, data, files=files)
        assert r.status_code == status, r.text
        return r.json()["error"]

    e = error({"prompt": "p", "n": "5"})
    assert (e["param"], e["code"], e["type"]) == ("n", "invalid_value", "invalid_request_error")
    assert error({})["param"] == "prompt" and error({})["code"] == "missing_required_parameter"
    assert error({"prompt": "p"}, files=[("other", ("a.txt", b"x", "text/plain"))])["param"] == "image"
    assert error({"prompt": "p", "size": "big"})["param"] == "size"
    assert error({"prompt": "p", "output_format": "webp"})["param"] == "output_format"
    assert error({"prompt": "p", "response_format": "png"})["param"] == "response_format"
    assert error({"prompt": "p", "stream": "true"})["param"] == "stream"
    mask = [("image", ("in.png", png_bytes(), "image/png")), ("mask", ("m.png", png_bytes(), "image/png"))]
    assert error({"prompt": "p"}, files=mask)["param"] == "mask"
    e = error({"prompt": "p"}, files=[("image", ("in.png", b"not an image", "image/png"))])
    assert (e["param"], e["code"]) == ("image", "invalid_image")
    e = error({"prompt": "p", "model": "no-such-model"}, status=404)
    assert (e["param"], e["code"]) == ("model", "model_not_found")


def test_wait_cancels_the_run_when_the_client_disconnects_or_time_runs_out(monkeypatch):
    """The waiting logic alone (a real disconnect was checked by hand against the server:
    a tiny run finishes before any client could hang up)."""
    canceled = []
    monkeypatch.setattr(openai.surfaces, "load_run", lambda service, run_id: SimpleNamespace(status="running"))
    monkeypatch.setattr(openai.surfaces, "cancel_run", lambda service, run_id, reason: canceled.append((run_id, reason)))
    monkeypatch.setattr(openai, "POLL_S", 0.01)

    async def hang_up():
        return {"type": "http.disconnect"}

    async def stay():
        await asyncio.sleep(3600)

    with pytest.raises(ServiceError) as gone:
        asyncio.run(openai.wait_for_run(None, "r1", SimpleNamespace(receive=hang_up)))
    assert gone.value.http_status == 499 and canceled[-1][0] == "r1" and "disconnected" in canceled[-1][1]

    monkeypatch.setattr(openai, "WAIT_TIMEOUT_S", 0.05)
    with pytest.raises(ServiceError) as late:
        asyncio.run(openai.wait_for_run(None, "r2", SimpleNamespace(receive=stay)))
    assert late.value.http_status == 504 and late.value.code == "TIMEOUT" and canceled[-1][0] == "r2"


def test_preserve_and_return_mask(server):
    """preserve=off gives the model's output at its size; the default keeps the input's size.
    return_mask adds the mask and changed_share to each data[] item (our extension)."""
    files = [("image", ("shapes.png", SHAPES.read_bytes(), "image/png"))]
    r = edit(server, {"prompt": "p", "preserve": "off", "return_mask": "true"}, files=files)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert r.json()["size"] == "64x64"  # the tiny model's working size
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
    assert Image.open(io.BytesIO(base64.b64decode(item["mask_b64_json"]))).size == (64, 64)
    assert 0 <= item["changed_share"] <= 1

    r = edit(server, {"prompt": "p", "response_format": "url", "return_mask": "true"}, files=files)
    (item,) = r.json()["data"]
    assert r.json()["size"] == "256x256"  # preserve=auto: the input's own size
    assert set(item) == {"url", "mask_url", "changed_share", "revised_prompt"}
    assert Image.open(io.BytesIO(httpx.get(item["mask_url"]).content)).size == (256, 256)

    e = edit(server, {"prompt": "p", "preserve": "bogus"}).json()["error"]
    assert (e["param"], e["code"]) == ("preserve", "invalid_value")
