"""`bench load`: the HTTP process's memory and a bystander's latency under hostile inputs,
and one key's edit behind another key's batch.

    incontext bench load                      # the bundled model's server, results/load
    incontext bench load --bombs 8 --tricklers 40 --out results/quick-load

The real server (`incontext serve`) in a subprocess on loopback, one scenario after another:
- palette bombs: `bombs` runs at once, each a 39 KB PNG of 6300×6300 palette pixels with a
  transparent index (a full RGBA decode is 150 MB a copy); accepted, they are edited and
  their outputs composed at 6300², and "RSS settled" is read once they have ended;
- an oversize body: one 200 MB JSON body, refused while it streams in;
- trickling fetches: `tricklers` runs whose image_url sends one byte every 0.1 s, each cut
  off at the fetch deadline (`INCONTEXT_FETCH_TIMEOUT_SECONDS`, 5 here);
- fairness: key B's single edit alone (the median of three), then behind key A's batch of
  `batch` items sent just before it (the issue's goal: within 2× of alone).
For each: the server's peak RSS (VmHWM: the kernel's high-water mark, reset as the scenario
starts, so no peak is missed between samples; with the bombs' edits and composes), its RSS
after the answers and once the runs have ended ("settled"), the answers and the errors
(answers that were not expected), and the latency of a bystander's `GET /v1/runs` asked every
0.1 s meanwhile (p50, p95, max).
results.json also holds the server's RSS every 0.1 s through the whole run. Only the HTTP
process is measured: the engine's child never sees the hostile inputs whole.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from incontext.testing import TrickleHost

RUNS = "/v1/models/flux-pro/kontext/runs"
BATCHES = "/v1/models/flux-pro/kontext/batches"
START_TIMEOUT_S = 600
FETCH_TIMEOUT_S = 5


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the server subprocess answers /v1/health; raises if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start in {timeout_s} s: see {log}")
        time.sleep(0.2)


def palette_bomb() -> bytes:
    from PIL import Image

    im = Image.new("P", (6300, 6300), 0)
    im.putpalette([255, 0, 0] * 256)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, optimize=True)
    return buf.getvalue()


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+), so each scenario's peak is its own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_image() -> str:
    """A 256² PNG data URI: an ordinary edit's input."""
    from PIL import Image

    im = Image.linear_gradient("L").convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 1),
            "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 1), "max": round(ordered[-1], 1)}


class RssSampler:
    """The server's RSS every `interval_s`, labelled with the scenario under way."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.pid, self.interval_s, self.label = pid, interval_s, "start"
        self.samples: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                rss, _ = memory_mb(self.pid)
            except (OSError, KeyError):
                return
            self.samples.append((round(time.perf_counter() - self._started, 2), self.label, round(rss)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _wait_ended(client, run_ids: list[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    for run_id in run_ids:
        while client.get(f"/v1/runs/{run_id}").json()["completed_at"] is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not end in {timeout_s} s")
            time.sleep(0.1)


def _timed_edit(client, image: str, poll_s: float = 0.05) -> float:
    """Seconds from POST to the run's end, as a client polling it sees them."""
    started = time.perf_counter()
    answer = client.post(RUNS, json={"input": {"prompt": "make it blue", "image_url": image}})
    answer.raise_for_status()
    run_id = answer.json()["id"]
    while (run := client.get(f"/v1/runs/{run_id}").json())["completed_at"] is None:
        time.sleep(poll_s)
    if run["status_code"] != "succeeded":
        raise RuntimeError(f"run {run_id} ended {run['status_code']}")
    return time.perf_counter() - started


def run_load(out: Path, *, bombs: int = 4, tricklers: int = 40, batch: int = 48, model: str | None = None,
             hostile: bool = True, fair: bool = True, env_extra: dict[str, str] | None = None) -> dict:
    import httpx

    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="incontext-load-"))
    key, key_b = "load-bench-key", "load-bench-key-b"
    port = _free_port()
    env = {
        **os.environ,
        "INCONTEXT_API_KEYS": f"{key},{key_b}",
        # The trickling host listens on loopback, which a server refuses to fetch by default.
        "INCONTEXT_FETCH_PRIVATE_NETWORKS": "true",
        "INCONTEXT_FETCH_TIMEOUT_SECONDS": str(FETCH_TIMEOUT_S),
        "INCONTEXT_RATE_LIMIT_PER_MINUTE": "100000",
        "INCONTEXT_ENGINE_COMPILE": "false",  # the eager model: no compile build taking the cores
    }
    if model:
        env["INCONTEXT_MODEL_DIR"] = model
    env.update(env_extra or {})
    log = open(out / "server.log", "wb")
    cmd = [sys.executable, "-m", "incontext", "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    rows: list[dict] = []
    fairness: dict = {}
    trickle = TrickleHost(interval_s=0.1)
    sampler = None
    try:
        wait_healthy(proc, url, out / "server.log")
        sampler = RssSampler(proc.pid)

        with httpx.Client(base_url=url, headers=headers, timeout=120) as client, \
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_b}"}, timeout=120) as client_b:
            client.get("/v1/runs")  # warm: the first read imports and connects
            image = small_image()
            _timed_edit(client_b, image)  # warm the engine: the first edit loads what it caches

            def scenario(name: str, requests: list, expect: set[int], settle=None) -> None:
                sampler.label = name
                reset_peak(proc.pid)
                before_rss, _ = memory_mb(proc.pid)
                started = time.perf_counter()
                bystander: list[float] = []
                bystander_errors = 0
                with ThreadPoolExecutor(max(len(requests), 1)) as pool:
                    futures = [pool.submit(r) for r in requests]
                    time.sleep(0.3)  # let them be under way
                    while len(bystander) < 3 or not all(f.done() for f in futures):
                        asked = time.perf_counter()
                        try:
                            if client.get("/v1/runs", params={"limit": 1}).status_code != 200:
                                bystander_errors += 1
                        except httpx.HTTPError:
                            bystander_errors += 1
                        bystander.append((time.perf_counter() - asked) * 1000)
                        time.sleep(0.1)
                    answers = [f.result() for f in futures]
                seconds = time.perf_counter() - started
                rss, hwm = memory_mb(proc.pid)
                statuses = [a[0] if isinstance(a, tuple) else a for a in answers]
                settled = None
                if settle is not None:  # the runs' own work after the answers, counted in the peak
                    settle(answers)
                    time.sleep(1)
                    settled, hwm = memory_mb(proc.pid)
                    settled = round(settled)
                rows.append({
                    "scenario": name, "requests": len(requests), "answers": sorted(set(statuses)), "expected": sorted(expect),
                    "errors": sum(s not in expect for s in statuses) + bystander_errors,
                    "seconds": round(seconds, 2), "rss_before_mb": round(before_rss), "peak_rss_mb": round(hwm),
                    "rss_after_mb": round(rss), "rss_settled_mb": settled, "bystander_get_ms": percentiles(bystander),
                })

            rss, hwm = memory_mb(proc.pid)
            rows.append({"scenario": "idle", "requests": 0, "answers": [], "expected": [], "errors": 0, "seconds": 0.0,
                         "rss_before_mb": round(rss), "peak_rss_mb": round(hwm), "rss_after_mb": round(rss), "rss_settled_mb": None,
                         "bystander_get_ms": percentiles([])})

            if hostile:
                bomb = "data:image/png;base64," + base64.b64encode(palette_bomb()).decode()

                def post_bomb() -> tuple[int, str | None]:
                    answer = client.post(RUNS, json={"input": {"prompt": "p", "image_url": bomb}})
                    return answer.status_code, answer.json().get("id") if answer.status_code == 201 else None

                def bombs_ended(answers) -> None:  # accepted bombs are edited and composed at 6300²
                    _wait_ended(client, [run_id for _, run_id in answers if run_id])

                scenario(f"palette bomb ×{bombs}", [post_bomb] * bombs, {201, 413, 422}, settle=bombs_ended)

                def post_huge() -> int:
                    def body():  # 200 MB of JSON, sent as it is made
                        yield b'{"input": {"prompt": "'
                        chunk = b"x" * (1 << 20)
                        for _ in range(200):
                            yield chunk
                        yield b'", "image_url": "data:,"}}'

                    try:
                        return client.post(RUNS, content=body(), headers={"Content-Type": "application/json"}).status_code
                    except httpx.HTTPError:
                        return 413  # the server answered and closed while the body was still streaming

                scenario("200 MB body", [post_huge], {413})

                def post_trickle() -> int:
                    return client.post(RUNS, json={"input": {"prompt": "p", "image_url": f"{trickle.url}/slow.png"}}).status_code

                scenario(f"trickling image_url ×{tricklers}", [post_trickle] * tricklers, {422})

            if fair:
                sampler.label = "fairness"
                fairness = _fairness(client, client_b, image, batch)
    finally:
        if sampler is not None:
            sampler.close()
        trickle.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    result = {"rows": rows, "fairness": fairness, "rss_timeline": sampler.samples if sampler else []}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return {**result, "out": str(out)}


def _fairness(client, client_b, image: str, batch: int) -> dict:
    """Key B's edit alone (median of three) and behind key A's `batch`-item batch."""
    alone = [_timed_edit(client_b, image) for _ in range(3)]
    started = time.perf_counter()
    answer = client.post(BATCHES, json={"input": [{"prompt": f"edit {i}", "image_url": image} for i in range(batch)]})
    answer.raise_for_status()
    batch_id = answer.json()["id"]
    behind = _timed_edit(client_b, image)
    b_done = time.perf_counter() - started
    while client.get(f"/v1/batches/{batch_id}").json()["completed_at"] is None:
        time.sleep(0.1)
    batch_s = time.perf_counter() - started
    return {"batch_items": batch, "b_alone_s": [round(a, 2) for a in alone], "b_alone_median_s": round(statistics.median(alone), 2),
            "b_behind_batch_s": round(behind, 2), "ratio": round(behind / statistics.median(alone), 2),
            "b_done_at_s": round(b_done, 2), "batch_done_at_s": round(batch_s, 2)}
