"""UUIDv7 ids: time-ordered, so sorting runs by id sorts them by creation (RFC 9562 §5.7)."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> str:
    """A UUIDv7 string. Ids made by this process are strictly increasing, even within one
    millisecond: `rand_a` holds a counter seeded randomly each millisecond (RFC 9562 method 1)."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _counter = ms, int.from_bytes(os.urandom(2)) & 0x7FF  # top bit left for headroom
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter spent: borrow the next millisecond
                _last_ms, _counter = _last_ms + 1, 0
        ms, counter = _last_ms, _counter
    rand_b = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))
