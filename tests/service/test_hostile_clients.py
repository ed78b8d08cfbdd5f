"""A careless or hostile client, in process (the app with an engine that never finishes, so
runs stay active): slow image hosts do not stall reads, bodies and fields are bounded, bad
URLs and signatures are clean 4xx, and one key cannot take more than its share."""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi.testclient import TestClient

from incontext.service.app import create_app
from incontext.settings import Settings

from .helpers import EngineDouble, data_uri
from .test_outbound import TrickleHost

RUNS = "/v1/models/flux-pro/kontext/runs"
A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


class ParkedEngine(EngineDouble):
    """Takes every edit and never finishes it: runs stay running until the app stops."""

    async def edit(self, request, on_progress=None):
        await asyncio.Event().wait()


def app_client(tmp_path, **overrides) -> TestClient:
    settings = Settings(data_dir=tmp_path, api_keys=["key-a", "key-b"], poll_interval_seconds=5, **overrides)
    return TestClient(create_app(settings, engine=ParkedEngine()))


def test_slow_image_hosts_do_not_stall_reads(tmp_path):
    # More trickling fetches than the thread pool has threads (40): before, they held every
    # thread and reads of every key waited.
    trickle = TrickleHost(interval_s=0.1)
    answers = []
    try:
        with app_client(tmp_path, fetch_private_networks=True, fetch_timeout_seconds=4) as client:
            def submit():
                body = {"input": {"prompt": "p", "image_url": f"{trickle.url}/slow.png"}}
                answers.append(client.post(RUNS, json=body, headers=A))

            posts = [threading.Thread(target=submit) for _ in range(45)]
            for t in posts:
                t.start()
            time.sleep(1.0)
            started = time.monotonic()
            assert client.get("/v1/runs", headers=B).status_code == 200
            assert time.monotonic() - started < 1.0
            for t in posts:
                t.join()
    finally:
        trickle.close()
    assert {(r.status_code, r.json()["code"]) for r in answers} == {(422, "IMAGE_FETCH_FAILED")}


def test_private_addresses_are_refused_on_a_loopback_bind_by_default(tmp_path):
    with app_client(tmp_path) as client:
        for url in ("http://127.0.0.1:9/a.png", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/a.png"):
            r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": url}}, headers=A)
            assert r.status_code == 422 and r.json()["code"] == "IMAGE_FETCH_FAILED"
            assert r.json()["message"] == "image_url could not be fetched"  # nothing about why


def test_bodies_and_fields_are_bounded(tmp_path):
    with app_client(tmp_path, max_request_bytes=64 * 1024) as client:
        big = {"input": {"prompt": "p", "image_url": "data:image/png;base64," + "A" * 100_000}}
        r = client.post(RUNS, json=big, headers=A)
        assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"input": {"prompt": "p", "image_url": "'
            for _ in range(100):
                yield b"A" * 1024
            yield b'"}}'

        r = client.post(RUNS, content=chunks(), headers={**A, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"

        r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}, "metadata": {"x": "y" * 20_000}}, headers=A)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "metadata"
        r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}, "client_ref": "r" * 256}, headers=A)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "client_ref"


def test_unparseable_callback_urls_and_non_ascii_signatures_are_clean_4xx(tmp_path):
    with app_client(tmp_path) as client:
        for url in ("http://[::1/", "http://host:99999/", "http://exa mple.com/"):
            r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}, "callback_url": url}, headers=A)
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "callback_url", url
            batch = client.post("/v1/models/flux-pro/kontext/batches", json={"input": [{"prompt": "p", "image_url": data_uri()}], "callback_url": url}, headers=A)
            assert batch.status_code == 422, url
            bfl = client.post("/v1/flux-kontext-pro", json={"prompt": "p", "input_image": data_uri(), "webhook_url": url}, headers={"x-key": "key-a"})
            assert bfl.status_code == 422, url

        assert client.get("/v1/files/r/0.png", params={"expires": 1, "sig": "é"}).status_code == 403
        own = "http://testserver/v1/files/r/0.png?expires=99999999999&sig=%C3%A9"
        r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": own}}, headers=A)
        assert r.status_code == 422


def test_rate_limit_counts_images_and_a_batch_counts_every_item(tmp_path):
    with app_client(tmp_path, rate_limit_per_minute=6, max_active_images_per_key=100) as client:
        items = [{"prompt": "p", "image_url": data_uri(), "num_images": 2} for _ in range(3)]
        first = client.post("/v1/models/flux-pro/kontext/batches", json={"input": items}, headers=A)
        assert first.status_code == 201 and first.headers["X-RateLimit-Remaining"] == "0"
        refused = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}}, headers=A)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}}, headers=B).status_code == 201


def test_a_key_may_have_only_so_many_images_queued_or_running(tmp_path):
    with app_client(tmp_path, max_active_images_per_key=3) as client:
        one = {"input": {"prompt": "p", "image_url": data_uri()}}
        assert client.post(RUNS, json={"input": {**one["input"], "num_images": 2}}, headers=A).status_code == 201
        assert client.post(RUNS, json=one, headers=A).status_code == 201
        refused = client.post(RUNS, json=one, headers=A)
        assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED" and refused.headers["Retry-After"]
        assert client.post(RUNS, json=one, headers=B).status_code == 201  # another key is not affected


def test_an_unwritable_data_dir_fails_the_request_not_the_server(tmp_path):
    with app_client(tmp_path) as client:
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the inputs directory should be")
        client.app.state.service.storage.inputs = blocked
        r = client.post(RUNS, json={"input": {"prompt": "p", "image_url": data_uri()}}, headers=A)
        assert r.status_code == 507 and r.json()["code"] == "STORAGE_ERROR"
        assert client.get("/v1/runs", headers=A).json()["items"] == []  # nothing half-stored
        assert client.get("/v1/health").status_code == 200


def test_output_urls_stop_working_once_their_key_is_revoked(tmp_path):
    from incontext.service import keys, lifecycle

    with app_client(tmp_path) as client:
        service = client.app.state.service
        urls = {}
        with service.sessions.begin() as session:
            for plain in ("key-a", "key-b"):
                key = keys.find_active(session, plain)
                run = lifecycle.create_run(session, api_key_id=key.id, model_id="m", engine_model_id="m", input={}, params={"unit_price_micros": 0})
                lifecycle.mark_running(session, run.id, from_states=(lifecycle.QUEUED,))
                lifecycle.finish(session, service.storage, run.id, lifecycle.SUCCEEDED, output={"outputs": []})
                urls[plain] = service.storage.signed_url(service.storage.save_output(run.id, 0, b"\x89PNG", "png"))
        assert [client.get(url).status_code for url in urls.values()] == [200, 200]

        with service.sessions.begin() as session:
            keys.revoke_key(session, keys.find_active(session, "key-a").id)
        revoked = client.get(urls["key-a"])
        assert revoked.status_code == 403 and revoked.json()["code"] == "PERMISSION_DENIED"
        assert "revoked" in revoked.json()["message"]
        assert client.get(urls["key-b"]).status_code == 200  # another key's outputs still work
