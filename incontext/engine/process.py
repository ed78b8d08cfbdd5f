"""The local engine in a child process: what `incontext serve` runs by default.

In the server's own process the engine's thread shared the GIL with the event loop, the
route handlers and the database threads; on a 2-core machine every poll of a run stole time
from the denoising loop (an edit took 60% longer behind HTTP than in-process). A child
process has its own interpreter, and the server process never imports torch, so it accepts
requests while the child is still loading the model (they wait in the child's queue).

Parent and child talk over one socket pair, in small frozen dataclasses (pickled), one per
kind of message, so each says what it is and what it carries:
    parent → child: Setup first, then Edit · Cancel · Close
    child → parent: Ready · Progress · StepStats (each engine step) · Done · Failed · Canceled
                    (the last three end a request)
Every submitted request ends: with its result, its error, or — if the child dies while it
has the request — EngineLost (ENGINE_CRASHED: the dispatcher queues the run again, and fails
it only when children keep dying on it). A new child is started for the next requests, after
a growing pause if children keep dying before they are ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection

from incontext.engine.protocol import EditRequest, EditResult, ProgressCallback, StepCallback, StepProgress, StepStats
from incontext.errors import Cancelled, EngineLost, IncontextError
from incontext.models.registry import Registry

log = logging.getLogger(__name__)

RESPAWN_DELAY_S = 1.0  # after a child that never became ready; doubles up to RESPAWN_MAX_S
RESPAWN_MAX_S = 60.0
EXIT_LOAD_FAILED = 3  # the child's exit code when the default model does not load


class EngineCrashed(IncontextError):
    code = "ENGINE_ERROR"
    http_status = 500


# ------------------------------------------------------------ messages, parent → child


@dataclass(frozen=True)
class Setup:
    """The first message: what the child builds its engine from, and how it runs."""

    registry: Registry
    engine_kwargs: dict
    threads: int | None  # torch threads; None: torch's default
    log_level: int
    nice: int  # the engine's CPU priority: the server's before it lowered its own
    log_json: bool = False  # the server logs JSON lines (INCONTEXT_LOG_FORMAT=json): so does the child


@dataclass(frozen=True)
class Edit:
    request: EditRequest


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Close:
    """Finish what is running and exit (or exit at once while the model still loads)."""


# ------------------------------------------------------------ messages, child → parent


@dataclass(frozen=True)
class Ready:
    """The model is loaded: requests run from now on."""


@dataclass(frozen=True)
class Progress:
    request_id: str
    progress: StepProgress


@dataclass(frozen=True)
class Done:
    request_id: str
    result: EditResult


@dataclass(frozen=True)
class Failed:
    """The request ended with an error; its code and status reach the caller unchanged."""

    request_id: str
    code: str
    message: str
    http_status: int


@dataclass(frozen=True)
class Canceled:
    request_id: str
    message: str


Ended = Done | Failed | Canceled


class ProcessEngine:
    """An `EngineClient` whose `LocalEngine` (built from `engine_kwargs`) runs in a child process."""

    def __init__(self, registry: Registry, *, threads: int | None = None, http_nice: int = 0, on_step: StepCallback | None = None,
                 log_json: bool = False, **engine_kwargs):
        """`threads`: torch threads in the child (default: torch's, i.e. the cores). `http_nice`:
        once the child runs, this process (the HTTP server) lowers its own CPU priority by that
        many nice levels, so that on a machine with few cores requests and polls never take a
        core from the denoising loop (whose OpenMP threads all wait for the slowest one).
        `on_step`: told every engine step's StepStats, on the thread that reads the child."""
        self.registry = registry
        self.on_step = on_step
        self.threads = threads
        self._log_json = log_json
        self.http_nice = http_nice
        self._engine_nice: int | None = None  # this process's nice value before lowering it
        self.engine_kwargs = engine_kwargs
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        # Guards _conn, _pending, _unsent and _closing: sends, submits and a child's replacement.
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Future, ProgressCallback | None]] = {}
        self._unsent: list[EditRequest] = []  # submitted while no child could take them
        self._ready = threading.Event()
        self._closing = False
        self._delay = RESPAWN_DELAY_S

    # ------------------------------------------------------------ EngineClient

    async def start(self) -> None:
        """Start the child and return at once: it loads the model while requests queue."""
        with self._lock:
            self._spawn_locked()

    async def close(self) -> None:
        with self._lock:
            self._closing = True
            self._send_locked(Close())
            proc = self._proc
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        with self._lock:
            pending, self._pending, self._unsent = self._pending, {}, []
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(EngineCrashed("the engine was shut down"))

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def submit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._closing:
                fut.set_exception(EngineCrashed("the engine was shut down"))
                return fut
            self._pending[request.request_id] = (fut, on_progress)
            if not self._send_locked(Edit(request)):
                self._unsent.append(request)  # the child is being replaced: the next one gets it
        return fut

    async def edit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> EditResult:
        return await asyncio.wrap_future(self.submit(request, on_progress))

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            self._send_locked(Cancel(request_id))
            return request_id in self._pending

    # ------------------------------------------------------------ plumbing

    def _spawn_locked(self) -> None:
        """Start a child (caller holds the lock). A plain `python -m incontext.engine.process`
        child, not multiprocessing's spawn, which re-imports the parent's __main__. Its own
        process group: Ctrl-C or SIGTERM to the server must not kill it before the server has
        stopped dispatching (runs in flight stay `running` and are queued again at restart).
        Not its own session: Linux's scheduler shares the CPU between sessions first
        (autogroups), so nice values only order processes within one; in the server's
        session, the server's lowered priority (`http_nice`) really yields to the engine."""
        if self._engine_nice is None:
            self._engine_nice = os.getpriority(os.PRIO_PROCESS, 0)
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "incontext.engine.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), process_group=0,
            )
        except OSError:
            ours.close()
            log.exception("could not start the engine process")
            self._conn = None
            threading.Thread(target=self._respawn_later, daemon=True).start()
            return
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        self._conn = conn
        self._send_locked(Setup(self.registry, self.engine_kwargs, self.threads, logging.getLogger().getEffectiveLevel(), self._engine_nice, self._log_json))
        if self.http_nice and os.getpriority(os.PRIO_PROCESS, 0) == self._engine_nice:
            # On Linux the nice value belongs to the thread: this is the event loop's (startup
            # runs on it), and the worker threads it starts later inherit it.
            os.setpriority(os.PRIO_PROCESS, 0, min(19, self._engine_nice + self.http_nice))
        unsent, self._unsent = self._unsent, []
        for request in unsent:
            if request.request_id in self._pending and not self._send_locked(Edit(request)):
                self._unsent.append(request)
        threading.Thread(target=self._read, args=(conn,), name="incontext-engine-reader", daemon=True).start()

    def _send_locked(self, message: Setup | Edit | Cancel | Close) -> bool:
        try:
            self._conn.send(message)
            return True
        except (OSError, AttributeError):  # the child is gone (or not started yet)
            return False

    def _read(self, conn: Connection) -> None:
        """Hand the child's messages to the waiting futures; runs on its own thread."""
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return
                self._handle(message)
        except Exception:  # a message we cannot read must not leave requests waiting forever
            log.exception("the engine process sent something unreadable")
        finally:
            conn.close()
            self._child_gone(conn)

    def _handle(self, message: Ready | Progress | StepStats | Ended) -> None:
        match message:
            case Ready():
                self._delay = RESPAWN_DELAY_S
                self._ready.set()
            case Progress(request_id, progress):
                entry = self._pending.get(request_id)
                if entry and entry[1] is not None:
                    try:
                        entry[1](progress)
                    except Exception:  # a client's callback must not stop the reader
                        log.exception("progress callback failed")
            case StepStats():
                if self.on_step is not None:
                    try:
                        self.on_step(message)
                    except Exception:
                        log.exception("step callback failed")
            case Done() | Failed() | Canceled():
                with self._lock:
                    entry = self._pending.pop(message.request_id, None)
                if entry is None:
                    return
                fut = entry[0]
                match message:
                    case Done(_, result):
                        fut.set_result(result)
                    case Canceled(_, text):
                        fut.set_exception(Cancelled(text))
                    case Failed(_, code, text, status):
                        fut.set_exception(IncontextError(text, code=code, http_status=status))
            case _:  # _read logs it and treats the child as gone: nothing it has may be trusted
                raise TypeError(f"unexpected message from the engine process: {message!r}")

    def _child_gone(self, conn: Connection) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        proc = self._proc
        code = proc.wait() if proc is not None else None

        def error() -> IncontextError:  # one per request: a shared one collects every task's traceback
            if code == EXIT_LOAD_FAILED:  # the next child would fail the same way: not worth a retry
                return EngineCrashed("the engine process could not load the model (see the server log)")
            return EngineLost(f"the engine process stopped during the request (exit code {code})")

        with self._lock:
            if conn is not self._conn:
                return
            unsent = {r.request_id for r in self._unsent}
            # Requests the dead child had may be what killed it: they end here, and the caller
            # decides whether to try again (the dispatcher does, a bounded number of times).
            lost = [self._pending.pop(k) for k in list(self._pending) if k not in unsent]
            replace = not self._closing
            if replace:
                log.error("the engine process exited (code %s); starting a new one", code)
                if was_ready:
                    self._spawn_locked()
        for fut, _ in lost:
            if not fut.done():
                fut.set_exception(error())
        if replace and not was_ready:
            self._respawn_later()

    def _respawn_later(self) -> None:
        """A child that cannot start must not spin: wait longer each time, then try again."""
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, RESPAWN_MAX_S)
        with self._lock:
            if not self._closing:
                self._spawn_locked()


def _configure_logging(setup: Setup) -> None:
    """The child's lines on stderr, beside the server's: text marked [engine], or JSON lines
    with "process": "engine" where the server writes JSON, so a log shipper reads every line."""
    if not setup.log_json:
        logging.basicConfig(level=setup.log_level, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
        return
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                       static_fields={"process": "engine"}))
    logging.basicConfig(level=setup.log_level, handlers=[handler], force=True)


def _child_main(conn: Connection) -> None:
    """The child: a LocalEngine fed from the socket. It reads at once (so the server never
    blocks on a full socket), queueing requests while torch is imported and the model loads."""
    setup: Setup = conn.recv()
    registry = setup.registry
    _configure_logging(setup)
    try:  # a child started after the server lowered its priority takes the engine's back
        os.setpriority(os.PRIO_PROCESS, 0, setup.nice)
    except PermissionError:  # raising a priority needs privileges; the server's is still lower
        log.warning("the engine runs at the server's lowered priority (nice %d): restarting the server restores it",
                    os.getpriority(os.PRIO_PROCESS, 0))
    inbox: queue.Queue = queue.Queue()
    loaded = threading.Event()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone
                message = Close()
            if isinstance(message, Close) and not loaded.is_set():
                os._exit(0)  # nothing is running yet: no need to finish loading first
            inbox.put(message)
            if isinstance(message, Close):
                return

    threading.Thread(target=receive, name="incontext-engine-inbox", daemon=True).start()

    import torch

    from incontext.engine.local import LocalEngine  # torch is imported here, not in the server

    if setup.threads:
        torch.set_num_threads(setup.threads)
    lock = threading.Lock()

    def send(message: Ready | Progress | StepStats | Ended) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, EOFError):
                pass  # the server is gone; the inbox loop ends on its EOF
            except Exception as exc:  # e.g. a result that cannot be pickled: the request still ends
                if isinstance(message, Done):
                    conn.send(Failed(message.request_id, "ENGINE_ERROR", f"could not return the result: {exc.__class__.__name__}", 500))

    engine = LocalEngine(registry, on_step=send, **setup.engine_kwargs)

    def resolved(request_id: str, fut: Future) -> None:
        exc = fut.exception()
        if exc is None:
            send(Done(request_id, fut.result()))
        elif isinstance(exc, Cancelled):
            send(Canceled(request_id, exc.message))
        elif isinstance(exc, IncontextError):
            send(Failed(request_id, exc.code, exc.message, exc.http_status))
        else:
            send(Failed(request_id, "ENGINE_ERROR", f"the engine failed: {exc.__class__.__name__}", 500))

    # The engine's thread loads the model: this thread must run no torch work (see start_thread).
    engine.start_thread(preload=registry.default_id)
    engine.wait_ready()
    if engine.load_error is not None:
        os._exit(EXIT_LOAD_FAILED)  # the server fails the queued requests and tries again later
    loaded.set()

    def watch() -> None:  # the engine thread never ends on its own: if it does, so does the child
        if not engine.join():
            log.error("the engine thread died")
            os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    send(Ready())
    while True:
        match inbox.get():
            case Close():
                engine.stop()
                break
            case Cancel(request_id):
                engine.cancel(request_id)
            case Edit(request):
                fut = engine.submit(request, lambda progress, r=request.request_id: send(Progress(r, progress)))
                fut.add_done_callback(lambda f, r=request.request_id: resolved(r, f))
    engine.join(10)


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`: its message classes would pickle as
    # `__main__.Ready` (which the server cannot find) and would not be the classes the
    # server's messages unpickle to. The importable module's own function uses its own classes.
    from incontext.engine import process

    process._child_main(Connection(int(sys.argv[1])))
