"""The engine in a child process (what `incontext serve` runs): same results as in-process,
progress, cancellation, errors with their codes, and a crashed child replaced (its requests
end with EngineLost, which the dispatcher requeues: tests/service/test_recovery.py)."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np

from incontext.engine.local import LocalEngine
from incontext.engine.process import ProcessEngine
from incontext.errors import Cancelled, EngineLost, IncontextError
from tests.engine.test_local import req


async def _wait_ready(engine: ProcessEngine, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if engine.is_ready():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the engine process never became ready")


def test_child_process_gives_the_in_process_result_with_progress(registry, one_thread):
    async def go():
        local = LocalEngine(registry, dtype="float32")
        await local.start()
        expected = await local.edit(req("a", 11, steps=4))
        await local.close()

        engine = ProcessEngine(registry, threads=1, dtype="float32")
        await engine.start()  # returns before the model is loaded: requests queue meanwhile
        progress: list[tuple[int, int]] = []
        got = await engine.edit(req("a", 11, steps=4), on_progress=lambda p: progress.append((p.done, p.total)))
        ready = engine.is_ready()
        await engine.close()
        return expected, got, progress, ready

    expected, got, progress, ready = asyncio.run(go())
    assert ready
    assert np.array_equal(np.asarray(expected.images[0]), np.asarray(got.images[0]))
    assert got.seeds == [11] and got.num_inference_steps == 4
    assert progress[-1] == (4, 4) and [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_cancel_and_bad_input_keep_their_codes(registry, one_thread):
    async def go():
        engine = ProcessEngine(registry, threads=1, dtype="float32")
        await engine.start()
        await _wait_ready(engine)
        long = asyncio.ensure_future(engine.edit(req("long", 1, steps=50), on_progress=lambda p: p.done == 1 and engine.cancel("long")))
        outcomes = []
        for call in (long, engine.edit(req("odd", 1, size=(70, 64)))):
            try:
                await call
                outcomes.append(None)
            except IncontextError as exc:
                outcomes.append(exc)
        await engine.close()
        return outcomes

    cancelled, bad = asyncio.run(go())
    assert isinstance(cancelled, Cancelled) and cancelled.code == "CANCELED"
    assert bad.code == "INVALID_INPUT" and "multiple" in bad.message


def test_a_crashed_child_ends_its_requests_as_lost_and_is_replaced(registry, one_thread):
    async def go():
        engine = ProcessEngine(registry, threads=1, dtype="float32")
        await engine.start()
        await _wait_ready(engine)
        pid = engine._proc.pid

        def kill_at_first_step(progress) -> None:
            if progress.done == 1:
                os.kill(pid, signal.SIGKILL)

        try:
            await engine.edit(req("doomed", 1, steps=50), on_progress=kill_at_first_step)
            doomed_error = None
        except IncontextError as exc:
            doomed_error = exc
        after = await engine.edit(req("after", 2, steps=3))
        await engine.close()
        return doomed_error, after

    doomed_error, after = asyncio.run(go())
    # Lost, not failed: the dispatcher queues its run again.
    assert isinstance(doomed_error, EngineLost) and doomed_error.code == "ENGINE_CRASHED"
    assert "exit code -9" in doomed_error.message
    assert after.images[0].size == (64, 64)


def test_a_model_that_does_not_load_fails_requests_instead_of_hanging(tiny_model, tmp_path, one_thread):
    import shutil

    from incontext.models.registry import Registry, preset_for_directory

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "transformer")
    registry = Registry(default_id="broken")
    registry.add(preset_for_directory(broken, id="broken"))

    async def go():
        engine = ProcessEngine(registry, threads=1, dtype="float32")
        await engine.start()
        try:
            await engine.edit(req("r", 1))
            error = None
        except IncontextError as exc:
            error = exc
        ready = engine.is_ready()
        await engine.close()
        return error, ready

    error, ready = asyncio.run(go())
    assert error is not None and error.code == "ENGINE_ERROR" and "could not load the model" in error.message
    assert not isinstance(error, EngineLost)  # a retry would fail the same way: the run fails
    assert not ready


def test_the_server_side_yields_the_cpu_to_the_engine_process(registry, one_thread):
    # On a 2-core machine every poll the server answers takes a core from the denoising loop:
    # the server's thread lowers its priority below the engine's once the child runs.
    before = os.getpriority(os.PRIO_PROCESS, 0)

    async def go():
        engine = ProcessEngine(registry, threads=1, dtype="float32", http_nice=3)
        await engine.start()
        await _wait_ready(engine)
        server_side, engine_side = os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, engine._proc.pid)
        # Linux shares the CPU between sessions (autogroups) before nice values count: the
        # engine must stay in the server's session for its priority to mean anything.
        assert os.getsid(engine._proc.pid) == os.getsid(0)
        assert os.getpgid(engine._proc.pid) != os.getpgid(0)  # while Ctrl-C to the server's group misses it
        await engine.edit(req("a", 1, steps=2))
        await engine.close()
        return server_side, engine_side

    try:
        server_side, engine_side = asyncio.run(go())
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)
        except PermissionError:  # only a privileged user may raise it back; the rest of the run is merely nicer
            pass
    assert engine_side == before
    assert server_side == min(19, before + 3)
