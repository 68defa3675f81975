"""Convert a llama- or gemma3-architecture GGUF file into a Hugging Face model directory, without torch.

The directory is what ``transformers`` ``from_pretrained`` and our JAX loaders expect: ``config.json``
(``LlamaConfig`` / ``Gemma3TextConfig``-compatible, built by :mod:`.metadata`), ``model.safetensors``
(dequantized weights under HF names), ``tokenizer.json`` / ``tokenizer_config.json`` (see
:mod:`.tokenizer`), ``generation_config.json`` (bos/eos/pad ids) and the marker
``rhead_jax_gguf_import.json`` (source, dtype, converter version), written last. Only ``numpy``,
``gguf``, ``tokenizers`` and ``safetensors.numpy`` are used.

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
from rhead_jax.checkpoints.gguf.metadata import build_config, check_architecture, field, open_reader
from rhead_jax.checkpoints.gguf.tokenizer import build_tokenizer, tokenizer_config

__all__ = ["CONVERTER_VERSION", "MARKER_FILENAME", "convert_gguf_to_hf", "is_converted_dir", "permute_qk",
           "unpermute_qk"]

#: Bump when the output of :func:`convert_gguf_to_hf` changes, to invalidate cached conversions.
CONVERTER_VERSION: Final[int] = 1
#: Written last into every converted directory; marks a complete conversion made by this module.
MARKER_FILENAME: Final[str] = "rhead_jax_gguf_import.json"
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

# Small helpers ------------------------------------------------------------------------------------


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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Indented JSON + newline, non-ASCII kept, UTF-8 whatever the locale; written atomically."""
    # io.atomic_write_json would encode with the locale's encoding; the bytes must not depend on it.
    io.atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
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
    reader = open_reader(gguf_path)
    arch = check_architecture(reader, gguf_path)
    _check_out_dir(out_dir)  # Fail before the expensive part.
    logging.info("Converting %s -> %s (dtype=%s)", gguf_path, out_dir, dtype)

    tokenizer = build_tokenizer(reader, gguf_path)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{gguf_path}: tensor 'token_embd.weight' is missing.")
    vocab_size = int(embed.shape[-1])  # GGUF shape is [hidden, vocab] (innermost first).
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"{gguf_path}: tokenizer vocabulary is larger than the embedding matrix.")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = build_config(reader, gguf_path, arch=arch, vocab_size=vocab_size, tied=tied, dtype=dtype)
    generation_config = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if config[key] is not None}
    marker = {
        "converter": _MARKER_CONVERTER,
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "dtype": dtype,
        "general.name": field(reader, "general.name", None),
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
