"""The local engine in a child process: what `incontext serve` runs by default.

In the server's own process the engine's thread shared the GIL with the event loop, the
route handlers and the database threads; on a 2-core machine every poll of a run stole time
from the denoising loop (an edit took 60% longer behind HTTP than in-process). A child
process has its own interpreter, and the server process never imports torch, so it accepts
requests while the child is still loading the model (they wait in the child's queue).

Parent and child talk over one pipe, in plain tuples:
    parent → child: ("edit", EditRequest) · ("cancel", request_id) · ("close",)
    child → parent: ("ready",) · ("progress", id, done, total) · ("done", id, EditResult)
                    · ("error", id, code, message, http_status) · ("canceled", id, message)
If the child dies, its requests fail with ENGINE_ERROR (their runs end `failed`) and a new
child is started for the next ones.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection

from incontext.engine.protocol import EditRequest, EditResult, ProgressCallback
from incontext.errors import Cancelled, IncontextError
from incontext.models.registry import Registry

log = logging.getLogger(__name__)

RESPAWN_DELAY_S = 1.0


class EngineCrashed(IncontextError):
    code = "ENGINE_ERROR"
    http_status = 500


class ProcessEngine:
    """An `EngineClient` whose `LocalEngine` (built from `engine_kwargs`) runs in a child process."""

    def __init__(self, registry: Registry, *, threads: int | None = None, **engine_kwargs):
        """`threads`: torch threads in the child (default: torch's, i.e. the cores)."""
        self.registry = registry
        self.threads = threads
        self.engine_kwargs = engine_kwargs
        self._conn: Connection | None = None
        self._proc = None
        self._send_lock = threading.Lock()
        self._pending: dict[str, tuple[Future, ProgressCallback | None]] = {}
        self._unsent: list[EditRequest] = []  # submitted while a child was being replaced
        self._ready = threading.Event()
        self._closing = False

    # ------------------------------------------------------------ EngineClient

    async def start(self) -> None:
        """Start the child and return at once: it loads the model while requests queue."""
        self._spawn()

    async def close(self) -> None:
        self._closing = True
        self._send(("close",))
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def submit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._pending[request.request_id] = (fut, on_progress)
        with self._send_lock:
            if not self._send_locked(("edit", request)):
                self._unsent.append(request)  # the child is being replaced: the next one gets it
        return fut

    async def edit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> EditResult:
        return await asyncio.wrap_future(self.submit(request, on_progress))

    def cancel(self, request_id: str) -> bool:
        self._send(("cancel", request_id))
        return request_id in self._pending

    # ------------------------------------------------------------ plumbing

    def _spawn(self) -> None:
        # A plain `python -m incontext.engine.process` child (not multiprocessing's spawn,
        # which re-imports the parent's __main__), fed over one end of a socket pair.
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "incontext.engine.process", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        theirs.close()
        conn = Connection(ours.detach())
        with self._send_lock:
            conn.send((self.registry, self.engine_kwargs, self.threads, logging.getLogger().getEffectiveLevel()))
            self._conn = conn
            unsent, self._unsent = self._unsent, []
            for request in unsent:
                self._send_locked(("edit", request))
        threading.Thread(target=self._read, args=(conn,), name="incontext-engine-reader", daemon=True).start()

    def _send(self, message: tuple) -> bool:
        with self._send_lock:
            return self._send_locked(message)

    def _send_locked(self, message: tuple) -> bool:
        try:
            self._conn.send(message)
            return True
        except (OSError, AttributeError):  # the child is gone (or not started yet)
            return False

    def _read(self, conn: Connection) -> None:
        """Hand the child's messages to the waiting futures; runs on its own thread."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "progress":
                _, request_id, done, total = message
                entry = self._pending.get(request_id)
                if entry and entry[1] is not None:
                    try:
                        entry[1](done, total)
                    except Exception:  # a client's callback must not stop the reader
                        log.exception("progress callback failed")
            else:
                entry = self._pending.pop(message[1], None)
                if entry is None:
                    continue
                fut = entry[0]
                if kind == "done":
                    fut.set_result(message[2])
                elif kind == "canceled":
                    fut.set_exception(Cancelled(message[2]))
                else:
                    _, _, code, text, status = message
                    fut.set_exception(IncontextError(text, code=code, http_status=status))
        self._child_gone(conn)

    def _child_gone(self, conn: Connection) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        with self._send_lock:
            unsent = {r.request_id for r in self._unsent}
            # Requests the dead child had may be what killed it: they fail, they are not retried.
            lost = {k: v for k, v in self._pending.items() if k not in unsent}
            for request_id in lost:
                del self._pending[request_id]
        for fut, _ in lost.values():
            if not fut.done():
                fut.set_exception(EngineCrashed("the engine process stopped during the request"))
        if not self._closing and conn is self._conn:
            log.error("the engine process exited (code %s); starting a new one", self._proc.wait() if self._proc else None)
            if not was_ready:
                time.sleep(RESPAWN_DELAY_S)  # a child that cannot start must not spin
            self._spawn()


def _child_main(conn: Connection) -> None:
    """The child: a LocalEngine fed from the pipe. Requests queue while the model loads."""
    registry, engine_kwargs, threads, log_level = conn.recv()
    import torch

    from incontext.engine.local import LocalEngine  # torch is imported here, not in the server

    if threads:
        torch.set_num_threads(threads)

    engine = LocalEngine(registry, **engine_kwargs)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, BrokenPipeError):
                pass  # the server is gone; the loop below ends on EOF

    def resolved(request_id: str, fut: Future) -> None:
        exc = fut.exception()
        if exc is None:
            send(("done", request_id, fut.result()))
        elif isinstance(exc, Cancelled):
            send(("canceled", request_id, exc.message))
        elif isinstance(exc, IncontextError):
            send(("error", request_id, exc.code, exc.message, exc.http_status))
        else:
            send(("error", request_id, "ENGINE_ERROR", f"the engine failed: {exc.__class__.__name__}", 500))

    def progress(request_id: str):
        return lambda done, total: send(("progress", request_id, done, total))

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("close",)
            if message[0] == "close":
                engine.stop()
                return
            if message[0] == "cancel":
                engine.cancel(message[1])
            else:
                request: EditRequest = message[1]
                fut = engine.submit(request, progress(request.request_id))
                fut.add_done_callback(lambda f, r=request.request_id: resolved(r, f))

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    reader = threading.Thread(target=receive, name="incontext-engine-inbox", daemon=True)
    reader.start()
    try:
        engine.load(registry.default_id)
        loaded = True
    except Exception:  # requests still get the loader's error, with its code
        log.exception("could not load the default model")
        loaded = False
    engine.start_thread()
    if loaded:
        send(("ready",))
    reader.join()
    if engine._thread is not None:
        engine._thread.join(10)


if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])))
