"""Helpers for the service tests: the real server (`python -m incontext.service serve`) as a
subprocess on a free port, loopback receivers for callbacks and image fetches, test images."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

START_TIMEOUT_S = 600  # a loaded 2-core machine can take minutes to import torch and load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "incontext.service", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def create_key(data_dir: Path, label: str = "test", env: dict | None = None) -> str:
    result = cli("keys", "create", "--data-dir", str(data_dir), "--label", label, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class EngineDouble:
    """What an engine stand-in answers besides `edit`: always ready, nothing to cancel."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    def cancel(self, request_id: str) -> bool:
        return False


class Server:
    """One `serve` process; restartable on the same data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir = data_dir
        self.env = {**os.environ, "PYTHONFAULTHANDLER": "1", **env}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "ab")
        cmd = [sys.executable, "-m", "incontext.service", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        # SIGABRT: faulthandler (PYTHONFAULTHANDLER below) writes every thread's stack to the log.
        self.proc.send_signal(signal.SIGABRT)
        self.proc.wait(timeout=30)
        raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def server_env(tiny_model: Path, **overrides: str) -> dict[str, str]:
    env = {
        "INCONTEXT_MODEL_DIR": str(tiny_model),
        # Two cores shared with other jobs: one torch thread per server avoids threads
        # spinning against each other, which slows a contended CPU many times over.
        "OMP_NUM_THREADS": "1",
        "INCONTEXT_POLL_INTERVAL_SECONDS": "0.2",
        "INCONTEXT_CALLBACK_BACKOFF_SECONDS": "0.3",
        "INCONTEXT_CALLBACK_MAX_ATTEMPTS": "4",
        "INCONTEXT_CALLBACK_TIMEOUT_SECONDS": "2",
        # Compiling is tested in tests/engine/test_compiled.py; in every server here it would
        # only take the CPU the tests share.
        "INCONTEXT_ENGINE_COMPILE": "false",
        # Image hosts and callback receivers here listen on loopback, which a server refuses
        # to reach by default (tests/service/test_outbound.py holds that).
        "INCONTEXT_FETCH_PRIVATE_NETWORKS": "true",
    }
    env.update(overrides)
    return env


def png_bytes(size=(96, 64), color=(200, 40, 40), fmt="PNG") -> bytes:
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes | None = None, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data or png_bytes()).decode()}"


TERMINAL = ("succeeded", "failed", "canceled")


def wait_run(client: httpx.Client, run_id: str, timeout: float = 240, until=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status_code"] in until:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run['status_code']} after {timeout} s")
        time.sleep(0.1)


def wait_for(predicate, timeout: float = 60, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class Receiver:
    """A loopback HTTP server that records POSTs; answers `fail_first` of them with 500."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "path": self.path})
                    fail = len(receiver.requests) <= receiver.fail_first
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict]:
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()


class ImageHost:
    """Serves image bytes over loopback HTTP, for image_url fetches."""

    def __init__(self, files: dict[str, tuple[int, bytes]]):
        host = self
        self.requests: list[dict] = []  # path and headers of every GET

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                status, body = host.files.get(self.path, (404, b"not found"))
                if status in (301, 302):
                    self.send_response(status)
                    self.send_header("Location", body.decode())
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.files = files
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def textured_scene(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Something for a model to edit on both halves: a red circle left, a teal square right, on
    a cream background with a little texture (the autoencoder cannot reproduce it exactly, so
    every pixel it redraws differs)."""
    import numpy as np

    w, h = size
    rng = np.random.default_rng(0)
    pixels = np.full((h, w, 3), (236, 232, 220), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    pixels[(xx - 24) ** 2 + (yy - 32) ** 2 < 14**2] = (200, 30, 30)
    pixels[16:48, 60:88] = (40, 160, 140)
    return Image.fromarray(np.clip(pixels.astype(np.int16) + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8))
