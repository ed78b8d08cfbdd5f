"""Runs over HTTP against the real server and engine (tiny model)."""

from __future__ import annotations

import io
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image

from .helpers import ImageHost, data_uri, png_bytes, wait_run

MODEL = "flux-pro/kontext"
RUN_FIELDS = {
    "id", "model_id", "status_code", "input", "output", "duration_ms", "cost", "cost_breakdown", "client_ref", "batch_id",
    "request_id", "created_at", "started_at", "completed_at", "callback_url", "metadata", "has_logs", "links",
    "failure_code", "failure_message", "failure_stage_code", "parent_run_id",
}


def submit(api, input_=None, model=MODEL, **body):
    payload = {"input": {"prompt": "make the square green", "image_url": data_uri(), **(input_ or {})}, **body}
    return api.post(f"/v1/models/{model}/runs", json=payload)


def test_health_needs_no_key_everything_else_does(server):
    assert httpx.get(f"{server.url}/v1/health").json() == {"ok": True}
    for headers in ({}, {"Authorization": "Bearer ic_live_wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.get(f"{server.url}/v1/runs", headers=headers)
        assert r.status_code == 401
        assert r.json()["code"] == "UNAUTHORIZED" and r.json()["errors"] == []
    r = httpx.post(f"{server.url}/v1/models/{MODEL}/runs", json={})
    assert r.status_code == 401


def test_auth_me(api, server):
    me = api.get("/v1/auth/me").json()
    assert me["label"] == "alice" and server.keys[0].startswith(me["prefix"])


def test_run_lifecycle_outputs_cost_logs(api):
    usage_before = api.get("/v1/usage").json()
    r = submit(api, {"num_images": 2, "seed": 1234, "output_format": "png"}, metadata={"order": 7}, client_ref="ref-1")
    assert r.status_code == 201
    run = r.json()
    assert set(run) == RUN_FIELDS
    assert run["status_code"] == "queued" and run["cost"] == "0.00" and run["output"] is None
    assert run["metadata"] == {"order": 7} and run["client_ref"] == "ref-1" and run["model_id"] == MODEL
    assert run["input"]["image_url"].startswith("data:image/png;base64,<")  # abbreviated echo
    assert r.headers["X-RateLimit-Limit"] and r.headers["X-RateLimit-Remaining"]

    done = wait_run(api, run["id"])
    assert done["status_code"] == "succeeded", done
    assert done["cost"] == "0.08"
    assert done["cost_breakdown"] == {"currency": "USD", "unit": "image", "quantity": 2, "unit_price": "0.04", "total": "0.08"}
    assert done["duration_ms"] > 0 and done["started_at"] and done["completed_at"].endswith("+00:00")
    outputs = done["output"]["outputs"]
    assert [o["seed"] for o in outputs] == [1234, 1235]
    assert done["output"]["image_urls"] == [o["url"] for o in outputs]
    for o in outputs:
        assert o["type"] == "image" and o["content_type"] == "image/png"
        f = httpx.get(o["url"])  # signed URL: no key needed
        assert f.status_code == 200 and f.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(f.content))
        assert img.size == (o["width"], o["height"])
    # Wider input → wider output (aspect ratio of the input is kept by default).
    assert outputs[0]["width"] > outputs[0]["height"]

    messages = [log["message"] for log in api.get(f"/v1/runs/{run['id']}/logs").json()["items"]]
    assert messages[:2] == ["accepted", "started"] and messages[-1] == "succeeded"
    assert any(m.startswith("step ") for m in messages)
    log = api.get(f"/v1/runs/{run['id']}/logs").json()["items"][0]
    assert set(log) == {"id", "run_id", "level_code", "message", "timestamp", "meta"}

    usage = api.get("/v1/usage").json()
    assert usage["images"] == usage_before["images"] + 2
    assert float(usage["cost"]) == round(float(usage_before["cost"]) + 0.08, 6)


def test_request_ids_are_answered_and_recorded_on_runs(api):
    body = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 1}}
    chosen = api.post(f"/v1/models/{MODEL}/runs", json=body, headers={"X-Request-Id": "client-chosen-1"})
    assert chosen.headers["X-Request-Id"] == chosen.json()["request_id"] == "client-chosen-1"
    made = api.post(f"/v1/models/{MODEL}/runs", json=body)
    assert made.headers["X-Request-Id"] == made.json()["request_id"] != ""
    missing = api.get("/v1/runs/no-such-run")  # errors carry one too
    assert missing.status_code == 404 and missing.headers["X-Request-Id"]
    for r in (chosen, made):
        assert wait_run(api, r.json()["id"])["status_code"] == "succeeded"


def test_seed_is_random_when_absent_and_reported(api):
    a = wait_run(api, submit(api).json()["id"])
    assert isinstance(a["output"]["seed"], int) and a["output"]["outputs"][0]["seed"] == a["output"]["seed"]


def test_aliases_and_unknown_model(api):
    r = submit(api, model="black-forest-labs/flux-pro/kontext", input_={"aspect_ratio": "9:16"})
    assert r.status_code == 201
    run = wait_run(api, r.json()["id"])
    out = run["output"]["outputs"][0]
    assert out["height"] > out["width"]
    assert run["model_id"] == "flux-pro/kontext"  # one id per model, whichever alias was called
    r = submit(api, model="no/such/model")
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"


def test_validation_errors_have_one_shape(api):
    r = submit(api, {"num_images": 9, "guidance_scale": 0, "output_format": "gif", "prompt": ""})
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "VALIDATION_ERROR" and body["message"]
    fields = {e["field"] for e in body["errors"]}
    assert {"input.num_images", "input.guidance_scale", "input.output_format", "input.prompt"} <= fields
    assert all({"field", "loc", "message", "code"} <= set(e) for e in body["errors"])

    r = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "x", "image_url": data_uri()}, "callback_url": "x" * 2100})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "callback_url"

    r = submit(api, {"aspect_ratio": "5:1"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "input.aspect_ratio"


def test_bad_image_is_rejected_at_submit_and_nothing_is_queued(api):
    before = len(api.get("/v1/runs", params={"limit": 100}).json()["items"])
    r = submit(api, {"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"})
    assert r.status_code == 422
    assert r.json()["code"] == "INVALID_IMAGE" and r.json()["errors"][0]["field"] == "input.image_url"
    r = submit(api, {"image_url": data_uri(png_bytes(fmt="BMP"), "image/bmp")})
    assert r.status_code == 415 and r.json()["code"] == "UNSUPPORTED_FORMAT"
    r = submit(api, {"image_url": "ftp://example.com/a.png"})
    assert r.status_code == 422 and r.json()["code"] == "IMAGE_FETCH_FAILED"
    assert len(api.get("/v1/runs", params={"limit": 100}).json()["items"]) == before


def test_safety_tolerance_accepts_int_and_string(api):
    assert submit(api, {"safety_tolerance": 5}).json()["input"]["safety_tolerance"] == "5"
    assert submit(api, {"safety_tolerance": "1"}).status_code == 201
    r = submit(api, {"safety_tolerance": 7})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "input.safety_tolerance"


def test_idempotency_key_replays_or_conflicts(api):
    headers = {"Idempotency-Key": "order-42"}
    body = {"input": {"prompt": "idem", "image_url": data_uri(), "seed": 5}}
    first = api.post(f"/v1/models/{MODEL}/runs", json=body, headers=headers)
    again = api.post(f"/v1/models/{MODEL}/runs", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    other = api.post(f"/v1/models/{MODEL}/runs", json={**body, "metadata": {"x": 1}}, headers=headers)
    assert other.status_code == 409 and other.json()["code"] == "CONFLICT"


def test_a_key_sees_only_its_own_runs(server, api):
    run = submit(api).json()
    with server.client(server.keys[1]) as bob:
        r = bob.get(f"/v1/runs/{run['id']}")
        assert r.status_code == 404 and r.json()["code"] == "RUN_NOT_FOUND"
        assert bob.post(f"/v1/runs/{run['id']}/cancel").status_code == 404
        assert bob.get(f"/v1/runs/{run['id']}/logs").status_code == 404
        assert run["id"] not in {r["id"] for r in bob.get("/v1/runs").json()["items"]}


def test_list_filter_and_paginate(api):
    ids = [submit(api, client_ref=f"page-{i}").json()["id"] for i in range(3)]
    for run_id in ids:
        wait_run(api, run_id)
    seen, cursor = [], None
    while True:
        page = api.get("/v1/runs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))  # newest first, no repeats
    assert set(ids) <= set(seen)
    succeeded = api.get("/v1/runs", params={"status": "succeeded", "model_id": "black-forest-labs/flux-pro/kontext", "limit": 100}).json()
    assert set(ids) <= {r["id"] for r in succeeded["items"]}
    assert {r["status_code"] for r in succeeded["items"]} == {"succeeded"}
    assert api.get("/v1/runs", params={"status": "bogus"}).status_code == 422
    statuses = api.get("/v1/runs/statuses").json()["items"]
    assert {s["code"] for s in statuses} >= {"queued", "dispatching", "running", "succeeded", "failed", "canceled", "partial_succeeded"}
    assert {s["code"] for s in statuses if s["terminal"]} == {"succeeded", "failed", "canceled", "partial_succeeded"}


def test_output_urls_are_signed(api):
    run = wait_run(api, submit(api).json()["id"])
    url = run["output"]["image_urls"][0]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url.replace("sig=", "sig=x")).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403
    parts = urlsplit(url)
    r = httpx.get(urlunsplit(parts._replace(query=parts.query.replace("expires=", "expires=9"))))
    assert r.status_code == 403 and r.json()["code"] == "PERMISSION_DENIED"


def test_polling_with_if_none_match_gets_304_until_the_run_changes(api):
    # Slow enough to be read before it ends; sync_mode (data URIs, not signed URLs, in the hold
    # after it ends) keeps an ended run's body byte for byte the same, had it succeeded before the cancel.
    run_id = submit(api, {"sync_mode": True, "num_inference_steps": 50, "num_images": 4}).json()["id"]
    first = api.get(f"/v1/runs/{run_id}")
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-cache"
    assert first.json()["status_code"] in ("queued", "running")
    api.post(f"/v1/runs/{run_id}/cancel")
    done = wait_run(api, run_id)
    changed = api.get(f"/v1/runs/{run_id}", headers={"If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and changed.json() == done
    tag = changed.headers["ETag"]
    assert tag != first.headers["ETag"] and tag.startswith('"')  # strong: no W/
    for held in (tag, f'"stale", W/{tag}'):
        same = api.get(f"/v1/runs/{run_id}", headers={"If-None-Match": held})
        assert same.status_code == 304 and same.content == b""
        assert same.headers["ETag"] == tag and same.headers["Cache-Control"] == "no-cache"
        assert same.headers["X-RateLimit-Limit"] == "6000"  # a 304 is counted as a read


def test_an_old_copy_of_signed_urls_is_never_answered_304(api):
    run_id = submit(api).json()["id"]
    wait_run(api, run_id)
    first = api.get(f"/v1/runs/{run_id}")
    time.sleep(1.1)  # URLs are signed at each read, to the second
    later = api.get(f"/v1/runs/{run_id}", headers={"If-None-Match": first.headers["ETag"]})
    assert later.status_code == 200 and later.headers["ETag"] != first.headers["ETag"]
    assert later.json()["output"]["image_urls"] != first.json()["output"]["image_urls"]


def test_multi_turn_uses_own_output_without_fetching(api):
    first = wait_run(api, submit(api).json()["id"])
    url = first["output"]["image_urls"][0]
    # Point the host at an address nothing listens on: the URL must be resolved from storage.
    unreachable = urlunsplit(urlsplit(url)._replace(netloc="127.0.0.1:9"))
    second = submit(api, {"image_url": unreachable, "prompt": "now make it red"})
    assert second.status_code == 201, second.json()
    assert second.json()["parent_run_id"] == first["id"]
    assert wait_run(api, second.json()["id"])["status_code"] == "succeeded"


def test_http_image_url_is_fetched(api):
    host = ImageHost({"/a.png": (200, png_bytes()), "/moved": (302, b"/a.png"), "/missing": (404, b"")})
    try:
        ok = submit(api, {"image_url": f"{host.url}/moved"})
        assert ok.status_code == 201, ok.json()
        assert wait_run(api, ok.json()["id"])["status_code"] == "succeeded"
        missing = submit(api, {"image_url": f"{host.url}/missing"})
        assert missing.status_code == 422 and missing.json()["code"] == "IMAGE_FETCH_FAILED"
    finally:
        host.close()
    refused = submit(api, {"image_url": "http://127.0.0.1:9/nothing.png"})
    assert refused.status_code == 422 and refused.json()["code"] == "IMAGE_FETCH_FAILED"


def test_preserve_must_be_auto_or_off(api):
    r = submit(api, {"preserve": "bogus"})
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR"
    assert [e["field"] for e in r.json()["errors"]] == ["input.preserve"]
    assert "auto" in r.json()["errors"][0]["message"]


def test_malformed_json_is_400_and_misplaced_fields_are_refused(api):
    r = api.post(f"/v1/models/{MODEL}/runs", content=b'{"input": {', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "BAD_REQUEST"
    r = submit(api, {"callback_url": "https://example.com/hook"})
    assert r.status_code == 422 and "top level" in r.json()["message"]
