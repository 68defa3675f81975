"""The host allocator on XLA:CPU: freed buffers go back to the system (glibc), so a sweep's resident
memory stays that of one batch (docs/performance.md). The engine turns it on when it starts on
CPU (`Engine.trim`) and releases the freed pages after each batch."""
from __future__ import annotations

import ctypes

__all__ = ["M_MMAP_THRESHOLD", "host_memory_returns_to_the_system", "release_freed_memory"]


def _libc():
    """glibc, or None (another C library: the host allocator is left as it is)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter


def host_memory_returns_to_the_system() -> bool:
    """On XLA:CPU the KV caches, the prefill's temporaries and the decode loop's buffers live in the
    process's heap, and glibc keeps what they free: after a batch of one shape the next batch's
    buffers (other shapes) land beside the freed ones, and the freed pages stay resident. Here
    blocks of 1 MiB and more are mapped on their own (freed: returned at once; glibc's default
    threshold drifts up to 32 MiB), and `release_freed_memory` hands the heap's free pages back
    after each batch. The same values are computed. Returns False where the C library is not glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): the heap's free pages back to the system (no-op elsewhere)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
