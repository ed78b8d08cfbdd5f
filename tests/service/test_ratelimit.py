"""Per-key rate limits: the fixed window itself, and the run-read limit over HTTP (in process,
with an engine that is never asked to edit: only reads are made)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from incontext.service.app import create_app
from incontext.service.ratelimit import RateLimiter
from incontext.settings import Settings

from .helpers import EngineDouble


def test_fixed_window_per_key():
    now = [100.0]
    limiter = RateLimiter(2, window_s=60, clock=lambda: now[0])
    assert [limiter.hit("a").remaining for _ in range(2)] == [1, 0]
    refused = limiter.hit("a")
    assert not refused.allowed and refused.headers()["Retry-After"] == "60"
    assert limiter.hit("b").allowed  # keys are independent
    now[0] += 45
    assert limiter.hit("a").reset_s == 15
    now[0] += 15
    assert limiter.hit("a").allowed  # a new window


class IdleEngine(EngineDouble):
    async def edit(self, request, on_progress=None):
        raise AssertionError("these tests only read")


def test_run_reads_have_their_own_limit_per_key(tmp_path):
    settings = Settings(data_dir=tmp_path, api_keys=["key-a", "key-b"], read_rate_limit_per_minute=3, poll_interval_seconds=5)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_app(settings, engine=IdleEngine())) as client:
        reads = [client.get("/v1/runs", headers=a) for _ in range(2)]
        assert [r.status_code for r in reads] == [200, 200]
        assert [r.headers["X-RateLimit-Remaining"] for r in reads] == ["2", "1"]
        assert client.get("/v1/runs/no-such-run", headers=a).status_code == 404  # a read all the same

        for path in ("/v1/runs", "/v1/runs/no-such-run", "/v1/runs/no-such-run/logs"):
            refused = client.get(path, headers=a)
            assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED", path
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            assert refused.headers["X-RateLimit-Limit"] == "3" and refused.headers["X-RateLimit-Remaining"] == "0"
        bfl = client.get("/v1/get_result", params={"id": "no-such-run"}, headers={"x-key": "key-a"})
        assert bfl.status_code == 429 and "run reads per minute" in bfl.json()["detail"]  # the BFL surface's shape
        assert bfl.headers["Retry-After"]

        assert client.get("/v1/runs", headers=b).status_code == 200  # another key has its own budget
        assert client.get("/v1/runs/statuses", headers=a).status_code == 200  # not a run read


def test_run_reads_are_unlimited_at_zero(tmp_path):
    settings = Settings(data_dir=tmp_path, api_keys=["key-a"], read_rate_limit_per_minute=0, poll_interval_seconds=5)
    with TestClient(create_app(settings, engine=IdleEngine())) as client:
        reads = [client.get("/v1/runs", headers={"Authorization": "Bearer key-a"}) for _ in range(5)]
        assert all(r.status_code == 200 and "X-RateLimit-Limit" not in r.headers for r in reads)
