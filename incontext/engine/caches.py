"""Small LRU caches the engine keeps between requests.

- text: (model, prompt) → (txt, vec): clients repeat instructions, and encoding is per prompt;
- context latents: (model, image content hash) → packed latents: the same image is edited
  again and again (retries, num_images, multi-turn on the same input);
- outputs: request id → its output latents, so a multi-turn edit that names an earlier output
  starts from the exact latents instead of a decode → 8-bit → encode round trip.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

from PIL import Image

V = TypeVar("V")


class LRU(Generic[V]):
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: V) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def image_key(image: Image.Image) -> str:
    """A content hash of an image's pixels and size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.width}x{image.height}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
