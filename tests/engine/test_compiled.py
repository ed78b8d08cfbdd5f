"""The transformer compiled ahead of time: built beside a serving engine, then loaded at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from incontext.engine import compiled as compiled_module
from incontext.engine.compiled import CompiledModels, package_path, verify
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.models.loader import load_model


def _scene() -> Image.Image:
    im = Image.new("RGB", (64, 64), (230, 230, 230))
    im.paste((200, 30, 30), (16, 16, 40, 40))
    return im


def _edit(engine: LocalEngine, request_id: str, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, float]:
    request = EditRequest(request_id, "tiny", "make the red square blue", _scene().resize(size), *size, 7, guidance_scale=3.5, num_inference_steps=4)
    result = engine.submit(request).result(timeout=900)
    return np.asarray(result.images[0], dtype=np.int16), result.timings_ms["compiled_share"]


def _engine(registry, **kwargs) -> LocalEngine:
    engine = LocalEngine(registry, **kwargs)
    engine.load("tiny")
    engine.start_thread()
    return engine


@pytest.fixture(scope="session")
def background_build(session_registry, tiny_compile_dir, tmp_path_factory):
    """An engine building the tiny model's package while the rest of the suite runs.

    The build is the suite's slowest step, and mostly one busy core: tests/conftest.py runs
    the check made while it builds first and the checks of the finished build last, so the
    other tests use the time between. Into the session's shared directory when nothing is
    built there yet, so the tests that need a package (ordered after these) load this one."""
    compile_dir = tmp_path_factory.mktemp("compiled_again") if any(tiny_compile_dir.iterdir()) else tiny_compile_dir
    engine = _engine(session_registry, compile_dir=compile_dir)
    state = {"engine": engine, "compile_dir": compile_dir}
    yield state
    asyncio.run(engine.close())
    for cm in engine.compiled.values():
        cm.close()  # a build still running when the session ends (the last check not selected)


def _served_while_building(state) -> np.ndarray:
    """The first edit, made while the package builds: eagerly, without waiting for it."""
    if "before" not in state:
        cm = state["engine"].compiled["tiny"]
        assert cm.building  # a child process, so no torch thread of the engine's competes
        # at nice 19 in the engine's session, where that priority counts (see ProcessEngine)
        assert os.getsid(cm._child.pid) == os.getsid(0)
        deadline = time.monotonic() + 60  # it lowers its priority once torch is imported
        while os.getpriority(os.PRIO_PROCESS, cm._child.pid) != 19 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.getpriority(os.PRIO_PROCESS, cm._child.pid) == 19
        before, share = _edit(state["engine"], "served-while-building")  # does not wait for the build
        assert share == 0.0
        state["before"] = before
    return state["before"]


def test_the_engine_serves_eagerly_while_it_builds(background_build, one_thread):
    _served_while_building(background_build)


def test_the_finished_build_is_served_at_once_and_every_later_start_loads_it(background_build, registry, one_thread):
    before = _served_while_building(background_build)  # made here if the first check was not selected
    building, compile_dir = background_build["engine"], background_build["compile_dir"]
    cm = building.compiled["tiny"]
    assert cm.wait(timeout=900), "building the tiny model's package did not end"
    assert cm.package.exists(), cm.package.with_suffix(".log").read_text()
    after, share = _edit(building, "served-compiled")
    assert cm.failed is None
    assert share == 1.0  # switched between requests, without a restart
    eager = _engine(registry)
    try:
        reference, eager_share = _edit(eager, "eager")
        assert eager_share == 0.0
        assert np.abs(before - reference).mean() < 1.0
        assert np.abs(after - reference).mean() < 1.0  # same seed, same image, within a pixel level
        # One package serves every size: batch and token count are dynamic.
        other, share = _edit(building, "another-size", size=(96, 48))
        assert share == 1.0
    finally:
        asyncio.run(eager.close())

    # A later start on the same machine loads it instead of building it again.
    restarted = _engine(registry, compile_dir=compile_dir)
    try:
        assert not restarted.compiled["tiny"].building
        again, share = _edit(restarted, "after-restart")
        assert share == 1.0
        assert np.abs(again - reference).mean() < 1.0
    finally:
        asyncio.run(restarted.close())

    # Every build is checked against the eager model before it is used: a package that
    # computes something else (here: other weights) is refused.
    m = load_model(registry.resolve("tiny").directory, max_sequence_length=registry.resolve("tiny").max_sequence_length)
    verify(m, cm.package)
    with torch.no_grad():
        for p in m.vae.decoder.parameters():
            p.mul_(1.5)
    with pytest.raises(RuntimeError, match="compiled VAE decode differs"):
        verify(m, cm.package)


def test_a_failed_build_leaves_the_eager_model_serving(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled_module.sys, "executable", shutil.which("false") or sys.executable + "-missing")
    m = load_model(tiny_model)
    cm = CompiledModels(m, tiny_model, tmp_path)
    assert cm.wait(timeout=60)
    assert cm.current() is m
    assert cm.failed and "exited" in cm.failed


def test_new_weights_or_another_machine_need_another_package(tiny_model, tmp_path, monkeypatch):
    m = load_model(tiny_model)
    first = package_path(tmp_path, tiny_model, m)
    assert package_path(tmp_path, tiny_model, m) == first
    changed = shutil.copytree(tiny_model, tmp_path / "changed")
    weights = next((changed / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert package_path(tmp_path, changed, m) != first
    monkeypatch.setattr(compiled_module.torch, "__version__", "0.0.0-another")
    assert package_path(tmp_path, tiny_model, m) != first
