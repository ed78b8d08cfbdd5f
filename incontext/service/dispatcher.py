"""The dispatcher: takes queued runs from the database and drives them through the engine.

One loop claims runs (oldest first, at most `max_concurrent_runs_per_model` of a model in
flight); each claimed run gets a task that calls `engine.edit`, preserves, encodes and
stores the images (outputs.py, in a worker thread), and ends the run. The database is the
queue, so a crash loses nothing.

Each dispatcher is a worker (leases.py): it claims runs under a lease, renews the leases of
the runs it holds every third of INCONTEXT_LEASE_SECONDS, and writes their ends under the
fence of its claim; a run it lost (canceled by another process, or taken back after its
lease ran out) is stopped on its engine and its result dropped. Every dispatcher also reaps
runs whose lease ran out, so the runs of a process that died run again in the others. At
start-up it reaps too; on SQLite, which one process uses, it queues again every run its
previous life held (lifecycle.recover_interrupted). Stopping, it hands its runs back.

The route that queues a run also claims it, in the transaction that inserts it
(`claim_within`), so a POST commits once and its run is already running; after the commit it
hands the decoded input over (`submitted`: a `RunInput`, the image and any references fitted
to the output's size, and the image at its own size only if small) and the run's task starts
on the event loop with it as it is. Only a run without one (queued before a restart, or beyond the hand-over limits) has
its stored input read and decoded; a large source is read again when the output is composed
at its size (outputs.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime

import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from incontext import workflows
from incontext.engine.protocol import EditResult, EngineClient, StepProgress
from incontext.errors import Cancelled, EngineLost, IncontextError
from incontext.service import callbacks, leases, lifecycle, logs, outputs, runedits
from incontext.service.callbacks import CallbackSender
from incontext.service.db import utcnow
from incontext.service.inputs import RunInput, decode_stored
from incontext.service.metrics import Metrics
from incontext.service.models import Run
from incontext.service.progress import RunProgress
from incontext.service.runparams import RunParams
from incontext.service.storage import Storage
from incontext.settings import Settings

log = logging.getLogger(__name__)

# Inputs held for runs not yet claimed: at most this many, and this many pixels. A run holds
# its input fitted to the output size, and its source only up to inputs.KEEP_SOURCE_PIXELS
# (a 1024² upload fitted to a 1024² model and at its own size is 6 MB; a 40 MP upload fitted
# to nano's 128² is 48 KB). Beyond either the oldest are dropped, and read back from storage
# when their runs are claimed: so are any a claim never takes (e.g. runs another server
# process claimed).
MAX_HANDED_OVER = 64
MAX_HANDED_OVER_PIXELS = 64 * 1024 * 1024  # 192 MB of RGB


class Dispatcher:
    def __init__(self, *, sessions: sessionmaker[Session], engine: EngineClient, storage: Storage, sender: CallbackSender, settings: Settings,
                 metrics: Metrics | None = None):
        """`metrics`: the app's, which this counts images, requeues and lease expiries into."""
        self._sessions = sessions
        self._metrics = metrics or Metrics()
        self._engine = engine
        self._storage = storage
        self._sender = sender
        self._settings = settings
        self.progress = RunProgress()  # every step of the runs in flight, for event streams
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._log_writes: set[asyncio.Task] = set()
        self._last_steps: dict[str, tuple[int, int, datetime]] = {}  # logged with the run's end
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inputs: dict[str, RunInput] = {}  # run id → its input, until claimed; oldest first
        self._input_pixels = 0  # held in self._inputs
        self._inputs_lock = threading.Lock()  # routes hand inputs over from their threads
        self._claim_lock = threading.Lock()  # routes claim too; the cap counts what is in flight
        self._waiting = False  # the last claim left runs queued (a model at its cap)
        self.worker_id = leases.new_worker_id()
        self._fences: dict[str, int] = {}  # run id → the fence of our claim, for the runs in flight
        self._leases_task: asyncio.Task | None = None
        self._draining = False  # claims nothing more: see `drain`
        # Checked by the claim loop besides its cancel: on Python 3.11 asyncio.wait_for can
        # swallow a cancel that lands as its wait ends, and the loop would never end.
        self._stopped = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.progress.bind(self._loop)
        await asyncio.to_thread(self._recover)
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        self._leases_task = asyncio.create_task(self._keep_leases(), name="leases")

    async def close(self) -> None:
        self._stopped = True
        held = dict(self._fences)
        tasks = [t for t in (self._task, self._leases_task, *self._in_flight.values(), *self._log_writes) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The runs in flight go back to the queue now rather than when their leases run out:
        # another worker, or this one's next start, takes them at once. (A run whose end is
        # being written meanwhile keeps that end: both writes name the fence.)
        if held:
            try:
                await asyncio.to_thread(self._release, held)
            except Exception:
                log.exception("dispatcher: could not hand %d run(s) back; they run again once their leases run out", len(held))

    async def drain(self, timeout_s: float) -> None:
        """Stop claiming, let the runs in flight end for up to `timeout_s`, then `close`, which
        hands the rest back to the queue: a worker being scaled down neither drops its runs
        nor makes them wait out their leases. Leases are renewed meanwhile."""
        self._draining = self._stopped = True
        if self._task:
            self._task.cancel()
        in_flight = list(self._in_flight.values())
        if in_flight:
            log.info("dispatcher: draining; waiting up to %.0f s for %d run(s) in flight", timeout_s, len(in_flight))
            await asyncio.wait(in_flight, timeout=timeout_s)
        await self.close()

    def wake(self) -> None:
        """Look for queued runs now; callable from any thread."""
        if self._loop:
            self._loop.call_soon_threadsafe(self._wake.set)

    def claim_within(self, session: Session, inputs: dict[str, RunInput]) -> list[Run]:
        """Claim queued runs in the caller's open transaction, the one that queued the runs of
        `inputs` (run id → its input): they start running when it commits, with no transaction of
        their own. Pass the result to `submitted` after the commit; if the commit fails, the
        claim is rolled back with the runs. Nothing is claimed before the dispatcher starts.

        The caps count this worker's runs inside the transaction: on SQLite it holds the write
        lock, so claims never overlap; on PostgreSQL two claims of this process at once may
        each start one."""
        if self._loop is None:
            return []
        with self._inputs_lock:
            ready = set(self._inputs) | set(inputs)
        runs, self._waiting = self._claim_in(session, ready)
        return runs

    def _claim_in(self, session: Session, ready: set[str]) -> tuple[list[Run], bool]:
        if self._draining:
            return [], False
        return leases.claim(
            session, self.worker_id, lease_s=self._settings.lease_seconds, ready=ready, busy=set(self._in_flight),
            cap_per_model=self._settings.max_concurrent_runs_per_model, cap_per_key=self._settings.max_concurrent_runs_per_key,
        )

    def submitted(self, inputs: dict[str, RunInput], claimed: list[Run] | None = None) -> None:
        """Runs were just committed: keep their inputs (decoded, and fitted to the output size)
        for the engine and start the `claimed` runs (from `claim_within`, before the commit).
        Without `claimed`, claim now in a transaction of its own. In the caller's thread (a
        route's, off the event loop): the commit reaches the engine without a trip through the
        loop and back to a thread. Any thread but the event loop's."""
        claimed_at = time.perf_counter()
        inputs, starting = dict(inputs), []
        if claimed is not None:
            for run in claimed:  # ours, or runs an earlier request left waiting at the cap
                given = inputs.pop(run.id, None)
                starting.append((run, given if given is not None else self._take_input(run.id)))
        with self._inputs_lock:
            for run_id, given in inputs.items():
                self._input_pixels += given.pixels - (self._inputs[run_id].pixels if run_id in self._inputs else 0)
                self._inputs[run_id] = given
            while self._inputs and (len(self._inputs) > MAX_HANDED_OVER or self._input_pixels > MAX_HANDED_OVER_PIXELS):
                self._input_pixels -= self._inputs.pop(next(iter(self._inputs))).pixels
        if self._loop is None:  # not started: its first claim takes them
            return
        if claimed is None:
            try:
                starting = self._claim()
            except Exception:
                log.exception("dispatcher: could not claim submitted runs")
                return self.wake()  # the loop tries again
        if not starting:
            return
        try:
            self._loop.call_soon_threadsafe(self._start, starting, claimed_at)
        except RuntimeError:  # the event loop is closed: the server is stopping
            log.info("dispatcher: stopping; %d claimed run(s) are queued again at the next start", len(starting))

    def cancel(self, run_id: str) -> None:
        """Stop the engine's work on a run already canceled in the database; any thread."""
        self._take_input(run_id)
        self.progress.ended(run_id)
        if self._loop:
            self._loop.call_soon_threadsafe(self._cancel_on_loop, run_id)

    def _take_input(self, run_id: str) -> RunInput | None:
        with self._inputs_lock:
            given = self._inputs.pop(run_id, None)
            if given is not None:
                self._input_pixels -= given.pixels
            return given

    def _cancel_on_loop(self, run_id: str) -> None:
        if run_id in self._in_flight:
            # The engine may not know the request yet (input still loading); the progress
            # hook repeats the cancel once it does.
            self._cancel_requested.add(run_id)
        self._engine.cancel(run_id)
        self._engine.cancel(workflows.select_id(run_id))  # a workflow's second edit, if it has one

    def _recover(self) -> None:
        with self._sessions.begin() as session:
            if session.get_bind().dialect.name == "sqlite":
                # One process uses a SQLite database: every run held is its previous life's.
                requeued, _ = lifecycle.recover_interrupted(session, self._storage)
                reaped = []
            else:
                # Other workers may hold runs, alive: only runs whose lease ran out are taken.
                requeued, reaped = 0, leases.reap(session, self._storage, self._settings.engine_max_attempts)
        self._metrics.requeued("restart", requeued)
        self._metrics.leases_expired(reaped)
        self._sender.wake()

    async def _keep_leases(self) -> None:
        """Every third of a lease: renew the leases of the runs in flight, stop those no longer
        ours, and reap runs whose lease ran out (any worker's: this is how the runs of a dead
        process run again)."""
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 3)
            try:
                held = dict(self._fences)
                for run_id in await asyncio.to_thread(self._renew, held):
                    if self._fences.get(run_id) == held[run_id]:  # not ended here meanwhile
                        log.info("run %s: no longer held by this worker (canceled, or its lease ran out and it was taken back); stopping it", run_id)
                        self._cancel_on_loop(run_id)
                await asyncio.to_thread(self._reap)
            except Exception:
                log.exception("dispatcher: could not renew or reap leases")

    def _renew(self, held: dict[str, int]) -> set[str]:
        with self._sessions.begin() as session:
            return leases.renew(session, held, self._settings.lease_seconds)

    def _reap(self) -> None:
        with self._sessions.begin() as session:
            reaped = leases.reap(session, self._storage, self._settings.engine_max_attempts)
        self._metrics.leases_expired(reaped)
        for run in reaped:
            if run.status == lifecycle.QUEUED:
                self.wake()
            else:
                self._ended(run)

    def _release(self, held: dict[str, int]) -> None:
        with self._sessions.begin() as session:
            requeued = leases.release(session, held, "its worker stopped")
        self._metrics.requeued("worker_stopped", len(requeued))
        log.info("dispatcher: %d run(s) in flight handed back to the queue", len(requeued))

    async def _run(self) -> None:
        while not self._stopped:
            try:
                claimed_at = time.perf_counter()
                self._start(await asyncio.to_thread(self._claim), claimed_at)
            except Exception:
                log.exception("dispatcher: could not claim queued runs")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.poll_interval_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    def _claim(self) -> list[tuple[Run, RunInput | None]]:
        """Claimed runs with their handed-over inputs (None: read it from storage)."""
        with self._claim_lock:
            with self._inputs_lock:
                ready = set(self._inputs)
            with self._sessions.begin() as session:
                runs, self._waiting = self._claim_in(session, ready)
        # A run canceled since `ready` was read has no input here: its task falls back to
        # storage, and the cancel stands.
        return [(run, self._take_input(run.id)) for run in runs]

    def _start(self, claimed: list[tuple[Run, RunInput | None]], claimed_at: float) -> None:
        for run, given in claimed:
            task = asyncio.create_task(self._execute(run, given, claimed_at), name=f"run-{run.id}")
            self._in_flight[run.id] = task
            self._fences[run.id] = run.fence
            task.add_done_callback(lambda t, r=run.id: self._done(r, t))

    def _done(self, run_id: str, task: asyncio.Task) -> None:
        if self._in_flight.get(run_id) is not task:  # requeued, and claimed again already
            return
        self._in_flight.pop(run_id, None)
        self._fences.pop(run_id, None)
        self._cancel_requested.discard(run_id)
        self._last_steps.pop(run_id, None)
        if self._waiting:  # a slot is free for a run the cap held back
            self._wake.set()

    async def _execute(self, run: Run, given: RunInput | None, claimed_at: float) -> None:
        logs.bind_run(run.id)  # this task's lines, and those of the threads it hands work to
        log.info("run %s: claimed (%s, fence %d)", run.id, run.engine_model_id, run.fence)
        try:
            await self._drive(run, given, claimed_at)
        except Exception as exc:
            # A bug or a database error must not leave the run `running` until the next restart.
            log.exception("run %s: unexpected error", run.id)
            await self._end(run, lifecycle.FAILED, failure=("INTERNAL_ERROR", f"internal error: {exc.__class__.__name__}", "dispatch"))

    async def _drive(self, run: Run, given: RunInput | None, claimed_at: float) -> None:
        run_id, params = run.id, RunParams.of(run)
        # 1. The input: handed over in memory, or (queued before a restart, beyond the
        # hand-over limits) read and decoded from storage.
        if given is None:
            try:
                given = await asyncio.to_thread(self._read_input, run)
            except IncontextError as exc:
                return await self._end(run, lifecycle.FAILED, failure=(exc.code, exc.message, "input"))
            if given is None:
                return await self._end(run, lifecycle.FAILED, failure=("INPUT_LOST", "the run's input file is gone", "input"))

        # 2. Mark running, unless it was canceled meanwhile (a run claimed with its input in
        # memory already is).
        if run.status == lifecycle.DISPATCHING and await asyncio.to_thread(self._mark_running, run) is None:
            return
        request = runedits.request_for(run, params, given)

        # 3. Denoise.
        engine_started = time.perf_counter()
        try:
            result, drawn = await workflows.edit_with_select(self._engine, request, params.select_prompt, self._progress_hook(run_id),
                                                             mask_answers=params.workflow in workflows.MASK_ANSWERS)
        except Cancelled:
            return await self._end(run, lifecycle.CANCELED)
        except EngineLost as exc:
            return await asyncio.to_thread(self._requeue, run, given, exc.message)
        except IncontextError as exc:
            return await self._end(run, lifecycle.FAILED, failure=(exc.code, exc.message, "inference"))
        except Exception as exc:
            log.exception("engine failed on run %s", run_id)
            return await self._end(run, lifecycle.FAILED, failure=("ENGINE_ERROR", f"the engine failed: {exc.__class__.__name__}", "inference"))

        # 4. Preserve, encode and store the images and end the run, in one trip off the event
        # loop (and off the engine's thread: composing at a large input's size takes a while).
        # Where the time went outside the engine: what `bench speed` reports as HTTP overhead.
        engine_done = time.perf_counter()
        timings = {
            # From the claim (or, for a run claimed with its POST, the commit) to the engine:
            # the hand-over to the event loop, and any load, decode and mark running.
            "dispatch_input": (engine_started - claimed_at) * 1000,
            "engine_call": (engine_done - engine_started) * 1000,  # incl. the hop to the engine process
        }
        try:
            await asyncio.to_thread(self._succeed, run, given, result, drawn, timings, self._last_steps.pop(run_id, None))
        except IncontextError as exc:
            return await self._end(run, lifecycle.FAILED, failure=(exc.code, exc.message, "output"))

    def _read_input(self, run: Run) -> RunInput | None:
        """The stored input and references decoded and fitted as at submission; None if a file is gone."""
        data = self._storage.read_input(run.id)
        params = RunParams.of(run)
        references = self._storage.read_references(run.id, params.references)
        if data is None or references is None:
            return None
        decoded = [decode_stored(d, self._settings) for d in references]
        return RunInput.fit(decode_stored(data, self._settings), params.width, params.height, decoded)

    def _requeue(self, run: Run, given: RunInput, why: str) -> None:
        """The engine died with the run: back to the queue with its input still in memory (the
        next claim starts it with no decode), or failed if the engine keeps dying on it."""
        run_id = run.id
        self._last_steps.pop(run_id, None)
        with self._sessions.begin() as session:
            run = lifecycle.requeue_lost(session, self._storage, run_id, self._settings.engine_max_attempts, why, under_fence=run.fence)
        if run is None:  # canceled meanwhile, or no longer ours
            return
        if run.status != lifecycle.QUEUED:
            return self._ended(run)
        self._metrics.requeued("engine_lost")
        log.warning("run %s: %s; queued again (%d of %d)", run_id, why, run.engine_crashes, self._settings.engine_max_attempts)
        self.submitted({run_id: given})  # claims it in a transaction of its own, or wakes the loop

    def _mark_running(self, run: Run) -> Run | None:
        with self._sessions.begin() as session:
            return lifecycle.mark_running(session, run.id, under_fence=run.fence)

    def _succeed(self, run: Run, given: RunInput, result: EditResult, drawn: workflows.Drawn | None, timings: dict[str, float],
                 last_step: tuple | None) -> None:
        # Files are named by run: a worker that lost the run must not write over the files of
        # the worker that took it over.
        with self._sessions.begin() as session:
            if not leases.holds(session, run.id, run.fence):
                return self._dropped(session, run, lifecycle.SUCCEEDED)
        started = time.perf_counter()
        output = outputs.store(run, given, result, self._storage, self._settings, drawn=drawn)
        output["timings_ms"].update(timings, dispatch_output=(time.perf_counter() - started) * 1000)  # preserve, encode, store
        if self._finish(run, lifecycle.SUCCEEDED, {"output": output}, last_step) is not None:
            self._metrics.run_succeeded(run.engine_model_id, len(result.images))

    async def _end(self, run: Run, status: str, **kw) -> None:
        await asyncio.to_thread(self._finish, run, status, kw, self._last_steps.pop(run.id, None))

    def _finish(self, run: Run, status: str, kw: dict, last_step: tuple | None = None) -> Run | None:
        """End the run under the fence of our claim (None if it had already ended, or was no
        longer ours). Its input file stays as long as its outputs (retention.py): the lineage
        shows it as the first turn's "before"."""
        with self._sessions.begin() as session:
            if last_step:
                _log_step(session, run.id, *last_step)
            ended = lifecycle.finish(session, self._storage, run.id, status, under_fence=run.fence, **kw)
            if ended is None:
                self._dropped(session, run, status)
        if ended is not None:
            failure = f" ({ended.failure_code}: {ended.failure_message})" if ended.failure_code else ""
            log.info("run %s: %s%s", run.id, ended.status, failure)
            self._ended(ended)
        return ended

    def _dropped(self, session: Session, run: Run, status: str) -> None:
        """Drop our end of a run that is no longer ours to end: canceled, or taken back."""
        now = session.execute(sa.select(Run.status, Run.fence, Run.worker_id).where(Run.id == run.id)).one()
        if now.status == lifecycle.CANCELED:
            if status == lifecycle.SUCCEEDED:  # canceled while the engine was finishing: the cancel stands, the files go (masks too)
                self._storage.delete_outputs(run.id)
            return
        # Its files stay: they are the new holder's, or will be.
        log.warning(
            "run %s: its lease was lost (our fence %d; now %s, fence %d, worker %s): our result (%s) is dropped",
            run.id, run.fence, now.status, now.fence, now.worker_id, status,
        )

    def _ended(self, run: Run) -> None:
        """After the commit that ended `run`: its streams, its callback."""
        self.progress.ended(run.id)
        if run.callback_url or run.batch_id:  # a delivery may be queued: its own or its batch's
            self._sender.wake()

    def _progress_hook(self, run_id: str):
        every = self._settings.progress_log_every_steps

        def on_progress(progress: StepProgress) -> None:  # called on the engine's (reader) thread
            self.progress.publish(run_id, progress)
            done, total = progress.done, progress.total
            # Only the steps that do something wake the event loop: a wake-up per step per
            # run took server CPU from the engine on every denoising step. (Streams are woken
            # by `publish` only while someone watches.)
            if done == total or done % every == 0 or run_id in self._cancel_requested:
                self._loop.call_soon_threadsafe(self._on_progress, run_id, done, total, utcnow())

        return on_progress

    def _on_progress(self, run_id: str, done: int, total: int, at) -> None:
        if run_id in self._cancel_requested:
            self._engine.cancel(run_id)
            self._engine.cancel(workflows.select_id(run_id))
        if done == total:
            # Logged in the transaction that ends the run, which follows at once (an engine
            # reports progress before the result): a write of its own would hold that one up,
            # or be held up by it.
            self._last_steps[run_id] = (done, total, at)
        elif done % self._settings.progress_log_every_steps == 0:
            task = asyncio.create_task(asyncio.to_thread(self._write_progress, run_id, done, total, at))
            self._log_writes.add(task)
            task.add_done_callback(self._log_writes.discard)

    def _write_progress(self, run_id: str, done: int, total: int, at: datetime) -> None:
        with self._sessions.begin() as session:
            _log_step(session, run_id, done, total, at)
            told = callbacks.enqueue_event(session, run_id, "logs", self._storage)  # Replicate's, when asked for
        if told:
            self._sender.wake()


def _log_step(session: Session, run_id: str, done: int, total: int, at: datetime) -> None:
    lifecycle.add_log(session, run_id, f"step {done}/{total}", meta={"step": done, "total_steps": total}, at=at)
