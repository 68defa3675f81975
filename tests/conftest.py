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
