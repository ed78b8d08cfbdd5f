"""The dispatcher: takes queued runs from the database and drives them through the engine.

One loop claims runs (oldest first, at most `max_concurrent_runs_per_model` of a model in
flight); each claimed run gets a task that loads its input, calls `engine.edit`, encodes
and stores the images, and ends the run. The database is the queue, so a crash loses
nothing: at start-up, runs left claimed or running are queued again (lifecycle.recover_interrupted).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from incontext import imageio
from incontext.engine.protocol import EditRequest, EditResult, EngineClient
from incontext.errors import Cancelled, IncontextError
from incontext.service import lifecycle
from incontext.service.callbacks import CallbackSender
from incontext.service.db import utcnow
from incontext.service.inputs import decode_stored
from incontext.service.models import Run
from incontext.service.storage import Storage
from incontext.settings import Settings

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, *, sessions: sessionmaker[Session], engine: EngineClient, storage: Storage, sender: CallbackSender, settings: Settings):
        self._sessions = sessions
        self._engine = engine
        self._storage = storage
        self._sender = sender
        self._settings = settings
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._log_writes: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def close(self) -> None:
        # In-flight runs stay `running` in the database; the next start queues them again.
        tasks = [t for t in (self._task, *self._in_flight.values(), *self._log_writes) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look for queued runs now; callable from any thread."""
        if self._loop:
            self._loop.call_soon_threadsafe(self._wake.set)

    def cancel(self, run_id: str) -> None:
        """Stop the engine's work on a run already canceled in the database; any thread."""
        if self._loop:
            self._loop.call_soon_threadsafe(self._cancel_on_loop, run_id)

    def _cancel_on_loop(self, run_id: str) -> None:
        if run_id in self._in_flight:
            # The engine may not know the request yet (input still loading); the progress
            # hook repeats the cancel once it does.
            self._cancel_requested.add(run_id)
        self._engine.cancel(run_id)

    def _recover(self) -> None:
        with self._sessions.begin() as session:
            lifecycle.recover_interrupted(session, self._storage)
        self._sender.wake()

    async def _run(self) -> None:
        while True:
            try:
                claimed = await asyncio.to_thread(self._claim)
                for run_id in claimed:
                    task = asyncio.create_task(self._execute(run_id), name=f"run-{run_id}")
                    self._in_flight[run_id] = task
                    task.add_done_callback(lambda _t, r=run_id: self._done(r))
            except Exception:
                log.exception("dispatcher: could not claim queued runs")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.poll_interval_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    def _claim(self) -> list[str]:
        with self._sessions.begin() as session:
            return lifecycle.claim_queued(session, self._settings.max_concurrent_runs_per_model)

    def _done(self, run_id: str) -> None:
        self._in_flight.pop(run_id, None)
        self._cancel_requested.discard(run_id)
        self._wake.set()  # a slot is free

    async def _execute(self, run_id: str) -> None:
        try:
            await self._drive(run_id)
        except Exception as exc:
            # A bug or a database error must not leave the run `running` until the next restart.
            log.exception("run %s: unexpected error", run_id)
            await self._end(run_id, lifecycle.FAILED, failure=("INTERNAL_ERROR", f"internal error: {exc.__class__.__name__}", "dispatch"))

    async def _drive(self, run_id: str) -> None:
        started = time.perf_counter()
        # 1. Load and decode the stored input.
        run = await asyncio.to_thread(self._load_run, run_id)
        data = await asyncio.to_thread(self._storage.read_input, run_id)
        if data is None:
            return await self._end(run_id, lifecycle.FAILED, failure=("INPUT_LOST", "the run's input file is gone", "input"))
        params = run.params
        try:
            image = await asyncio.to_thread(decode_stored, data, self._settings)
            image = await asyncio.to_thread(imageio.fit_to_size, image, params["width"], params["height"])
        except IncontextError as exc:
            return await self._end(run_id, lifecycle.FAILED, failure=(exc.code, exc.message, "input"))

        # 2. Mark running, unless it was canceled meanwhile.
        if await asyncio.to_thread(self._mark_running, run_id) is None:
            return
        request = EditRequest(
            request_id=run_id,
            model_id=run.engine_model_id,
            prompt=params["prompt"],
            image=image,
            width=params["width"],
            height=params["height"],
            seed=params["seed"],
            num_images=params["num_images"],
            guidance_scale=params["guidance_scale"],
            num_inference_steps=params["num_inference_steps"],
            parent_request_id=params.get("parent_request_id"),
        )

        # 3. Denoise.
        engine_started = time.perf_counter()
        try:
            result = await self._engine.edit(request, on_progress=self._progress_hook(run_id))
        except Cancelled:
            return await self._end(run_id, lifecycle.CANCELED)
        except IncontextError as exc:
            return await self._end(run_id, lifecycle.FAILED, failure=(exc.code, exc.message, "inference"))
        except Exception as exc:
            log.exception("engine failed on run %s", run_id)
            return await self._end(run_id, lifecycle.FAILED, failure=("ENGINE_ERROR", f"the engine failed: {exc.__class__.__name__}", "inference"))

        # 4. Encode and store the images, off the event loop.
        engine_done = time.perf_counter()
        try:
            output = await asyncio.to_thread(self._store_outputs, run_id, params, result)
        except IncontextError as exc:
            return await self._end(run_id, lifecycle.FAILED, failure=(exc.code, exc.message, "output"))
        # Where the time went outside the engine: what `bench speed` reports as HTTP overhead.
        output["timings_ms"].update({
            "dispatch_input": (engine_started - started) * 1000,  # load, decode, mark running
            "engine_call": (engine_done - engine_started) * 1000,  # incl. the hop to the engine process
            "dispatch_output": (time.perf_counter() - engine_done) * 1000,  # encode, store
        })
        if not await self._end(run_id, lifecycle.SUCCEEDED, output=output):
            # Canceled while the engine was finishing: the cancel stands, the files go.
            await asyncio.to_thread(self._storage.delete_outputs, run_id)

    def _load_run(self, run_id: str) -> Run:
        with self._sessions() as session:
            return session.get(Run, run_id)

    def _mark_running(self, run_id: str) -> Run | None:
        with self._sessions.begin() as session:
            return lifecycle.mark_running(session, run_id)

    def _store_outputs(self, run_id: str, params: dict, result: EditResult) -> dict:
        fmt = params["output_format"]
        items = []
        for index, (img, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            data = imageio.encode_image(img, fmt)
            item = {"type": "image", "content_type": imageio.content_type(fmt), "width": img.width, "height": img.height, "seed": seed}
            if params["sync_mode"]:
                item["data_uri"] = imageio.to_data_uri(data, fmt)
            else:
                item["file"] = self._storage.save_output(run_id, index, data, fmt)
            items.append(item)
        return {"outputs": items, "seed": params["seed"], "num_inference_steps": result.num_inference_steps, "timings_ms": result.timings_ms}

    async def _end(self, run_id: str, status: str, **kw) -> bool:
        ended = await asyncio.to_thread(self._finish, run_id, status, kw)
        if ended:
            self._sender.wake()
        return ended

    def _finish(self, run_id: str, status: str, kw: dict) -> bool:
        with self._sessions.begin() as session:
            ended = lifecycle.finish(session, self._storage, run_id, status, **kw) is not None
        if ended:
            self._storage.delete_input(run_id)
        return ended

    def _progress_hook(self, run_id: str):
        def on_progress(done: int, total: int) -> None:  # called on the engine's thread
            self._loop.call_soon_threadsafe(self._on_progress, run_id, done, total, utcnow())

        return on_progress

    def _on_progress(self, run_id: str, done: int, total: int, at) -> None:
        if run_id in self._cancel_requested:
            self._engine.cancel(run_id)
        if done == total or done % self._settings.progress_log_every_steps == 0:
            task = asyncio.create_task(asyncio.to_thread(self._write_progress, run_id, done, total, at))
            self._log_writes.add(task)
            task.add_done_callback(self._log_writes.discard)

    def _write_progress(self, run_id: str, done: int, total: int, at) -> None:
        with self._sessions.begin() as session:
            lifecycle.add_log(session, run_id, f"step {done}/{total}", meta={"step": done, "total_steps": total}, at=at)
