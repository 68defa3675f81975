"""Compiled XLA programs: JAX's persistent compilation cache, and a count of what a run needed.

The engine turns the cache on (config.compile_cache) before it compiles anything, so a second
sweep, an ablation after a sweep and a resumed sweep on a fresh VM read their programs back; and
it logs `COMPILES` after each run of batches.
"""
from __future__ import annotations

import dataclasses

import jax


def enable_compile_cache(enabled: bool = True) -> str | None:
    """Point JAX's persistent compilation cache at $RHEAD_JAX_CACHE/jax_compilation_cache (or the
    directory the user set with JAX_COMPILATION_CACHE_DIR) and cache every program: programs
    compiled once are read back by any later process with the same shapes, jax version and
    backend. Returns the directory."""
    if not enabled:
        return None
    path = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR, when the user set it
    if not path:
        from rhead_jax.checkpoints.gguf_import import cache_root

        path = str(cache_root() / "jax_compilation_cache")
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program: even small
    # ones add up (a SmolLM2 sweep needs ~30, a quarter of its compile time under 0.2 s each)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass
class CompileStats:
    """XLA programs this process needed: each is compiled or read from the persistent cache."""

    programs: int = 0
    cache_hits: int = 0
    seconds: float = 0.0          # compiling and reading compiled programs

    @property
    def compiled(self) -> int:
        return self.programs - self.cache_hits

    def __str__(self) -> str:
        return (f"{self.programs} XLA programs ({self.compiled} compiled, {self.cache_hits} read from the "
                f"persistent compilation cache) in {self.seconds:.1f}s")


COMPILES = CompileStats()
_listening = False


def count_compiles() -> CompileStats:
    """Start counting programs into the process-wide `COMPILES` (idempotent); returns it."""
    global _listening
    if not _listening:
        from jax import monitoring

        def on_duration(event: str, seconds: float, **_):
            if event == "/jax/core/compile/backend_compile_duration":  # a compile or a cache read
                COMPILES.programs += 1
                COMPILES.seconds += seconds

        def on_event(event: str, **_):
            if event == "/jax/compilation_cache/cache_hits":
                COMPILES.cache_hits += 1

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
        _listening = True
    return COMPILES
