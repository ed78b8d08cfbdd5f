"""`bench speed` over HTTP: the real server in a subprocess, and clients that poll it.

A run's end-to-end latency is from sending its POST to its completion on the server
(`completed_at`: same machine, same clock) plus one GET round trip to read it, so it does not
depend on how often the client polls (see `incontext.bench.speed`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import itertools
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from incontext import imageio
from incontext.bench.speed import (
    POLL_FIRST_S, POLL_MAX_S, SERVER_SPLIT, SERVER_START_TIMEOUT_S, Job, OnStage, Record, Row, closed_loop, warmup_job,
)
from incontext.settings import Settings

log = logging.getLogger(__name__)

COLD_START_S = 60.0  # the cold-start row: the first minute after `serve`, as issue 21 asks
POLL_AGGRESSIVE_S = 0.01  # a careless client: a GET every 10 ms, no backoff


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`incontext serve` in a subprocess, with a fresh data dir and one API key."""

    def __init__(self, directory: Path, threads: int, max_concurrency: int, log_path: Path, compile: bool = True,
                 step_cache: str = "off", compile_dir: Path | None = None):
        """`compile_dir`: where the server finds (or builds) its compiled transformer; None: in its
        fresh data dir, i.e. a machine that has never compiled it."""
        from incontext.models.registry import preset_for_directory

        self.step_cache = step_cache
        self.draws = preset_for_directory(Path(directory)).consensus  # denoisings per output the server runs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "ic_bench_" + secrets.token_urlsafe(24)
        self.data_dir = Path(tempfile.mkdtemp(prefix="incontext-speed-"))
        self.log_path = log_path
        self.env = {
            **os.environ,
            "INCONTEXT_MODEL_DIR": str(directory),
            "INCONTEXT_API_KEYS": self.key,
            "OMP_NUM_THREADS": str(threads),
            "INCONTEXT_MAX_CONCURRENT_RUNS_PER_MODEL": str(max_concurrency),
            "INCONTEXT_MAX_CONCURRENT_RUNS_PER_KEY": str(max_concurrency),  # one client: the engine's batching is measured
            # As the in-process rows: room for every request in flight, and never below the
            # server's default. A model's draws are samples of one batch, so a batch of one
            # (what this was at ×1) ran a consensus model's three draws one after another.
            "INCONTEXT_ENGINE_MAX_BATCH_SIZE": str(max(max_concurrency, Settings().engine_max_batch_size)),
            "INCONTEXT_RATE_LIMIT_PER_MINUTE": "1000000",
            "INCONTEXT_READ_RATE_LIMIT_PER_MINUTE": "0",  # its pollers measure the engine, not the limit
            "INCONTEXT_ENGINE_COMPILE": "true" if compile else "false",
            "INCONTEXT_ENGINE_STEP_CACHE": step_cache,
            **({"INCONTEXT_COMPILE_DIR": str(compile_dir)} if compile_dir else {}),
        }
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> float:
        """Start and wait for /v1/health; returns the seconds from process start to healthy."""
        import httpx

        cmd = [sys.executable, "-m", "incontext", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir), "--log-level", "warning"]
        self.log_file = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        while time.perf_counter() - self.started < SERVER_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"the server did not start in {SERVER_START_TIMEOUT_S} s: see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if getattr(self, "log_file", None):
            self.log_file.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def run_body(job: Job, steps: int, guidance: float) -> dict:
    buf = io.BytesIO()
    job.image.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    # The model's raw output (`preserve` off): the rows' pixels are checked against the
    # engine's (parity), and composing is the dispatcher's time, not the sampler's.
    return {"input": {"prompt": job.prompt, "image_url": uri, "seed": job.seed, "num_inference_steps": steps,
                      "guidance_scale": guidance, "output_format": "png", "sync_mode": True, "preserve": "off"}}


class HttpClient:
    """Sends one run and waits for it, as a client polling GET /v1/runs/{id} would."""

    def __init__(self, server: Server, model_id: str, steps: int, guidance: float, poll_seconds: float):
        import httpx

        from incontext.engine import stepcache

        self.server, self.steps, self.guidance, self.poll_seconds = server, steps, guidance, poll_seconds
        # The server does not report its passes: they are the steps, or with a step cache its
        # count for these steps (as the engine rows measure them), for each of the model's draws.
        self.cache = stepcache.resolve(server.step_cache)
        self.evals = (self.cache.evals(steps) if self.cache else steps) * server.draws
        self.path = f"/v1/models/{model_id}/runs"
        self.local = threading.local()
        self.httpx = httpx
        self.clients: list = []

    def client(self):
        """One connection per client thread, kept alive across its runs."""
        if not hasattr(self.local, "client"):
            self.local.client = self.httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {self.server.key}"}, timeout=600)
            self.clients.append(self.local.client)
        return self.local.client

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def post(self, job: Job) -> tuple[float, float, str]:
        body = run_body(job, self.steps, self.guidance)
        client = self.client()
        sent, sent_wall = time.perf_counter(), time.time()
        response = client.post(self.path, json=body)
        post_ms = (time.perf_counter() - sent) * 1000
        if response.status_code != 201:
            raise RuntimeError(f"the server refused a run: HTTP {response.status_code} {response.text[:300]}")
        return sent, sent_wall, response.json()["id"], post_ms

    def __call__(self, job: Job) -> Record:
        return self.wait(*self.post(job))

    def wait(self, sent: float, sent_wall: float, run_id: str, post_ms: float = math.nan) -> Record:
        client = self.client()
        delay = POLL_FIRST_S
        while True:
            time.sleep(delay)
            delay = min(delay * 1.5, self.poll_seconds)  # as incontext.client polls
            asked = time.perf_counter()
            run = client.get(f"/v1/runs/{run_id}").json()
            observed = time.perf_counter()
            if run["status_code"] in ("succeeded", "failed", "canceled"):
                break
        if run["status_code"] != "succeeded":
            raise RuntimeError(f"run {run_id} {run['status_code']}: {run.get('failure_message')}")
        completed = sent + datetime.fromisoformat(run["completed_at"]).timestamp() - sent_wall
        # Readable one round trip after completion, and no later than this client saw it (the
        # run may have completed while the last GET was on its way).
        done = min(observed, completed + (observed - asked))
        output = run["output"]
        timings = {"post": post_ms, **{k: v for k, v in output["timings_ms"].items() if k in (*SERVER_SPLIT, "compiled_share")}}
        return Record(sent, done, image=imageio.decode_data_uri(output["outputs"][0]["url"]), evals=self.evals,
                      engine_ms=output["timings_ms"]["total"], observed=observed, timings_ms=timings)


def warm_until_compiled(client: "HttpClient", jobs: list[Job], timeout: float = SERVER_START_TIMEOUT_S) -> float:
    """Send warm-up edits at each size of `jobs` until every one reports that all its passes ran
    compiled (`timings_ms.compiled_share`); returns the seconds since the server started."""
    pending = {(j.width, j.height): j for j in jobs}
    deadline = time.perf_counter() + timeout
    while pending:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the server's transformer was not compiled for {sorted(pending)} in {timeout:.0f} s")
        for size, job in list(pending.items()):
            record = client.wait(*client.post(warmup_job(job)))
            if record.timings_ms.get("compiled_share") == 1.0:
                del pending[size]
        if pending:
            time.sleep(2.0)
    return time.perf_counter() - client.server.started


def run_http(directory: Path, jobs: list[Job], *, model_id: str, steps: int, guidance: float, concurrency: list[int],
             threads: int, log_path: Path, on_stage: OnStage, compile_dir: Path | None = None,
             fast_step_cache: str | None = None, cold_seconds: float = COLD_START_S) -> tuple[list[Row], dict]:
    """First a server with the defaults on a machine that has never compiled the model (an
    empty compile dir): one client's back-to-back edits over its first `cold_seconds`. Then the
    exact server at each concurrency, with the compiled transformer of `compile_dir` (None:
    eager), polite pollers, and at the largest concurrency pollers asking every 10 ms; with
    `fast_step_cache`, a server started with that step cache (INCONTEXT_ENGINE_STEP_CACHE) at
    the largest concurrency: what a user who serves the fast preset gets."""
    compile = compile_dir is not None
    rows, server_info = [], None
    if cold_seconds > 0:
        rows.append(_cold_start(directory, jobs, model_id=model_id, steps=steps, guidance=guidance, threads=threads,
                                log_path=log_path.with_name(log_path.stem + "_cold" + log_path.suffix), seconds=cold_seconds,
                                on_stage=on_stage))
    servers = [("HTTP", "off", log_path, concurrency)]
    if fast_step_cache:
        servers.append(("HTTP fast", fast_step_cache, log_path.with_name(log_path.stem + "_fast" + log_path.suffix), [max(concurrency)]))
    for label, step_cache, server_log, levels in servers:
        server = Server(directory, threads, max(concurrency), server_log, compile, step_cache=step_cache, compile_dir=compile_dir)
        try:
            on_stage(f"starting the server ({label})")
            info = _start(server, model_id, steps, guidance, jobs, compile, on_stage)
            server_info = server_info or info  # start-up is the exact server's
            rows += [_closed_loop(server, model_id, steps, guidance, jobs, c, f"{label} ×{c}", on_stage) for c in levels]
            if label == "HTTP":
                c = max(levels)
                rows.append(_closed_loop(server, model_id, steps, guidance, jobs, c, f"{label} aggressive pollers ×{c}", on_stage,
                                         poll=POLL_AGGRESSIVE_S))
        finally:
            server.stop()
    return rows, server_info


def _cold_start(directory: Path, jobs: list[Job], *, model_id: str, steps: int, guidance: float, threads: int, log_path: Path,
                seconds: float, on_stage: OnStage) -> Row:
    """The server's defaults on an empty compile cache: from the moment `serve` starts, one
    polite client sends the edits back to back for `seconds`. Its latencies include the
    model's loading, and anything the server does beside serving (building its compiled
    transformer) shows in them."""
    on_stage(f"cold start: the first {seconds:.0f} s after serve")
    server = Server(directory, threads, 1, log_path)
    client = HttpClient(server, model_id, steps, guidance, POLL_MAX_S)
    records: list[Record] = []
    try:
        server.start()
        t0 = time.perf_counter()
        for i in itertools.count():
            if records and time.perf_counter() - server.started >= seconds:
                break
            records.append(client(jobs[i % len(jobs)]))
        wall = time.perf_counter() - t0
    finally:
        client.close()
        server.stop()
    shares = [r.timings_ms.get("compiled_share", 0.0) for r in records]
    return Row(f"HTTP cold start ×1 (first {seconds:.0f} s)", "http", 1, records, wall,
               {"poll_seconds": POLL_MAX_S, "compiled_share": sum(shares) / len(shares) if shares else 0.0})


def _start(server: Server, model_id: str, steps: int, guidance: float, jobs: list[Job], compile: bool, on_stage: OnStage) -> dict:
    """Start the server and warm it up; the start-up times."""
    healthy = server.start()
    # The first run is the warm-up; its acceptance ends the start-up time.
    first = HttpClient(server, model_id, steps, guidance, POLL_FIRST_S)
    try:
        posted = first.post(warmup_job(jobs[0]))
        accepted = time.perf_counter() - server.started
        first.wait(*posted)
        warm_s = _wait_compiled(first, jobs, on_stage) if compile else None
    finally:
        first.close()
    return {"start_to_healthy_s": healthy, "start_to_first_accepted_s": accepted, "start_to_compiled_s": warm_s}


def _wait_compiled(client: "HttpClient", jobs: list[Job], on_stage: OnStage) -> float:
    # The server compiles in the background and serves eagerly meanwhile (engine/compiled.py):
    # time it once every bucket of the jobs runs compiled, as it does from then on.
    on_stage("waiting for the server's compiled transformer")
    t0 = time.perf_counter()
    warm_s = warm_until_compiled(client, jobs)
    log.info("server compiled for every bucket after %.0f s", time.perf_counter() - t0)
    return warm_s


def _closed_loop(server: Server, model_id: str, steps: int, guidance: float, jobs: list[Job], c: int, name: str,
                 on_stage: OnStage, poll: float = POLL_MAX_S) -> Row:
    on_stage(f"{name.replace('×', '')} concurrent")
    # The latency does not depend on polling (see the module docstring); polling only
    # decides when a closed-loop client sends its next run. Clients back off as
    # incontext.client does: every GET costs the 2-core server CPU the engine needs.
    client = HttpClient(server, model_id, steps, guidance, poll)
    try:
        records, wall = closed_loop(client, jobs, c)
    finally:
        client.close()
    return Row(name, "http", c, records, wall, {"poll_seconds": poll}, step_cache=client.cache is not None)
