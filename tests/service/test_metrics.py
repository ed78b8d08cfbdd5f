"""GET /metrics: what an operator's Prometheus sees move when edits run.

The first test is `incontext serve` itself (the engine in its child process, on the tiny
model): an edit moves the images counter and the engine-step histograms, and the database
gauges show it succeeded with nothing left queued. The others run the app in process with an
engine that answers at once: who may scrape, one registry per app, callback outcomes, and a
dead worker's lease taken back."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from incontext.engine.protocol import EditResult
from incontext.models.registry import DEFAULT_MODEL_ID
from incontext.service import leases
from incontext.service.app import create_app
from incontext.service.keys import create_key as create_key_row
from incontext.settings import Settings

from .helpers import EngineDouble, Receiver, Server, create_key, data_uri, server_env, wait_for, wait_run
from .test_lifecycle import new_run

RUNS = "/v1/models/flux-pro/kontext/runs"
EDIT = {"input": {"prompt": "make the square green", "image_url": data_uri()}}
TOKEN = "metrics-token-of-at-least-20-characters"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition: (name, its labels) → value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def total(scraped: dict, name: str, **labels: str) -> float:
    """Summed over the labels not named (e.g. over models)."""
    return sum(v for (n, have), v in scraped.items() if n == name and set(labels.items()) <= have)


# ------------------------------------------------------------ the real server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    srv = Server(tmp_path_factory.mktemp("metrics"), server_env(tiny_model))
    key = create_key(srv.data_dir)
    srv.start()
    yield srv, key
    srv.stop()


def test_an_edit_moves_the_images_counter_the_step_histograms_and_the_run_gauges(served):
    srv, key = served
    before = samples(httpx.get(f"{srv.url}/metrics").text)
    with srv.client(key) as api:
        r = api.post(RUNS, json=EDIT)
        assert r.status_code == 201, r.text
        run = wait_run(api, r.json()["id"])
    assert run["status_code"] == "succeeded", run

    r = httpx.get(f"{srv.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)
    assert total(after, "incontext_images_total") == total(before, "incontext_images_total") + 1
    # The engine runs in the server's child process: its steps reached this process's metrics.
    assert total(after, "incontext_engine_step_seconds_count") > total(before, "incontext_engine_step_seconds_count")
    assert total(after, "incontext_engine_step_seconds_sum") > 0
    assert total(after, "incontext_engine_step_rows_sum") >= total(after, "incontext_engine_step_rows_count") > 0
    assert total(after, "incontext_runs", state="succeeded") >= 1
    assert total(after, "incontext_runs", state="running") == 0
    assert total(after, "incontext_queue_depth") == 0
    assert ("incontext_queue_depth", frozenset({("model", DEFAULT_MODEL_ID)})) in after  # a zero, not a missing series


# ------------------------------------------------------------ in process


class InstantEngine(EngineDouble):
    """Answers every edit at once with its input."""

    async def edit(self, request, on_progress=None):
        return EditResult([request.image] * request.num_images, [request.seed + i for i in range(request.num_images)], 1, timings_ms={"total": 0.0})


def settings(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path, api_keys=["key-a-of-at-least-20-chars"], poll_interval_seconds=0.1, **overrides)


def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, engine=InstantEngine()), headers={"Authorization": "Bearer key-a-of-at-least-20-chars"})


def scrape(c: TestClient, **headers) -> dict:
    r = c.get("/metrics", headers={"Authorization": "", **headers})
    assert r.status_code == 200, r.text
    return samples(r.text)


def scrape_until(c: TestClient, name: str, **labels: str) -> dict:
    """Scrapes until the sample `name` with `labels` is non-zero; the last scrape."""
    scraped = {}

    def moved() -> bool:
        nonlocal scraped
        scraped = scrape(c)
        return bool(value(scraped, name, **labels))

    wait_for(moved, timeout=30)
    return scraped


def test_beyond_loopback_metrics_take_the_metrics_token_and_never_an_api_key(tmp_path):
    beyond = {"host": "0.0.0.0", "accept_noncommercial_license": True}
    with client(settings(tmp_path / "open", **beyond)) as c:
        assert c.get("/metrics").status_code == 404  # no token set: not served at all
    with client(settings(tmp_path / "token", metrics_token=TOKEN, **beyond)) as c:
        assert c.get("/metrics").status_code == 401  # the API key the client sends is not enough
        assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
        assert "incontext_queue_depth" in c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    with pytest.raises(ValueError, match="INCONTEXT_METRICS_TOKEN"):
        settings(tmp_path, metrics_token="short", **beyond)
    with client(settings(tmp_path / "loopback")) as c:
        assert c.get("/metrics", headers={"Authorization": ""}).status_code == 200
    assert "/metrics" not in str(c.app.openapi()["paths"])  # for the scraper, not the API's clients


def test_each_app_counts_its_own_and_both_read_the_database(tmp_path):
    with client(settings(tmp_path / "a")) as a, client(settings(tmp_path / "b")) as b:
        run = a.post(RUNS, json=EDIT).json()
        assert wait_run(a, run["id"], timeout=30)["status_code"] == "succeeded"
        seen_a, seen_b = scrape(a), scrape(b)
    assert value(seen_a, "incontext_images_total", model=DEFAULT_MODEL_ID) == 1
    assert total(seen_b, "incontext_images_total") == 0
    assert value(seen_a, "incontext_runs", model=DEFAULT_MODEL_ID, state="succeeded") == 1
    assert value(seen_b, "incontext_runs", model=DEFAULT_MODEL_ID, state="succeeded") == 0  # its own database


def test_callback_attempts_are_counted_by_outcome(tmp_path):
    receiver = Receiver(fail_first=1)
    try:
        with client(settings(tmp_path, fetch_private_networks=True, callback_backoff_seconds=0.1)) as c:
            r = c.post(RUNS, json={**EDIT, "callback_url": f"{receiver.url}/hook"})
            wait_run(c, r.json()["id"], timeout=30)
            wait_for(lambda: len(receiver.requests) == 2, timeout=30)
            seen = scrape_until(c, "incontext_callback_deliveries_total", outcome="delivered")
    finally:
        receiver.close()
    assert value(seen, "incontext_callback_deliveries_total", outcome="retried") == 1
    assert value(seen, "incontext_callback_deliveries_total", outcome="failed") == 0


def test_a_dead_workers_run_counts_a_lease_expiry_and_a_requeue(tmp_path):
    with client(settings(tmp_path, lease_seconds=1)) as c:
        with c.app.state.service.sessions.begin() as session:
            # A second worker on this database claims a queued run and dies at once: its lease
            # runs out, and this app's reaper (every third of a second) takes the run back.
            key, _ = create_key_row(session)
            run_id = new_run(session, key.id, DEFAULT_MODEL_ID)
            (claimed,), _ = leases.claim(session, "gone:1:dead", lease_s=0.1, cap_per_model=1)
        assert claimed.id == run_id
        seen = scrape_until(c, "incontext_lease_expiries_total")
    assert value(seen, "incontext_lease_expiries_total") == 1
    assert value(seen, "incontext_requeues_total", reason="lease_expired") == 1
    assert value(seen, "incontext_requeues_total", reason="engine_lost") == 0
