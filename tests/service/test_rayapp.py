"""The Ray Serve application (service/rayapp.py) on a real local Ray cluster and a real
PostgreSQL: CPU workers on the tiny model, runs over HTTP through the Serve proxy.

A minute or two each on two cores: Ray's start-up and each worker's model load count.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import sqlalchemy as sa

from incontext.settings import Settings

from .helpers import cli, create_key, data_uri, free_port, wait_for, wait_run

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'incontext[ray]')")
serve = pytest.importorskip("ray.serve")
rayapp = pytest.importorskip("incontext.service.rayapp")

MODEL = "flux-pro/kontext"
BODY = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 8}}


@pytest.fixture(scope="module")
def serve_port():
    """A local Ray cluster of two logical CPUs (the two workers' 0.9 and the API's 0.1), and
    Serve's proxy on a free port."""
    env = {
        # The autoscaler's inputs every half second rather than every ten, so a test sees it act.
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "OMP_NUM_THREADS": "1",  # one torch thread per worker: two cores, shared
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the local cluster's processes inherit them
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings(data_dir, model_dir, postgres_url, port, **overrides) -> Settings:
    """`model_dir` None: the bundled nano model."""
    return Settings(
        data_dir=data_dir,
        database_url=postgres_url,
        model_dir=model_dir,
        port=port,
        poll_interval_seconds=0.2,
        engine_compile=False,
        lease_seconds=3,
        engine_max_attempts=5,  # a busy 2-core machine may stall a live worker past a lease
        progress_log_every_steps=1,
        **overrides,
    )


def _workers_running() -> int:
    app = serve.status().applications.get(rayapp.APP_NAME)
    if app is None or "Worker" not in app.deployments:
        return 0
    return app.deployments["Worker"].replica_states.get("RUNNING", 0)


# Requests in flight at once where a test posts, cancels or reads 120 runs: one at a time, each
# waited out its round trip through Serve's proxy (0.1-0.2 s on two busy cores), which made up
# most of that test. httpx.Client is safe to share between threads. (Not for waiting on runs
# still in progress: eight pollers would take the CPU from the workers they wait for.)
HTTP_THREADS = 8


def _each(fn, items) -> list:
    """fn(item) for every item, HTTP_THREADS at a time; in order; the first exception raised."""
    with ThreadPoolExecutor(HTTP_THREADS) as pool:
        return list(pool.map(fn, items))


def _assert_each_succeeded_once(api, run_ids, cost="0.04"):
    for run_id in run_ids:
        run = wait_run(api, run_id, timeout=240)
        assert (run["status_code"], run["cost"]) == ("succeeded", cost), run
        messages = [entry["message"] for entry in api.get(f"/v1/runs/{run_id}/logs").json()["items"]]
        assert messages.count("succeeded") == 1 and messages[-1] == "succeeded", messages


def _sample(text: str, name: str, **labels) -> float:
    """The sum of the exposition's samples called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _client(port, key):
    import httpx

    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_serve_engine_ray_refuses_sqlite(tmp_path):
    result = cli("serve", "--engine", "ray", "--data-dir", str(tmp_path), env={"INCONTEXT_DATABASE_URL": ""})
    assert result.returncode == 2 and "needs a PostgreSQL database" in result.stderr, result.stderr


def test_a_killed_worker_replica_loses_no_run_and_doubles_none(tmp_path, postgres_url, serve_port):
    """Two worker replicas, 12 runs; one worker's process is SIGKILLed with a run on its engine. Its leases
    run out, the other worker's reaper requeues them and a worker runs them: every run
    succeeds once, its cost counted once."""
    settings = _settings(tmp_path / "data", None, postgres_url, serve_port)  # the bundled model, as users run it
    key = create_key(settings.data_dir, env={"INCONTEXT_DATABASE_URL": postgres_url})
    scaling = rayapp.Scaling(replicas=2, cpus_per_replica=0.9, drain_s=5)
    serve.run(rayapp.build(settings, scaling), name=rayapp.APP_NAME, route_prefix="/")
    db = sa.create_engine(postgres_url)
    try:
        with _client(serve_port, key) as api:
            run_ids = [api.post(f"/v1/models/{MODEL}/runs", json=BODY).json()["id"] for _ in range(12)]

            def running_mid_edit() -> str | None:
                with db.connect() as conn:
                    return conn.scalar(sa.text(
                        "SELECT worker_id FROM runs WHERE status = 'running'"
                        " AND EXISTS (SELECT 1 FROM run_logs WHERE run_id = runs.id AND message LIKE 'step %') LIMIT 1"
                    ))

            worker_id = wait_for(running_mid_edit, timeout=240, interval=0.02)
            os.kill(int(worker_id.split(":")[1]), signal.SIGKILL)  # host:pid:random (leases.new_worker_id)
            _assert_each_succeeded_once(api, run_ids)
            usage = api.get("/v1/usage").json()
            assert (usage["runs"], usage["images"], usage["cost"]) == (12, 12, "0.48")
            # The API replica's /metrics sums every replica's counters (the killed one's too):
            # the workers' steps and images, and the reaper's requeue.
            text = api.get("/metrics").text
            assert _sample(text, "incontext_images_total") == 12
            # Steps are batched: their rows add up to at least every run's 8 steps.
            assert _sample(text, "incontext_engine_step_seconds_count") > 0
            assert _sample(text, "incontext_engine_step_rows_sum") >= 8 * 12
            assert _sample(text, "incontext_requeues_total", reason="lease_expired") >= 1
            assert _sample(text, "incontext_queue_depth") == 0
        with db.connect() as conn:
            lost = conn.scalar(sa.text("SELECT count(*) FROM run_logs WHERE message LIKE 'requeued: its worker % stopped renewing its lease%'"))
        assert lost >= 1  # the killed worker's run went through the reaper
    finally:
        serve.delete(rayapp.APP_NAME)
        db.dispose()


# A two-second window: the fixture pushes metrics every half second (the environment variables
# that replace AutoscalingConfig.metrics_interval_s, whose 10 s default Ray still compares with).
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_workers_scale_from_zero_up_on_the_queue_and_back_to_zero(tmp_path, tiny_model, postgres_url, serve_port):
    """min_replicas 0 and no worker running: no replica reports the queue, so the API's wake
    request (waiting at a deployment with no replica) is what makes Ray Serve start one. That
    worker takes one run at a time, the queue would take it minutes, and the autoscaler aims at
    two runs per worker: a second worker starts and ends runs too. Once it has, the rest of the
    queue is canceled: the workers go back to zero, and every run ended once."""
    settings = _settings(tmp_path / "data", tiny_model, postgres_url, serve_port, max_concurrent_runs_per_model=1)
    key = create_key(settings.data_dir, env={"INCONTEXT_DATABASE_URL": postgres_url})
    scaling = rayapp.Scaling(
        replicas=0, min_replicas=0, max_replicas=2, runs_per_replica=2, cpus_per_replica=0.9,
        upscale_delay_s=0, downscale_delay_s=3, look_back_s=2, drain_s=5,
    )
    serve.run(rayapp.build(settings, scaling), name=rayapp.APP_NAME, route_prefix="/")
    db = sa.create_engine(postgres_url)

    def ended_by() -> set[str]:
        with db.connect() as conn:
            return set(conn.scalars(sa.text("SELECT DISTINCT worker_id FROM runs WHERE id = ANY(:ids) AND status = 'succeeded'"), {"ids": run_ids}))

    try:
        assert _workers_running() == 0
        with _client(serve_port, key) as api:
            # The queue must outlast a replica's start (half a minute on two busy cores): the
            # tiny model's edit is about a second at 50 steps, so 120 of them keep one worker
            # busy for minutes. Those left when both workers have ended runs are canceled.
            body = {"input": {**BODY["input"], "num_inference_steps": 50}}
            run_ids = _each(lambda _: api.post(f"/v1/models/{MODEL}/runs", json=body).json()["id"], range(120))
            wait_for(lambda: _workers_running() == 2, timeout=240, interval=0.2)
            wait_for(lambda: len(ended_by()) == 2, timeout=240, interval=0.2)
            # a run that already ended stays as it ended
            _each(lambda run_id: api.post(f"/v1/runs/{run_id}/cancel"), run_ids)
            ended = dict(zip(run_ids, _each(lambda run_id: wait_run(api, run_id, timeout=240), run_ids)))
            succeeded = [run_id for run_id, run in ended.items() if run["status_code"] == "succeeded"]
            assert {run["status_code"] for run in ended.values()} <= {"succeeded", "canceled"}
            _assert_each_succeeded_once(api, succeeded)
            usage = api.get("/v1/usage").json()
            # Canceled runs count as runs, and cost nothing.
            assert (usage["runs"], usage["images"], usage["cost"]) == (120, len(succeeded), str(Decimal("0.04") * len(succeeded)))
        wait_for(lambda: _workers_running() == 0, timeout=120, interval=0.5)
    finally:
        serve.delete(rayapp.APP_NAME)
        db.dispose()
