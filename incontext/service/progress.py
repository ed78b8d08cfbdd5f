"""Live progress of runs, for `GET /v1/runs/{id}/events` (routes/events.py).

The engine reports every denoising step, and a small preview on a few of them, to the
dispatcher, on the thread that reads the engine; the dispatcher publishes them here. A
stream reads a run's steps from here and everything else (queued position, the end with
its outputs) from the database, so it also works for a run that ended before it connected,
or one another server process ran.

A run's steps are numbered 1, 2, … as they happen; the number is the SSE `id`, so
`Last-Event-ID: n` resumes after step n. Steps are kept while the run runs and for
`keep_ended_s` after it ends, for at most `max_runs` runs: publishing costs a list append,
whether or not anyone watches.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from PIL import Image

from incontext.engine.protocol import StepProgress


@dataclass(frozen=True)
class StepEvent:
    id: int
    step: int
    total_steps: int
    preview: str | None  # a data:image/png URI, at the latent resolution


@dataclass
class _Channel:
    events: list[StepEvent] = field(default_factory=list)
    ended_at: float | None = None  # monotonic; set when the run ended
    waiters: set[asyncio.Event] = field(default_factory=set)


def preview_uri(rgb) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class RunProgress:
    def __init__(self, *, max_runs: int = 1024, keep_ended_s: float = 600.0):
        self.max_runs = max_runs
        self.keep_ended_s = keep_ended_s
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop streams wait on."""
        self._loop = loop

    def publish(self, run_id: str, progress: StepProgress) -> None:
        """A step of a run (any thread)."""
        # Encoded here, on the engine's reader thread, once for every stream of the run.
        preview = preview_uri(progress.preview) if progress.preview is not None else None
        with self._lock:
            channel = self._channel(run_id)
            channel.events.append(StepEvent(len(channel.events) + 1, progress.done, progress.total, preview))
            self._notify(channel)

    def ended(self, run_id: str) -> None:
        """The run ended (any thread): its streams read the end from the database now."""
        with self._lock:
            channel = self._channel(run_id)
            channel.ended_at = time.monotonic()
            self._notify(channel)

    def since(self, run_id: str, after: int) -> list[StepEvent]:
        with self._lock:
            channel = self._channels.get(run_id)
            return channel.events[after:] if channel else []

    def last_id(self, run_id: str) -> int:
        with self._lock:
            channel = self._channels.get(run_id)
            return len(channel.events) if channel else 0

    async def wait(self, run_id: str, after: int, timeout: float) -> str:
        """Until the run has a step after `after` ("step"), it ended ("ended") or `timeout`
        seconds passed ("timeout"). On the event loop given to `bind`."""
        woken = asyncio.Event()
        with self._lock:
            channel = self._channel(run_id)
            if len(channel.events) > after:
                return "step"
            if channel.ended_at is not None:
                return "ended"
            channel.waiters.add(woken)
        try:
            await asyncio.wait_for(woken.wait(), timeout)
        except TimeoutError:
            pass
        with self._lock:
            channel.waiters.discard(woken)
            if len(channel.events) > after:
                return "step"
            return "ended" if channel.ended_at is not None else "timeout"

    def _channel(self, run_id: str) -> _Channel:
        """The run's channel, made if new (the caller holds the lock); old ones are dropped."""
        channel = self._channels.get(run_id)
        if channel is not None:
            return channel
        channel = self._channels[run_id] = _Channel()
        now = time.monotonic()
        for old_id, old in list(self._channels.items()):
            if len(self._channels) <= self.max_runs and (old.ended_at is None or now - old.ended_at < self.keep_ended_s):
                break  # oldest first: the rest are newer
            if old_id != run_id and not old.waiters:
                del self._channels[old_id]
        return channel

    def _notify(self, channel: _Channel) -> None:
        if channel.waiters and self._loop is not None:
            for woken in channel.waiters:
                try:
                    self._loop.call_soon_threadsafe(woken.set)
                except RuntimeError:  # the loop is closed: the server is stopping
                    return
