"""`bench scale`: the Ray Serve application (`incontext serve --engine ray`) against the
single-process server, on one machine.

    incontext bench scale                                   # a throwaway PostgreSQL, results/scale
    incontext bench scale --replicas 1,2 --runs 12 --database-url postgresql+psycopg://…

Each configuration is a real server in a subprocess on loopback, started afresh:
- `single, SQLite`: `incontext serve` as a user first runs it (database, engine, callbacks in
  one process);
- `single, PostgreSQL`: the same process on PostgreSQL, so the database's share of the Ray
  application's cost shows apart from Ray's;
- `ray ×N`: N CPU worker replicas and one API replica on that PostgreSQL, each worker one
  CPU and one torch thread (on a 2-core machine four workers share two cores: the honest
  ceiling is the cores, not the replicas).
For each: `runs` edits submitted at once over HTTP, after one warm-up edit per worker;
throughput is runs ÷ the seconds from the first submission to the last completion.

Then the failover: two workers, `runs` edits, and once one is mid-edit its worker's process is
SIGKILLed. Reported: seconds from the kill to another worker claiming the run (its lease ran
out and a reaper requeued it: `INCONTEXT_LEASE_SECONDS` sets most of this) and to the run's
success, and that every run succeeded once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from incontext.bench.load import _free_port, small_image, wait_healthy

RUNS = "/v1/models/flux-pro/kontext/runs"
RUN_TIMEOUT_S = 900
KEY = "scale-bench-key"


@contextmanager
def _server(out: Path, name: str, database_url: str | None, replicas: int | None, env_extra: dict[str, str]):
    """A server subprocess (replicas None: the single-process one), yielding its base URL."""
    port = _free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="incontext-scale-"))
    env = {
        **os.environ,
        "INCONTEXT_API_KEYS": KEY,
        "INCONTEXT_RATE_LIMIT_PER_MINUTE": "100000",
        "INCONTEXT_ENGINE_COMPILE": "false",  # the eager model everywhere: no build taking the cores
        **env_extra,
    }
    if database_url:
        env["INCONTEXT_DATABASE_URL"] = database_url
    else:
        env.pop("INCONTEXT_DATABASE_URL", None)
    cmd = [sys.executable, "-m", "incontext", "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    if replicas is not None:
        cmd += ["--engine", "ray", "--replicas", str(replicas)]  # each worker one CPU, one torch thread (rayapp.build)
    log = open(out / f"server-{name.replace(' ', '_').replace(',', '').replace('×', 'x')}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, Path(log.name))
        yield url
    finally:
        # SIGINT: a Ray server shuts its cluster down (the workers drain) before it exits; then
        # whatever of its session is left (a local Ray cluster's daemons) goes too.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def _submit(client, n: int, steps: int) -> list[str]:
    body = {"input": {"prompt": "make the red circle blue", "image_url": small_image(), "num_inference_steps": steps}}
    ids = []
    for _ in range(n):
        answer = client.post(RUNS, json=body)
        answer.raise_for_status()
        ids.append(answer.json()["id"])
    return ids


def _wait_all(client, run_ids: list[str], on_poll: Callable[[], None] | None = None) -> dict[str, dict]:
    ended: dict[str, dict] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(ended) < len(run_ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(run_ids) - len(ended)} runs did not end in {RUN_TIMEOUT_S} s")
        for run_id in run_ids:
            if run_id not in ended and (run := client.get(f"/v1/runs/{run_id}").json())["completed_at"] is not None:
                ended[run_id] = run | {"seen_at": time.perf_counter()}
        if on_poll:
            on_poll()
        time.sleep(0.1)
    return ended


def _throughput(url: str, runs: int, steps: int, warm: int) -> dict:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        # One edit per worker first: each loads what it caches on its first edit.
        _wait_all(client, _submit(client, warm, steps))
        started = time.perf_counter()
        ended = _wait_all(client, _submit(client, runs, steps))
        seconds = max(run["seen_at"] for run in ended.values()) - started
    failed = sorted({run["status_code"] for run in ended.values()} - {"succeeded"})
    return {"runs": runs, "seconds": round(seconds, 2), "runs_per_s": round(runs / seconds, 3), "failed": failed}


def _failover(url: str, database_url: str, runs: int, steps: int) -> dict:
    """Kill the worker of a run mid-edit; time its claim by another worker and its success."""
    import httpx
    import sqlalchemy as sa

    db = sa.create_engine(database_url)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            _wait_all(client, _submit(client, 2, steps))
            run_ids = _submit(client, runs, steps)
            mid_edit = sa.text(
                "SELECT id, worker_id FROM runs WHERE id = ANY(:ids) AND status = 'running'"
                " AND EXISTS (SELECT 1 FROM run_logs WHERE run_id = runs.id AND message LIKE 'step %') LIMIT 1"
            )
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                with db.connect() as conn:
                    row = conn.execute(mid_edit, {"ids": run_ids}).first()
                if row:
                    break
                if time.monotonic() > deadline or _all_ended(db, run_ids):
                    raise RuntimeError("no run was seen mid-edit before all ended: give each edit more --steps")
                time.sleep(0.02)
            victim, killed_worker = row
            os.kill(int(killed_worker.split(":")[1]), signal.SIGKILL)  # host:pid:random (leases.new_worker_id)
            killed_at = time.perf_counter()
            claimed: dict[str, float] = {}

            def watch_claim() -> None:
                if claimed:
                    return
                with db.connect() as conn:
                    worker = conn.scalar(sa.text("SELECT worker_id FROM runs WHERE id = :id"), {"id": victim})
                if worker and worker != killed_worker:
                    claimed["at"] = time.perf_counter()

            ended = _wait_all(client, run_ids, on_poll=watch_claim)
            with db.connect() as conn:
                successes = conn.execute(sa.text(
                    "SELECT run_id, count(*) FROM run_logs WHERE run_id = ANY(:ids) AND message = 'succeeded' GROUP BY run_id"
                ), {"ids": run_ids}).all()
    finally:
        db.dispose()
    done_at = ended[victim]["seen_at"]
    return {
        "runs": runs,
        "killed_run_status": ended[victim]["status_code"],
        "kill_to_claim_s": round(claimed.get("at", done_at) - killed_at, 2),
        "kill_to_success_s": round(done_at - killed_at, 2),
        "all_succeeded": all(run["status_code"] == "succeeded" for run in ended.values()),
        "each_succeeded_once": len(successes) == runs and all(count == 1 for _, count in successes),
    }


def _all_ended(db, run_ids: list[str]) -> bool:
    import sqlalchemy as sa

    with db.connect() as conn:
        return not conn.scalar(sa.text("SELECT count(*) FROM runs WHERE id = ANY(:ids) AND completed_at IS NULL"), {"ids": run_ids})


def run_scale(out: Path, *, replicas: tuple[int, ...] = (1, 2, 4), runs: int = 16, steps: int = 8,
              database_url: str | None = None, failover: bool = True, single: bool = True,
              lease_seconds: float | None = None) -> dict:
    """Every configuration in turn; results.json in `out`."""
    from incontext.bench.postgres import throwaway_postgres

    out.mkdir(parents=True, exist_ok=True)
    env = {} if lease_seconds is None else {"INCONTEXT_LEASE_SECONDS": str(lease_seconds)}
    rows: list[dict] = []
    result: dict = {"cpus": os.cpu_count(), "runs": runs, "steps": steps, "rows": rows, "failover": None}

    def measure(name: str, db_url: str | None, n: int | None) -> None:
        with _server(out, name, db_url, n, env) as url:
            rows.append({"config": name, **_throughput(url, runs, steps, warm=n or 1)})
        (out / "results.json").write_text(json.dumps(result, indent=2))

    with (throwaway_postgres() if database_url is None else nullcontext(database_url)) as db_url:
        if single:
            measure("single, SQLite", None, None)
            measure("single, PostgreSQL", db_url, None)
        for n in replicas:
            measure(f"ray ×{n}", db_url, n)
        if failover:
            with _server(out, "ray failover", db_url, 2, env) as url:
                result["failover"] = _failover(url, db_url, runs, steps) | {"lease_seconds": lease_seconds or "default"}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
