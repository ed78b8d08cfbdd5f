"""The same server on PostgreSQL: a throwaway cluster (conftest.postgres_url) when the binaries are here."""

from __future__ import annotations

import sqlalchemy as sa

from .helpers import Server, create_key, data_uri, server_env, wait_for, wait_run

MODEL = "flux-pro/kontext"


def test_runs_batches_and_restart_on_postgres(tmp_path, tiny_model, postgres_url):
    env = {"INCONTEXT_DATABASE_URL": postgres_url}
    srv = Server(tmp_path / "data", server_env(tiny_model, **env))
    key = create_key(srv.data_dir, env=env)
    assert not (srv.data_dir / "incontext.db").exists()  # the key went to PostgreSQL
    srv.start()
    try:
        with srv.client(key) as api:
            run = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "p", "image_url": data_uri(), "num_images": 2}}, headers={"Idempotency-Key": "k"}).json()
            assert wait_run(api, run["id"])["cost"] == "0.08"
            again = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "p", "image_url": data_uri(), "num_images": 2}}, headers={"Idempotency-Key": "k"})
            assert again.json()["id"] == run["id"]
            items = [{"prompt": f"b{i}", "image_url": data_uri()} for i in range(3)]
            batch = api.post(f"/v1/models/{MODEL}/batches", json={"input": items}).json()
            done = wait_for(lambda: (b := api.get(f"/v1/batches/{batch['id']}").json())["completed_at"] and b, timeout=240)
            assert done["status_code"] == "succeeded"
            slow = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 50}}).json()
            assert api.post(f"/v1/runs/{slow['id']}/cancel").json()["status_code"] == "canceled"
            usage = api.get("/v1/usage").json()
            assert (usage["runs"], usage["images"], usage["cost"]) == (5, 5, "0.20")
        srv.stop()
        srv.start()  # migrations are idempotent; state is in PostgreSQL
        with srv.client(key) as api:
            assert api.get(f"/v1/runs/{run['id']}").json()["status_code"] == "succeeded"
            assert len(api.get("/v1/runs", params={"limit": 100}).json()["items"]) == 5
    finally:
        srv.stop()


def test_two_servers_on_one_postgres_end_every_run_once_when_one_is_killed_mid_run(tmp_path, tiny_model, postgres_url):
    """Two server processes (workers) on one PostgreSQL and one data dir, runs posted to both;
    one is SIGKILLed with runs on its engine. Its leases run out, the other's reaper takes
    the runs back and runs them: every run succeeds once, its cost counted once."""
    env = server_env(
        tiny_model,
        INCONTEXT_DATABASE_URL=postgres_url,
        INCONTEXT_ENGINE_MODE="thread",  # the kill takes the engine with it, as a worker's death does
        INCONTEXT_LEASE_SECONDS="3",
        INCONTEXT_ENGINE_MAX_ATTEMPTS="5",  # a busy 2-core machine may stall a live worker past a lease
        INCONTEXT_PROGRESS_LOG_EVERY_STEPS="1",
    )
    data_dir = tmp_path / "data"
    first, second = Server(data_dir, env), Server(data_dir, env)
    key = create_key(data_dir, env={"INCONTEXT_DATABASE_URL": postgres_url})
    db = sa.create_engine(postgres_url)
    first.start()
    second.start()
    try:
        with first.client(key) as api_1, second.client(key) as api_2:
            body = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 8}}
            run_ids = [(api_1 if i % 2 == 0 else api_2).post(f"/v1/models/{MODEL}/runs", json=body).json()["id"] for i in range(10)]

            def held_by_first() -> list[str]:
                with db.connect() as conn:
                    return conn.scalars(sa.text(
                        "SELECT id FROM runs WHERE status = 'running' AND worker_id LIKE :w"
                        " AND EXISTS (SELECT 1 FROM run_logs WHERE run_id = runs.id AND message LIKE 'step %')"
                    ), {"w": f"%:{first.proc.pid}:%"}).all()

            killed_mid_run = wait_for(held_by_first, timeout=240, interval=0.02)
            first.kill()
            for run_id in run_ids:
                run = wait_run(api_2, run_id, timeout=240)
                assert (run["status_code"], run["cost"]) == ("succeeded", "0.04"), run
                messages = [log["message"] for log in api_2.get(f"/v1/runs/{run_id}/logs").json()["items"]]
                assert messages.count("succeeded") == 1 and messages[-1] == "succeeded", messages
            for run_id in killed_mid_run:
                messages = [log["message"] for log in api_2.get(f"/v1/runs/{run_id}/logs").json()["items"]]
                assert any(m.startswith("requeued: its worker") and "stopped renewing its lease (attempt" in m for m in messages), messages
            usage = api_2.get("/v1/usage").json()
            assert (usage["runs"], usage["images"], usage["cost"]) == (10, 10, "0.40")
    finally:
        first.stop()
        second.stop()
        db.dispose()
