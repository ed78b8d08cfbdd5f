"""Per-key rate limits (images created, runs read): a fixed one-minute window, counted in memory.

Every answer to a create request carries X-RateLimit-Limit, X-RateLimit-Remaining and
X-RateLimit-Reset (seconds until the window resets); a refusal adds Retry-After.
Counts live in this process only: a restart or a second server process starts afresh.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        h = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining), "X-RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            h["Retry-After"] = str(self.reset_s)
        return h


class RateLimiter:
    """A fixed window per key, counting units (images for creations, reads for reads).

    One request may ask for more units than are left, even more than the whole limit (a
    batch of 100 × 4 images against 120 a minute), when the key has nothing counted: the
    excess is carried into the following windows, so the key waits it out and the rate over
    time stays at the limit."""

    def __init__(self, limit: int, window_s: float = 60.0, clock=time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key id → (window start, count)
        self._lock = threading.Lock()  # routes run in a thread pool

    def hit(self, key_id: str, units: int = 1) -> Decision:
        now = self._clock()
        with self._lock:
            start, count = self._windows.get(key_id, (now, 0))
            if now - start >= self.window_s:
                elapsed = int((now - start) // self.window_s)
                start, count = start + elapsed * self.window_s, max(0, count - elapsed * self.limit)
            allowed = count == 0 or count + units <= self.limit
            if allowed:
                count += units
            self._windows[key_id] = (start, count)
        reset = max(1, math.ceil(start + self.window_s - now))
        if not allowed:
            # Whole windows more until what is counted, and this request, fit in one.
            reset += int(self.window_s) * max(0, math.ceil((count + units - self.limit) / self.limit) - 1)
        return Decision(allowed, self.limit, max(0, self.limit - count), reset)
