"""The host allocator on XLA:CPU: freed buffers go back to the system (glibc), so a sweep's resident
memory stays that of one batch (docs/performance.md). The engine turns it on when it starts on
CPU (`Engine.trim`) and releases the freed pages after each batch and after each XLA compile."""
from __future__ import annotations

import ctypes

__all__ = ["M_MMAP_THRESHOLD", "host_memory_returns_to_the_system", "release_after_compiles", "release_freed_memory"]


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


_after_compiles = False


def release_after_compiles() -> None:
    """`release_freed_memory` after every XLA compile (or read from the persistent cache) of this
    process from now on (idempotent; no-op without glibc): XLA:CPU's compiler frees ~50 MiB of
    working memory per program, which glibc would keep resident under the buffers of the run that
    follows until the batch ends (a cold sweep's peak; docs/performance.md)."""
    global _after_compiles
    if _after_compiles or _libc() is None:
        return
    from jax import monitoring

    def on_duration(event: str, seconds: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            release_freed_memory()

    monitoring.register_event_duration_secs_listener(on_duration)
    _after_compiles = True
