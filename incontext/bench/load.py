"""`bench load`: the HTTP process's memory and a bystander's latency under hostile inputs.

    incontext bench load                      # the bundled model's server, results/load
    incontext bench load --bombs 8 --tricklers 40 --out results/quick-load

The real server (`incontext serve`) in a subprocess on loopback, one scenario after another:
- palette bombs: `bombs` runs at once, each a 39 KB PNG of 6300×6300 palette pixels with a
  transparent index (a full RGBA decode is 150 MB a copy);
- an oversize body: one 200 MB JSON body, refused while it streams in;
- trickling fetches: `tricklers` runs whose image_url sends one byte every 0.1 s, each cut
  off at the fetch deadline (`INCONTEXT_FETCH_TIMEOUT_SECONDS`, 5 here).
For each: the server's peak RSS (VmHWM: the kernel's high-water mark, so no peak is missed
between samples), its RSS after, and how long a bystander's `GET /v1/runs` took meanwhile.
Only the HTTP process is measured: the engine's child never sees these inputs. A bomb that
is accepted (201) stays in memory after the request, as every accepted input does until the
dispatcher hands it to the engine (dispatcher.MAX_HANDED_OVER_PIXELS): "RSS after" counts it.
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
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RUNS = "/v1/models/flux-pro/kontext/runs"
START_TIMEOUT_S = 600
FETCH_TIMEOUT_S = 5


def palette_bomb() -> bytes:
    from PIL import Image

    im = Image.new("P", (6300, 6300), 0)
    im.putpalette([255, 0, 0] * 256)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, optimize=True)
    return buf.getvalue()


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Trickle:
    """An image host that sends one byte every `interval_s`, with no Content-Length."""

    def __init__(self, interval_s: float = 0.1):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(100_000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(interval_s)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(out: Path, *, bombs: int = 4, tricklers: int = 40, model: str | None = None) -> dict:
    import httpx

    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="incontext-load-"))
    key = "load-bench-key"
    port = _free_port()
    env = {
        **os.environ,
        "INCONTEXT_API_KEYS": key,
        # The trickling host listens on loopback, which a server refuses to fetch by default.
        "INCONTEXT_FETCH_PRIVATE_NETWORKS": "true",
        "INCONTEXT_FETCH_TIMEOUT_SECONDS": str(FETCH_TIMEOUT_S),
        "INCONTEXT_RATE_LIMIT_PER_MINUTE": "100000",
        "INCONTEXT_ENGINE_COMPILE": "false",  # nothing here reaches the engine
    }
    if model:
        env["INCONTEXT_MODEL_DIR"] = model
    log = open(out / "server.log", "wb")
    cmd = [sys.executable, "-m", "incontext", "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    rows = []
    trickle = Trickle()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: see {out / 'server.log'}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s")
            time.sleep(0.2)

        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            client.get("/v1/runs")  # warm: the first read imports and connects

            def scenario(name: str, requests: list, expect: str) -> None:
                before_rss, _ = memory_mb(proc.pid)
                started = time.perf_counter()
                with ThreadPoolExecutor(max(len(requests), 1)) as pool:
                    futures = [pool.submit(r) for r in requests]
                    time.sleep(0.5)  # let them be under way
                    bystander_started = time.perf_counter()
                    client.get("/v1/runs", params={"limit": 1}).raise_for_status()
                    bystander_ms = (time.perf_counter() - bystander_started) * 1000
                    statuses = sorted({f.result() for f in futures})
                rss, hwm = memory_mb(proc.pid)
                rows.append({
                    "scenario": name, "requests": len(requests), "answers": statuses, "expected": expect,
                    "seconds": round(time.perf_counter() - started, 2), "rss_before_mb": round(before_rss),
                    "peak_rss_mb": round(hwm), "rss_after_mb": round(rss), "bystander_get_ms": round(bystander_ms, 1),
                })

            rss, hwm = memory_mb(proc.pid)
            rows.append({"scenario": "idle", "requests": 0, "answers": [], "expected": "", "seconds": 0.0, "rss_before_mb": round(rss),
                         "peak_rss_mb": round(hwm), "rss_after_mb": round(rss), "bystander_get_ms": None})

            bomb = "data:image/png;base64," + base64.b64encode(palette_bomb()).decode()

            def post_bomb() -> int:
                return client.post(RUNS, json={"input": {"prompt": "p", "image_url": bomb}}).status_code

            scenario(f"palette bomb ×{bombs}", [post_bomb] * bombs, "201 (decoded in bounded memory) or 413/422")

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

            scenario("200 MB body", [post_huge], "413")

            def post_trickle() -> int:
                return client.post(RUNS, json={"input": {"prompt": "p", "image_url": trickle.url}}).status_code

            scenario(f"trickling image_url ×{tricklers}", [post_trickle] * tricklers, f"422 after the {FETCH_TIMEOUT_S} s deadline")
    finally:
        trickle.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "out": str(out)}
