"""`incontext edit --server`: the CLI as a client of a running server."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from .helpers import png_bytes


def test_edit_through_the_server_writes_the_images(server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes((96, 64)))
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "incontext", "edit", str(src), "make the red square blue", "-o", str(out), "--seed", "11",
         "--num-images", "2", "--steps", "2", "--server", server.url, "--api-key", server.keys[0]],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed: 11" in proc.stdout
    a, b = Image.open(tmp_path / "out_0.png"), Image.open(tmp_path / "out_1.png")
    assert a.size == b.size and a.size[0] > a.size[1]


def test_a_bad_key_is_a_one_line_error(server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "incontext", "edit", str(src), "make it blue", "-o", str(tmp_path / "o.png"), "--server", server.url, "--api-key", "ic_live_wrong"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "UNAUTHORIZED" in proc.stderr and "Traceback" not in proc.stderr


def test_edit_through_the_server_is_quiet_and_shows_its_steps(server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "incontext", "edit", str(src), "make it blue", "-o", str(tmp_path / "o.png"), "--steps", "6",
         "--server", server.url, "--api-key", server.keys[0]],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "6/6 steps" in proc.stdout  # the bar, fed by the event stream
    assert "HTTP Request" not in proc.stderr + proc.stdout  # no line per request


def test_edit_through_the_server_sends_the_references(server, tmp_path):
    src, ref = tmp_path / "in.png", tmp_path / "ref.png"
    src.write_bytes(png_bytes((96, 64)))
    ref.write_bytes(png_bytes((40, 40), color=(40, 200, 40)))
    proc = subprocess.run(
        [sys.executable, "-m", "incontext", "edit", str(src), "add the green square", "--reference", str(ref), "-o", str(tmp_path / "o.png"),
         "--steps", "2", "--server", server.url, "--api-key", server.keys[0]],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o.png").size == (96, 64)  # the edited image's, not the reference's
    with server.client(server.keys[0]) as api:
        run = api.get("/v1/runs", params={"limit": 1}).json()["items"][0]
    assert run["status_code"] == "succeeded" and len(run["input"]["image_urls"]) == 2
