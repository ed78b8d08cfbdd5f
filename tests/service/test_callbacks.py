"""Callbacks: envelope, both signature schemes during secret rotation, retries, redelivery."""

from __future__ import annotations

import base64
import hashlib
import hmac

from .helpers import Receiver, data_uri, wait_for, wait_run

MODEL = "flux-pro/kontext"


def verify_standard_webhook(headers: dict, body: bytes, secret: str) -> bool:
    """Standard Webhooks verification, written from the spec, independent of the server code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig.split(",", 1) == ["v1", expected] for sig in headers["webhook-signature"].split(" "))


def test_callback_signed_with_both_secrets_and_retried(server, api):
    receiver = Receiver(fail_first=1)
    try:
        old = api.post("/v1/callback-secrets", json={"label": "old"}).json()
        new = api.post("/v1/callback-secrets", json={"label": "new"}).json()
        assert old["plain_secret"].startswith("whsec_")
        assert set(new) == {"id", "label", "key_prefix", "is_current", "created_at", "disabled_at", "plain_secret"}
        listed = api.get("/v1/callback-secrets").json()  # a bare array, as Runflow answers
        assert {s["id"] for s in listed} >= {old["id"], new["id"]} and all("plain_secret" not in s for s in listed)
        assert [s["id"] for s in listed if s["is_current"]] == [new["id"]]

        run = api.post(
            f"/v1/models/{MODEL}/runs",
            json={"input": {"prompt": "cb", "image_url": data_uri()}, "callback_url": f"{receiver.url}/hook", "metadata": {"k": "v"}},
        ).json()
        wait_run(api, run["id"])
        wait_for(lambda: len(receiver.requests) >= 2, timeout=120)

        first, second = receiver.requests[:2]
        assert first["body"] == second["body"]  # a retry sends the same bytes
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
        for req in (first, second):
            h, body = req["headers"], req["body"]
            # One 64-hex HMAC from the newest secret (Runflow's verifier compares the whole
            # header); during rotation the older secret signs in webhook-signature only.
            assert h["runflow-signature"] == hmac.new(new["plain_secret"].encode(), body, hashlib.sha256).hexdigest()
            for secret in (old["plain_secret"], new["plain_secret"]):
                assert verify_standard_webhook(h, body, secret)
            assert h["runflow-request-id"] == h["webhook-id"]
            assert not verify_standard_webhook(h, body, "whsec_" + base64.b64encode(b"x" * 32).decode())

        envelope = receiver.bodies()[1]
        assert envelope["event"] == "run.completed" and envelope["run_id"] == run["id"] and envelope["status"] == "succeeded"
        assert envelope["metadata"] == {"k": "v"}
        assert envelope["created_at"].endswith("+00:00") and envelope["completed_at"].endswith("+00:00")
        assert envelope["output"]["image_urls"] and envelope["duration_ms"] > 0

        history = wait_for(lambda: (h := api.get(f"/v1/runs/{run['id']}/callback").json()) and h[0]["status"] == "delivered" and h)
        attempts = history[0]["attempts"]
        assert history[0]["callback_url"] == f"{receiver.url}/hook" and history[0]["status_code"] == 200
        assert history[0]["payload"] == envelope and history[0]["max_attempts"] == 4 and history[0]["attempt_count"] == 2
        assert [a["attempt_number"] for a in attempts] == [1, 2]
        assert attempts[0]["status_code"] == 500 and attempts[0]["error_message"]
        assert attempts[1]["status_code"] == 200 and attempts[1]["error_message"] is None
        assert all(a["response_time_ms"] >= 0 for a in attempts)

        redelivery = api.post(f"/v1/runs/{run['id']}/callback-redeliveries")
        assert redelivery.status_code == 201
        wait_for(lambda: len(receiver.requests) >= 3)
        assert receiver.bodies()[2]["run_id"] == run["id"]
        assert receiver.requests[2]["headers"]["webhook-id"] == redelivery.json()["id"]

        # Rotation done: revoke the old secret, and only the new one signs.
        api.delete(f"/v1/callback-secrets/{old['id']}")
        api.post(f"/v1/runs/{run['id']}/callback-redeliveries")
        wait_for(lambda: len(receiver.requests) >= 4)
        assert receiver.requests[3]["headers"]["runflow-signature"] == hmac.new(
            new["plain_secret"].encode(), receiver.requests[3]["body"], hashlib.sha256
        ).hexdigest()
    finally:
        receiver.close()


def test_failing_receiver_gets_bounded_attempts(api):
    receiver = Receiver(fail_first=100)
    try:
        run = api.post(
            f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "cb", "image_url": data_uri()}, "callback_url": f"{receiver.url}/x"}
        ).json()
        wait_run(api, run["id"])
        # INCONTEXT_CALLBACK_MAX_ATTEMPTS=4 in the test server.
        history = wait_for(lambda: (h := api.get(f"/v1/runs/{run['id']}/callback").json()) and h[0]["status"] == "failed" and h, timeout=120)
        assert [a["attempt_number"] for a in history[0]["attempts"]] == [1, 2, 3, 4]
        assert len(receiver.requests) == 4
    finally:
        receiver.close()


def test_unreachable_receiver_is_recorded(api):
    run = api.post(
        f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "cb", "image_url": data_uri()}, "callback_url": "http://127.0.0.1:9/hook"}
    ).json()
    wait_run(api, run["id"])
    history = wait_for(lambda: (h := api.get(f"/v1/runs/{run['id']}/callback").json()) and h[0]["attempts"] and h)
    attempt = history[0]["attempts"][0]
    assert attempt["status_code"] is None and "connection" in attempt["error_message"]


def test_redelivery_needs_an_ended_run_with_a_callback(api):
    run = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "x", "image_url": data_uri()}}).json()
    r = api.post(f"/v1/runs/{run['id']}/callback-redeliveries")
    assert r.status_code == 409 and r.json()["code"] == "CONFLICT"


def test_batch_runs_and_reports(api):
    receiver = Receiver()
    try:
        items = [{"prompt": f"item {i}", "image_url": data_uri(), "client_ref": f"c{i}"} for i in range(3)]
        items[1]["num_images"] = 2
        r = api.post(f"/v1/models/{MODEL}/batches", json={"input": items, "metadata": {"b": 1}, "callback_url": receiver.url})
        assert r.status_code == 201, r.json()
        batch = r.json()
        assert batch["status_code"] == "queued" and batch["counts"]["total"] == 3
        done = wait_for(lambda: (b := api.get(f"/v1/batches/{batch['id']}").json())["status_code"] == "succeeded" and b, timeout=240)
        assert done["cost"] == "0.16" and done["completed_at"]
        runs = api.get(f"/v1/batches/{batch['id']}/items").json()["items"]
        assert [r["client_ref"] for r in runs] == ["c0", "c1", "c2"]
        assert all(r["batch_id"] == batch["id"] and r["status_code"] == "succeeded" for r in runs)
        assert "client_ref" not in runs[0]["input"]
        envelope = wait_for(lambda: receiver.bodies())[0]
        assert envelope["event"] == "run.completed" and envelope["batch_id"] == batch["id"] and envelope["metadata"] == {"b": 1}
        assert len(envelope["output"]["items"]) == 3 and len(receiver.requests) == 1  # one callback per batch
    finally:
        receiver.close()

    bad = [{"prompt": "ok", "image_url": data_uri()}, {"prompt": "bad", "image_url": "data:image/png;base64,AAAA"}]
    r = api.post(f"/v1/models/{MODEL}/batches", json={"input": bad})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "input.1.image_url"
    assert api.post(f"/v1/models/{MODEL}/batches", json={"input": []}).status_code == 422
    assert api.post(f"/v1/models/{MODEL}/batches", json={"input": [bad[0]] * 101}).status_code == 422
