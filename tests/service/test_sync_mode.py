"""sync_mode: a run's own answer carries its images as data URIs for outputs.SYNC_HOLD after it
ends; its history (listings, lineage, batch items, later reads) gives signed file URLs, and
the database never holds the images (incontext/service/docs/runs-api.md, "sync_mode")."""

from __future__ import annotations

import base64
import sqlite3
from datetime import datetime, timedelta

import httpx

from incontext.service.outputs import SYNC_HOLD

from .helpers import Receiver, data_uri, wait_for, wait_run

MODEL = "flux-pro/kontext"


def submit(api, **input_) -> str:
    payload = {"input": {"prompt": "make the square green", "image_url": data_uri(), "sync_mode": True, **input_}}
    r = api.post(f"/v1/models/{MODEL}/runs", json=payload)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def database(server) -> sqlite3.Connection:
    return sqlite3.connect(server.data_dir / "incontext.db", timeout=30)


def end_earlier(server, run_id: str, by: timedelta) -> None:
    """Move the run's start and end back, as if it had ended `by` ago."""
    with database(server) as db:
        started, completed = db.execute("SELECT started_at, completed_at FROM runs WHERE id = ?", (run_id,)).fetchone()
        moved = [(datetime.fromisoformat(t) - by).isoformat(sep=" ") for t in (started, completed)]
        db.execute("UPDATE runs SET started_at = ?, completed_at = ? WHERE id = ?", (*moved, run_id))


def inline_bytes(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.endswith(";base64"), url[:60]
    return base64.b64decode(data)


def test_own_answer_is_inline_while_history_and_database_hold_urls(api, server):
    run_id = submit(api, output_format="png", return_mask=True)
    run = wait_run(api, run_id)  # polls GET /v1/runs/{id}: the synchronous answer
    assert run["status_code"] == "succeeded", run
    (own,) = run["output"]["outputs"]
    assert own["url"].startswith("data:image/png;base64,") and own["mask_url"].startswith("data:image/png;base64,")
    assert run["output"]["image_urls"] == [own["url"]]

    # History: the runs list, the lineage and Replicate's predictions list give signed URLs of
    # the same stored files.
    (listed,) = [r for r in api.get("/v1/runs", params={"limit": 100}).json()["items"] if r["id"] == run_id]
    (lineage,) = [r for r in api.get(f"/v1/runs/{run_id}/lineage").json()["items"] if r["id"] == run_id]
    (prediction,) = [p for p in api.get("/v1/predictions").json()["results"] if p["id"] == run_id]
    for output in (listed["output"], lineage["output"]):
        (item,) = output["outputs"]
        assert item["url"].startswith(f"{server.url}/v1/files/{run_id}/") and output["image_urls"] == [item["url"]]
        assert httpx.get(item["url"]).content == inline_bytes(own["url"])
        assert httpx.get(item["mask_url"]).content == inline_bytes(own["mask_url"])
    assert prediction["output"].startswith(f"{server.url}/v1/files/{run_id}/")

    # The database keeps file names, not images.
    with database(server) as db:
        (stored,) = db.execute("SELECT output FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert "data:" not in stored and f"{run_id}/0.png" in stored

    # Past the hold the run's own read is history too.
    end_earlier(server, run_id, SYNC_HOLD + timedelta(seconds=5))
    later = api.get(f"/v1/runs/{run_id}").json()
    (item,) = later["output"]["outputs"]
    assert item["url"].startswith(f"{server.url}/v1/files/{run_id}/0.png?")
    assert httpx.get(item["url"]).content == inline_bytes(own["url"])


def test_callback_carries_data_uris_and_its_history_does_not_keep_them(api, server):
    receiver = Receiver()
    try:
        r = api.post(f"/v1/models/{MODEL}/runs", json={
            "input": {"prompt": "p", "image_url": data_uri(), "sync_mode": True}, "callback_url": receiver.url,
        })
        run_id = r.json()["id"]
        (sent,) = wait_for(lambda: receiver.bodies() or None, timeout=240)
    finally:
        receiver.close()
    assert sent["run_id"] == run_id and sent["output"]["outputs"][0]["url"].startswith("data:image/jpeg;base64,")

    def delivered():
        deliveries = api.get(f"/v1/runs/{run_id}/callback").json()
        return deliveries if deliveries and deliveries[0]["status"] == "delivered" else None

    (delivery,) = wait_for(delivered, timeout=30)
    url = delivery["payload"]["output"]["outputs"][0]["url"]
    assert url.startswith("data:image/jpeg;base64,<") and url.endswith(" characters omitted>")
    with database(server) as db:
        (body,) = db.execute("SELECT body FROM callback_deliveries WHERE run_id = ?", (run_id,)).fetchone()
    assert "characters omitted" in body and len(body) < 4000


def test_batch_items_are_history(api, server):
    r = api.post(f"/v1/models/{MODEL}/batches", json={"input": [{"prompt": "p", "image_url": data_uri(), "sync_mode": True}]})
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    wait_for(lambda: api.get(f"/v1/batches/{batch_id}").json()["status_code"] == "succeeded", timeout=240)
    (item,) = api.get(f"/v1/batches/{batch_id}/items").json()["items"]
    assert item["output"]["image_urls"][0].startswith(f"{server.url}/v1/files/{item['id']}/")
    # The item's own read is still its synchronous answer.
    assert api.get(f"/v1/runs/{item['id']}").json()["output"]["image_urls"][0].startswith("data:image/jpeg;base64,")
