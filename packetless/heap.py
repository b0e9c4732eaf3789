"""The C heap of a long-running process (glibc's malloc), kept near what is in use. glibc keeps
the pages of blocks freed between blocks still in use (after a burst: a stalled broker's queue,
a large snapshot, a backlog's fetches and batch messages) and returns them only at
``malloc_trim``: ``trim`` calls it (every ``TRIM_INTERVAL_S`` in the sensor and the stream
worker). By default glibc also raises its mmap threshold to the size of each mapped block freed
(up to 32 MiB), so that later large blocks come from the heaps, among small ones: ``tune`` keeps
it at ``MMAP_THRESHOLD``, so that each large block is mapped apart and unmapped when freed.
Without glibc both do nothing.
"""

from __future__ import annotations

import ctypes

TRIM_INTERVAL_S = 10.0
MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)

_LIBC = ctypes.CDLL(None)


def trim() -> bool:
    """Return the free pages of every malloc arena to the system; True if any were."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    return bool(malloc_trim(0)) if malloc_trim is not None else False


def tune() -> bool:
    """Keep the mmap threshold at ``MMAP_THRESHOLD``; False without glibc."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) if mallopt is not None else False
