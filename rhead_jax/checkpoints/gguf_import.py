"""Compatibility module: the GGUF import now lives in the package :mod:`rhead_jax.checkpoints.gguf`
(``convert``, ``tokenizer``, ``default_model``); this re-exports its public names. Patch functions
in their defining modules, not here."""
from __future__ import annotations

from rhead_jax.checkpoints.gguf import (
    CACHE_ENV_VAR,
    CONVERTER_VERSION,
    DEFAULT_GGUF_FILENAME,
    DEFAULT_GGUF_PACKAGE,
    DEFAULT_GGUF_PIP_NAME,
    DEFAULT_MODEL_NAME,
    EMBEDDED_MODELS,
    MARKER_FILENAME,
    SUPPORTED_ARCHITECTURES,
    EmbeddedModel,
    __all__,
    build_tokenizer,
    cache_root,
    convert_gguf_to_hf,
    default_gguf_path,
    default_model_dir,
    embedded_gguf_path,
    embedded_model_dir,
    is_converted_dir,
    permute_qk,
    unpermute_qk,
)
