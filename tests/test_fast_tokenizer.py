"""rhead_jax.checkpoints.fast_tokenizer: the sweep's tokenizer without transformers gives
transformers' outputs (the needle grid, stop tokens, decoded answers, chat prompts, offsets)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rhead_jax.checkpoints import load_tokenizer, resolve_model_dir
from rhead_jax.checkpoints.fast_tokenizer import FastTokenizer, native_config
from rhead_jax.needle import build_grid, load_haystack, load_needles
from rhead_jax.needle.chat import chat_prompt
from rhead_jax.plan import leading_stop_tokens, stop_tokens
from tests.helpers.needle_tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') of the embedded SmolLM2-135M-Instruct."""
    import transformers

    d = resolve_model_dir("default")
    return load_tokenizer(d), transformers.PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)


def _same_instances(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for f in ("key", "prompt_text", "context_text", "needle_ids", "needle_pos", "answer_ids", "span",
                  "needle_span", "question_span"):
            assert getattr(x, f) == getattr(y, f), (x.key, f)
        np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
        np.testing.assert_array_equal(x.context_ids, y.context_ids)


def test_default_model_tokenizer_is_built_without_transformers():
    code = textwrap.dedent("""
        import sys
        from rhead_jax.checkpoints import load_tokenizer, resolve_model_dir
        tok = load_tokenizer(resolve_model_dir("default"))
        print(type(tok).__name__, "transformers" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["FastTokenizer", "False"]


def test_backend_is_the_one_transformers_sets_up(smollm2):
    ours, hf = smollm2
    assert isinstance(ours, FastTokenizer)
    assert ours.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    assert ours.chat_template == hf.chat_template
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size", "all_special_ids",
                 "special_tokens_map"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab() and ours.get_added_vocab() == hf.get_added_vocab()


@pytest.mark.parametrize("chat", [True, False])
def test_needle_grid_is_identical(smollm2, chat):
    """The sweep's grid (chat prompts, the answer and question spans from offsets), bundled haystack
    and needles, every length of the default config."""
    ours, hf = smollm2
    hay, needles = load_haystack(), load_needles()
    grid = [build_grid(t, hay, needles, [500, 1000, 2000], [0, 50, 100], chat=chat, faithful=False,
                       max_positions=8142) for t in (ours, hf)]
    _same_instances(*grid)


def test_stops_decodes_and_encodings_are_identical(smollm2):
    ours, hf = smollm2
    for faithful in (True, False):
        assert stop_tokens(ours, faithful=faithful) == stop_tokens(hf, faithful=faithful)
        assert leading_stop_tokens(ours, faithful=faithful) == leading_stop_tokens(hf, faithful=faithful)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, len(hf), n).tolist() for n in (1, 7, 50)] + [[1, 2, 3, 4, 5, 6, 7]]
    for skip in (True, False):
        assert ours.batch_decode(seqs, skip_special_tokens=skip) == hf.batch_decode(seqs, skip_special_tokens=skip)
        assert ours.decode(np.asarray(seqs[2]), skip_special_tokens=skip) == hf.decode(seqs[2], skip_special_tokens=skip)
    text = "<|im_start|>user\n  The best thing to do in San Francisco is\n\n eat a sandwich.<|im_end|>\n"
    for special in (True, False):
        a = ours(text, add_special_tokens=special, return_offsets_mapping=True)
        b = hf(text, add_special_tokens=special, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
    assert ours.convert_ids_to_tokens(seqs[1]) == hf.convert_ids_to_tokens(seqs[1])
    assert ours.convert_tokens_to_ids(["<|im_end|>", "hello", "not-a-token-x"]) == hf.convert_tokens_to_ids(
        ["<|im_end|>", "hello", "not-a-token-x"])
    assert chat_prompt(ours, "Hi {there}\n") == chat_prompt(hf, "Hi {there}\n")


def test_other_arguments_and_attributes_go_to_transformers(smollm2):
    ours, hf = smollm2
    assert ours.model_max_length == hf.model_max_length          # not mirrored: read from transformers'
    batch = ours(["a b", "c"], add_special_tokens=False)        # a batch: transformers' call
    assert batch["input_ids"] == hf(["a b", "c"], add_special_tokens=False)["input_ids"]


def test_a_saved_transformers_tokenizer_with_a_bos_template(tmp_path):
    """A tokenizer transformers saved (chat_template.jinja, a BOS-adding post-processor, a template
    reading bos_token): built natively, with the same grid and chat prompts."""
    hf = make_tokenizer()
    hf.save_pretrained(tmp_path)
    assert native_config(tmp_path) is not None
    ours = load_tokenizer(tmp_path)
    import transformers

    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(ours, FastTokenizer) and ours.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    assert chat_prompt(ours, "Question: what?") == chat_prompt(hf, "Question: what?")
    hay, needles = load_haystack(), load_needles()
    _same_instances(*[build_grid(t, hay, needles, [300], [0, 100], chat=True, faithful=False, max_positions=4000)
                      for t in (ours, hf)])


def test_tokenizers_transformers_would_change_use_transformers(tmp_path):
    hf = make_tokenizer()
    hf.save_pretrained(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    import json

    config = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))   # a clean-up pass: not mirrored
    assert native_config(tmp_path) is None
    assert not isinstance(load_tokenizer(tmp_path), FastTokenizer)
