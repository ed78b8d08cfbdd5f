"""The compiled transformer: warmed in the background, same images, never in a request's way."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from incontext.engine.compiled import CompiledModels
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.models.loader import load_model


def _scene() -> Image.Image:
    im = Image.new("RGB", (64, 64), (230, 230, 230))
    im.paste((200, 30, 30), (16, 16, 40, 40))
    return im


def _edit(engine: LocalEngine, request_id: str) -> tuple[np.ndarray, float]:
    request = EditRequest(request_id, "tiny", "make the red square blue", _scene(), 64, 64, 7, guidance_scale=3.5, num_inference_steps=4)
    result = engine.submit(request).result(timeout=600)
    return np.asarray(result.images[0], dtype=np.int16), result.timings_ms["compiled_share"]


def test_compiled_engine_gives_the_eager_images(registry, one_thread):
    eager = LocalEngine(registry)
    compiled = LocalEngine(registry, compile=True)
    for engine in (eager, compiled):
        engine.load("tiny")
        engine.start_thread()
    try:
        warm = compiled.compiled["tiny"]
        before, _ = _edit(compiled, "served-while-compiling")  # does not wait for the compile
        assert warm.wait(timeout=900), "compiling the tiny model did not finish"
        assert warm.failed is None
        # The warm-up thread ends once idle: a live thread that ran torch work slows the engine's.
        deadline = time.monotonic() + 10
        while any(t.name == "incontext-compile" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "incontext-compile" for t in threading.enumerate())
        after, share = _edit(compiled, "served-compiled")
        assert share == 1.0  # every pass of a warm bucket runs compiled
        reference, eager_share = _edit(eager, "eager")
        assert eager_share == 0.0
        assert np.abs(before - reference).mean() < 1.0
        assert np.abs(after - reference).mean() < 1.0  # same seed, same image, within a pixel level
    finally:
        for engine in (eager, compiled):
            asyncio.run(engine.close())


def test_a_bucket_not_warmed_yet_runs_eager(tiny_model):
    m = load_model(tiny_model)
    cm = CompiledModels(m, [(64, 64)], start=False)
    assert cm.for_bucket(64, 64) is m
    cm.ready.add((64, 64))
    assert cm.for_bucket(64, 64).transformer is not m.transformer
    assert cm.for_bucket(96, 48) is m


def test_a_failed_compile_leaves_the_eager_model_serving(tiny_model, monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.config = getattr(inner, "config", None)  # torch.compile also takes plain functions (the VAE's)

        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor is unavailable")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    m = load_model(tiny_model)
    cm = CompiledModels(m, [(64, 64)])
    assert cm.wait(timeout=60)
    assert "inductor is unavailable" in cm.failed
    assert cm.for_bucket(64, 64) is m
