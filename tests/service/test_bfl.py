"""The BFL-style surface over HTTP against the real server: submit → poll → Ready → download,
the webhook and its signatures, errors in FastAPI's `{detail}` shape."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import time
from pathlib import Path

import httpx
from PIL import Image

from .helpers import ImageHost, Receiver, data_uri, png_bytes, wait_for

SHAPES = Path(__file__).parents[2] / "examples" / "shapes.png"  # 256×256 PNG


def b64(data: bytes | None = None) -> str:
    return base64.b64encode(data or png_bytes()).decode()


def poll(url: str, key: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(url, headers={"x-key": key}, timeout=60).json()
        if body["status"] not in ("Pending",):
            return body
        assert time.monotonic() < deadline, f"still Pending after {timeout} s"
        time.sleep(0.1)


def submit(server, body: dict, key: str | None = None, **headers) -> httpx.Response:
    key = key or server.keys[0]
    return httpx.post(f"{server.url}/v1/flux-kontext-pro", json=body, headers={"x-key": key, **headers}, timeout=60)


def test_submit_poll_ready_download(server, api):
    r = submit(server, {"prompt": "make the square green", "input_image": b64(), "seed": 7})
    assert r.status_code == 200, r.text
    sub = r.json()
    assert set(sub) == {"id", "polling_url"}
    assert sub["polling_url"] == f"{server.url}/v1/get_result?id={sub['id']}"

    done = poll(sub["polling_url"], server.keys[0])
    assert done["status"] == "Ready", done
    assert done["id"] == sub["id"] and done["progress"] == 1.0 and done["details"] is None
    result = done["result"]
    assert result["prompt"] == "make the square green" and result["seed"] == 7
    assert result["samples"] == [result["sample"]] and result["duration"] >= 0
    image = httpx.get(result["sample"])  # signed, no key
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"  # BFL's default format
    img = Image.open(io.BytesIO(image.content))
    assert img.format == "PNG" and img.width > img.height  # the input's aspect ratio

    # The same stored run, through the primary API: listed, priced, logged with its surface.
    run = api.get(f"/v1/runs/{sub['id']}").json()
    assert run["model_id"] == "flux-pro/kontext" and run["status_code"] == "succeeded" and run["cost"] == "0.04"
    assert sub["id"] in {r["id"] for r in api.get("/v1/runs", params={"model_id": "flux-pro/kontext", "limit": 100}).json()["items"]}
    logs = [entry["message"] for entry in api.get(f"/v1/runs/{sub['id']}/logs").json()["items"]]
    assert "received through POST /v1/flux-kontext-pro" in logs


def test_bearer_key_data_uri_url_and_aspect_ratio(server):
    host = ImageHost({"/in.png": (200, png_bytes((64, 96)))})
    try:
        bearer = {"Authorization": f"Bearer {server.keys[0]}"}
        for image, ratio, wide in ((data_uri(), "17:10", True), (f"{host.url}/in.png", None, False), (b64(), "9:16", False)):
            body = {"prompt": "p", "input_image": image, "output_format": "jpeg"}
            if ratio:
                body["aspect_ratio"] = ratio
            r = httpx.post(f"{server.url}/v1/flux-kontext-pro", json=body, headers=bearer, timeout=60)
            assert r.status_code == 200, r.text
            done = poll(r.json()["polling_url"], server.keys[0])
            assert done["status"] == "Ready", done
            img = Image.open(io.BytesIO(httpx.get(done["result"]["sample"]).content))
            assert img.format == "JPEG"
            assert (img.width > img.height) == wide, (image[:30], ratio, img.size)
    finally:
        host.close()


def test_bad_keys_are_401_in_bfl_shape(server):
    for headers in ({}, {"x-key": "ic_live_wrong"}, {"Authorization": "Bearer ic_live_wrong"}, {"Authorization": "Basic x"}):
        r = httpx.post(f"{server.url}/v1/flux-kontext-pro", json={"prompt": "p", "input_image": b64()}, headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()) == {"detail"} and isinstance(r.json()["detail"], str)
        r = httpx.get(f"{server.url}/v1/get_result", params={"id": "x"}, headers=headers)
        assert r.status_code == 401 and isinstance(r.json()["detail"], str)


def test_validation_errors_in_fastapi_shape(server):
    def detail(body):
        r = submit(server, body)
        assert r.status_code == 422, r.text
        return {tuple(e["loc"]): e for e in r.json()["detail"]}

    assert ("body", "prompt") in detail({"input_image": b64()})
    assert ("body", "input_image") in detail({"prompt": "p"})
    # A reference is checked as input_image is, and named as sent (input_image_2 absent here).
    errors = detail({"prompt": "p", "input_image": b64(), "input_image_3": b64(), "input_image_4": base64.b64encode(b"not an image").decode()})
    assert set(errors) == {("body", "input_image_4")} and errors[("body", "input_image_4")]["type"] == "INVALID_IMAGE"
    assert ("body", "safety_tolerance") in detail({"prompt": "p", "input_image": b64(), "safety_tolerance": 7})
    assert ("body", "aspect_ratio") in detail({"prompt": "p", "input_image": b64(), "aspect_ratio": "30:1"})
    assert ("body", "webhook_url") in detail({"prompt": "p", "input_image": b64(), "webhook_url": "ftp://x"})
    bad = detail({"prompt": "p", "input_image": base64.b64encode(b"not an image").decode()})
    assert bad[("body", "input_image")]["type"] == "INVALID_IMAGE"
    # Accepted quietly: the documented extras of the hosted API.
    ok = submit(server, {"prompt": "p", "input_image": b64(), "safety_tolerance": 0, "prompt_upsampling": True, "input_image_2": None})
    assert ok.status_code == 200, ok.text


def test_get_result_answers_304_while_unchanged(server, api):
    key = {"x-key": server.keys[0]}
    # Any run of the key can be polled here: one slow enough to be read before it ends, and in
    # sync_mode (no signed URLs), so its ended body stays the same whether canceled or Ready.
    slow = api.post("/v1/models/flux-pro/kontext/runs", json={
        "input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 50, "num_images": 4, "sync_mode": True},
    }).json()
    url = f"{server.url}/v1/get_result?id={slow['id']}"
    pending = httpx.get(url, headers=key)
    assert pending.status_code == 200 and pending.json()["status"] == "Pending"
    assert pending.headers["Cache-Control"] == "no-cache"
    api.post(f"/v1/runs/{slow['id']}/cancel")
    ended = poll(url, server.keys[0])
    changed = httpx.get(url, headers={**key, "If-None-Match": pending.headers["ETag"]})
    assert changed.status_code == 200 and changed.json() == ended and changed.headers["ETag"] != pending.headers["ETag"]
    same = httpx.get(url, headers={**key, "If-None-Match": changed.headers["ETag"]})
    assert same.status_code == 304 and same.content == b""
    assert same.headers["ETag"] == changed.headers["ETag"] and same.headers["X-RateLimit-Limit"]


def test_get_result_never_answers_304_for_older_signed_urls(server):
    key = {"x-key": server.keys[0]}
    sub = submit(server, {"prompt": "p", "input_image": b64()}).json()
    assert poll(sub["polling_url"], server.keys[0])["status"] == "Ready"

    def unchanged() -> httpx.Response | None:
        # `sample` is signed at each read, to the second: two reads in one second are equal.
        first = httpx.get(sub["polling_url"], headers=key)
        again = httpx.get(sub["polling_url"], headers={**key, "If-None-Match": first.headers["ETag"]})
        return again if again.status_code == 304 else None

    same = wait_for(unchanged, timeout=10)
    time.sleep(1.1)
    resigned = httpx.get(sub["polling_url"], headers={**key, "If-None-Match": same.headers["ETag"]})
    assert resigned.status_code == 200 and resigned.headers["ETag"] != same.headers["ETag"]


def test_task_not_found_and_other_keys(server):
    r = httpx.get(f"{server.url}/v1/get_result", params={"id": "no-such-id"}, headers={"x-key": server.keys[0]})
    assert r.status_code == 404
    assert r.json() == {"id": "no-such-id", "status": "Task not found", "result": None, "progress": None, "details": None}
    sub = submit(server, {"prompt": "p", "input_image": b64()}).json()
    other = httpx.get(sub["polling_url"], headers={"x-key": server.keys[1]})
    assert other.status_code == 404 and other.json()["status"] == "Task not found"


def test_canceled_run_is_error(server, api):
    sub = submit(server, {"prompt": "p", "input_image": b64()}).json()
    canceled = api.post(f"/v1/runs/{sub['id']}/cancel").status_code == 200
    done = poll(sub["polling_url"], server.keys[0])
    if canceled:
        assert done["status"] == "Error" and done["details"]["code"] == "CANCELED" and done["result"] is None
    else:  # it finished first
        assert done["status"] == "Ready"


def test_webhook_is_sent_and_signed(server, api):
    receiver = Receiver(fail_first=1)
    secret = "my-webhook-secret"
    try:
        r = submit(server, {"prompt": "hook", "input_image": b64(), "webhook_url": f"{receiver.url}/bfl", "webhook_secret": secret})
        run_id = r.json()["id"]
        wait_for(lambda: len(receiver.requests) >= 2, timeout=120)  # the first answer was a 500: retried
        first, second = receiver.requests[:2]
        assert first["body"] == second["body"] and first["path"] == "/bfl"
        body = receiver.bodies()[1]
        assert body["id"] == run_id and body["status"] == "Ready" and body["result"]["sample"].startswith(server.url)
        assert httpx.get(body["result"]["sample"]).status_code == 200

        h, raw = second["headers"], second["body"]
        assert h["x-webhook-signature"] == "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + raw
        assert h["webhook-signature"] == "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
        assert "runflow-signature" not in h  # the key's callback secrets do not sign these

        history = api.get(f"/v1/runs/{run_id}/callback").json()
        assert history[0]["callback_url"] == f"{receiver.url}/bfl" and history[0]["event"] == "run.completed"
        # Not leaked: the secret is internal.
        assert secret not in api.get(f"/v1/runs/{run_id}").text
    finally:
        receiver.close()


def test_webhook_with_whsec_secret_verifies_as_standard_webhooks(server):
    receiver = Receiver()
    key = b"k" * 32
    secret = "whsec_" + base64.b64encode(key).decode()
    try:
        submit(server, {"prompt": "hook", "input_image": b64(), "webhook_url": receiver.url, "webhook_secret": secret})
        wait_for(lambda: receiver.requests, timeout=120)
        h, raw = receiver.requests[0]["headers"], receiver.requests[0]["body"]
        signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + raw
        assert h["webhook-signature"] == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    finally:
        receiver.close()


def test_preserve_and_return_mask(server):
    """preserve=off gives the model's output at its size; the default keeps the input's size.
    return_mask adds result.mask and result.changed_share (our extension)."""
    sizes = {}
    for preserve in ("off", None):
        body = {"prompt": "p", "input_image": b64(SHAPES.read_bytes()), "return_mask": True}
        if preserve:
            body["preserve"] = preserve
        r = submit(server, body)
        assert r.status_code == 200, r.text
        result = poll(r.json()["polling_url"], server.keys[0])["result"]
        sizes[preserve] = Image.open(io.BytesIO(httpx.get(result["sample"]).content)).size
        assert Image.open(io.BytesIO(httpx.get(result["mask"]).content)).size == sizes[preserve]
        assert 0 <= result["changed_share"] <= 1
    assert sizes == {"off": (64, 64), None: (256, 256)}  # the tiny model's size; the input's

    r = submit(server, {"prompt": "p", "input_image": b64()})
    result = poll(r.json()["polling_url"], server.keys[0])["result"]
    assert "mask" not in result and "changed_share" not in result  # the hosted API's shape unless asked
    errors = submit(server, {"prompt": "p", "input_image": b64(), "preserve": "bogus"})
    assert errors.status_code == 422 and ["body", "preserve"] in [e["loc"] for e in errors.json()["detail"]]
