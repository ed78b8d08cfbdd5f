"""Cancel, the per-model concurrency cap, rate limits and URL expiry, on a server with a cap
of one run in flight, 8 images per minute per key, and 3-second file URLs."""

from __future__ import annotations

import time

import httpx
import pytest

from .helpers import Receiver, Server, create_key, data_uri, server_env, wait_for, wait_run

MODEL = "flux-pro/kontext"
TTL_S = 3


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_model):
    data_dir = tmp_path_factory.mktemp("strict")
    env = server_env(
        tiny_model,
        INCONTEXT_MAX_CONCURRENT_RUNS_PER_MODEL="1",
        INCONTEXT_RATE_LIMIT_PER_MINUTE="8",
        INCONTEXT_FILE_URL_TTL_SECONDS=str(TTL_S),
        INCONTEXT_PROGRESS_LOG_EVERY_STEPS="1",
    )
    srv = Server(data_dir, env)
    srv.keys = [create_key(data_dir, name) for name in ("cancel", "batch", "limit")]
    srv.start()
    yield srv
    srv.stop()


def submit(client, **input_):
    return client.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "p", "image_url": data_uri(), **input_}})


def steps_logged(client, run_id) -> list[int]:
    return [log["meta"]["step"] for log in client.get(f"/v1/runs/{run_id}/logs").json()["items"] if log["message"].startswith("step")]


def test_cancel_running_and_queued(strict):
    receiver = Receiver()
    with strict.client(strict.keys[0]) as api:
        slow = api.post(
            f"/v1/models/{MODEL}/runs",
            json={"input": {"prompt": "slow", "image_url": data_uri(), "num_inference_steps": 50, "num_images": 4}, "callback_url": receiver.url},
        ).json()
        waiting = submit(api, num_inference_steps=2).json()
        wait_for(lambda: steps_logged(api, slow["id"]), timeout=120)
        # The cap is one run in flight: the second waits in `queued`.
        assert api.get(f"/v1/runs/{waiting['id']}").json()["status_code"] == "queued"

        canceled = api.post(f"/v1/runs/{slow['id']}/cancel")
        assert canceled.status_code == 200
        assert canceled.json()["status_code"] == "canceled" and canceled.json()["cost"] == "0.00"
        again = api.post(f"/v1/runs/{slow['id']}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "CONFLICT"

        # The engine stopped between steps: the freed slot lets the queued run finish,
        # and the canceled run never reached its last step.
        assert wait_run(api, waiting["id"])["status_code"] == "succeeded"
        assert max(steps_logged(api, slow["id"])) < 50
        final = api.get(f"/v1/runs/{slow['id']}").json()
        assert final["status_code"] == "canceled" and final["output"] is None and final["cost"] == "0.00"
        envelope = wait_for(lambda: receiver.bodies())[0]
        assert envelope["event"] == "run.cancelled" and envelope["status"] == "canceled" and envelope["output"] is None
        receiver.close()

        # A queued run is canceled before it starts.
        blocker = submit(api, num_inference_steps=30).json()
        queued = submit(api, num_inference_steps=2).json()
        assert api.post(f"/v1/runs/{queued['id']}/cancel").json()["status_code"] == "canceled"
        assert wait_run(api, blocker["id"])["status_code"] == "succeeded"
        assert api.get(f"/v1/runs/{queued['id']}").json()["started_at"] is None
        usage = api.get("/v1/usage").json()
        assert usage["cost"] == "0.08" and usage["images"] == 2  # only the two succeeded runs


def test_batch_partially_succeeds(strict):
    with strict.client(strict.keys[1]) as api:
        items = [{"prompt": f"i{i}", "image_url": data_uri(), "num_inference_steps": 20} for i in range(3)]
        batch = api.post(f"/v1/models/{MODEL}/batches", json={"input": items}).json()
        runs = api.get(f"/v1/batches/{batch['id']}/items").json()["items"]
        assert api.post(f"/v1/runs/{runs[2]['id']}/cancel").status_code == 200
        done = wait_for(lambda: (b := api.get(f"/v1/batches/{batch['id']}").json())["completed_at"] and b, timeout=240)
        assert done["status_code"] == "partial_succeeded"
        assert done["counts"]["succeeded"] == 2 and done["counts"]["canceled"] == 1 and done["cost"] == "0.08"


def test_output_url_expires(strict):
    with strict.client(strict.keys[1]) as api:
        run = wait_run(api, submit(api, num_inference_steps=1).json()["id"])

        def fresh_url_that_works():
            # Fetched right after signing; retried because a loaded machine may take longer
            # than the TTL between the two requests.
            url = api.get(f"/v1/runs/{run['id']}").json()["output"]["image_urls"][0]
            return httpx.get(url).status_code == 200 and url

        url = wait_for(fresh_url_that_works)
        time.sleep(TTL_S + 1.1)
        expired = httpx.get(url)
        assert expired.status_code == 403 and "expired" in expired.json()["message"]
        assert wait_for(fresh_url_that_works) != url  # every read signs afresh


def test_rate_limit_per_key(strict):
    with strict.client(strict.keys[2]) as api:
        remaining = []
        for _ in range(4):
            r = submit(api, num_inference_steps=1, num_images=2)  # the limit counts images
            assert r.status_code == 201
            assert r.headers["X-RateLimit-Limit"] == "8"
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
        assert remaining == [6, 4, 2, 0]
        refused = submit(api, num_inference_steps=1)
        assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["X-RateLimit-Remaining"] == "0" and int(refused.headers["X-RateLimit-Reset"]) >= 1
    with strict.client(strict.keys[1]) as other:  # another key has its own budget
        assert submit(other, num_inference_steps=1).status_code == 201
