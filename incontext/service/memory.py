"""The HTTP process gives the memory of decoded images back to the system once they are freed.

glibc serves a large allocation with its own mmap, returned at free, only above a threshold
that starts at 128 KB and rises to the size of each such block freed (up to 32 MB). Pillow
allocates images in 16 MB blocks, so after the first image is freed every later one comes
from the heap, and a heap freed in the middle stays with the process: four accepted palette
bombs left the server at 1 GB for good (bench load). A fixed threshold keeps every
allocation of a megabyte or more (image blocks, request bodies) on its own mapping, returned
the moment it is freed; Python's own small objects are unaffected. With it the same bombs
leave the server within a few MB of where it started.

Only the HTTP process: the engine's child (a fresh process) allocates and frees tensors of
the same sizes on every denoising step, where reusing heap memory is what it should do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; False where the C
    library is not glibc (musl and macOS already return large blocks at free)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: freed image memory may stay with the process")
        return False
    return True


def trim() -> None:
    """Hand the free memory at the top of every malloc arena back (glibc's malloc_trim): what
    the threshold above leaves, the many small blocks of a large compose or decode."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
