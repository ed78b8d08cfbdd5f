"""Test doubles with the real code path: tiny random models (seconds on a CPU) and loopback
HTTP hosts that misbehave on purpose (for tests and `bench load`)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackHost:
    """A threaded HTTP server for `handler` on 127.0.0.1; `url` is its base, `close()` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class TrickleHost(LoopbackHost):
    """Answers every GET with a 200 and then one byte every `interval_s` (up to `total`),
    without a Content-Length: each read arrives within any per-read timeout."""

    def __init__(self, interval_s: float, total: int = 100_000):
        class Handler(QuietHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(total):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(interval_s)
                except OSError:
                    pass

        super().__init__(Handler)


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Kontext model directory (diffusers layout) at `path` and return it."""
    from incontext.models.components import NanoConfig, build_components, save_model_dir  # torch: only here
    from incontext.world.language import vocabulary

    cfg = NanoConfig.tiny(vocabulary())
    c = build_components(cfg, seed=seed)
    # Non-trivial latent normalisation, so tests catch a missing shift/scale.
    c.vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    preset = {"num_inference_steps": 4, "guidance_scale": 3.5, "max_sequence_length": cfg.max_text_tokens, "target_area": 64 * 64, "multiple": 16}
    return save_model_dir(c, Path(path), preset=preset)
