"""Tests of rhead_jax.needle.prompts: building one instance (ORIGINAL.md section 2), faithful mode."""
from __future__ import annotations

import numpy as np
import pytest

from rhead_jax.errors import UserError
from rhead_jax.needle import (
    CONTEXT_BUFFER,
    LLAMA2_PERIOD_IDS,
    QUESTION_TEMPLATE,
    TokenizerData,
    build_grid,
    build_instance,
    check_length,
    find_answer_span,
)
from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401 - fixtures
from tests.helpers.needle_tokenizer import enc


# ----------------------------------------------------------------------------- insertion and length

@pytest.mark.parametrize("depth", [11, 22, 33, 50, 67, 89])
def test_needle_inserted_at_sentence_boundary(tok, haystack, needles, depth):
    n = needles[0]
    inst = build_instance(tok, haystack, n, 3000, depth, chat=False)
    ctx = inst.context_ids.tolist()
    pos, m = inst.needle_pos, len(inst.needle_ids)
    assert list(inst.needle_ids) == enc(tok, n.needle)
    assert ctx[pos:pos + m] == list(inst.needle_ids)
    assert pos > 0 and tok.decode([ctx[pos - 1]]).strip() == "."
    hay_ctx = ctx[:pos] + ctx[pos + m:]
    start = int(len(hay_ctx) * (depth / 100))
    assert pos <= start
    # the nearest period at or before the depth's insertion point
    periods = TokenizerData(tok).period_ids
    assert not any(t in periods for t in hay_ctx[pos:start])
    k = inst.context_text.index(n.needle)
    assert inst.context_text[k - 1] == "."


def test_depth_0_and_100(tok, haystack, needles):
    n = needles[1]
    first = build_instance(tok, haystack, n, 2000, 0, chat=False)
    assert first.needle_pos == 0
    assert first.context_text.startswith(n.needle)
    last = build_instance(tok, haystack, n, 2000, 100, chat=False)
    assert last.needle_pos == len(last.context_ids) - len(last.needle_ids)
    assert last.context_text.endswith(n.needle)
    # the question follows the context with no separator, exactly as in the original
    assert last.prompt_text == last.context_text + QUESTION_TEMPLATE.format(question=n.question)
    assert last.prompt_text.endswith(n.needle + "Based on the content of the book, Question: " + n.question + "\nAnswer:")
    # the haystack before the needle is the same at both depths
    assert last.context_text[: -len(n.needle)] == first.context_text[len(n.needle):]


def test_no_period_in_haystack_inserts_at_start(tok, needles):
    text = "a haystack without any sentence end " * 400
    inst = build_instance(tok, text, needles[0], 1500, 50, chat=False)
    assert inst.needle_pos == 0
    assert inst.context_text.startswith(needles[0].needle)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [1000, 6158, 50000])
def test_prompt_length_close_to_length(tok, haystack, needles, chat, length):
    inst = build_instance(tok, haystack, needles[2], length, 44, chat=chat)
    assert len(inst.context_ids) == length - CONTEXT_BUFFER
    assert length - CONTEXT_BUFFER < inst.num_prompt_tokens <= length
    assert inst.prompt_ids.dtype == np.int32 and not inst.prompt_ids.flags.writeable
    if length == 50000:  # longer than one copy of the essay: repeated as in the original
        assert len(enc(tok, haystack)) < length
        assert inst.context_text.count("AREOPAGITICA") >= 2



# ----------------------------------------------------------------------------- faithful mode

@pytest.mark.parametrize("chat", [False, True])
def test_faithful_differs_only_in_quirks(tok, haystack, needles, chat):
    n = needles[0]
    bos = tok.bos_token_id
    for depth in (33, 100):
        d = build_instance(tok, haystack, n, 2000, depth, chat=chat, faithful=False)
        f = build_instance(tok, haystack, n, 2000, depth, chat=chat, faithful=True)
        assert (d.faithful, f.faithful) == (False, True)
        # QUIRK: Llama-2's period ids, whatever the tokenizer
        if depth < 100:
            assert f.needle_pos == 0 or f.context_ids[f.needle_pos - 1] in LLAMA2_PERIOD_IDS
            assert d.context_ids[d.needle_pos - 1] in TokenizerData(tok).period_ids
        # QUIRK: special tokens kept: BOS before the haystack (twice, via the decode/re-encode
        # round trip) and before the needle, as literal strings in the context text
        assert f.needle_ids[0] == bos and list(f.needle_ids[1:]) == list(d.needle_ids)
        assert f.context_text.startswith("<s>")
        assert "<s>" + n.needle in f.context_text
        assert "<s>" not in d.context_text and bos not in d.context_ids.tolist()
        assert f.prompt_ids.tolist().count(bos) == 4  # prompt/template BOS + 2 haystack + 1 needle
        assert d.prompt_ids.tolist().count(bos) == 1
        # same: budget, question, template
        assert len(f.context_ids) == len(d.context_ids) == 2000 - CONTEXT_BUFFER
        tail = f"Based on the content of the book, Question: {n.question}\nAnswer:"
        assert tail in f.prompt_text and tail in d.prompt_text
        assert f.prompt_text.split(tail)[1] == d.prompt_text.split(tail)[1]
        # same haystack text, except the tokens the BOS strings take from the budget
        f_hay = f.context_text.replace("<s>", "").replace(n.needle, "")
        d_hay = d.context_text.replace(n.needle, "")
        assert d_hay.startswith(f_hay[:-20]) and len(d_hay) > len(f_hay)
        # span: default exact; faithful = the original's search on the standalone answer
        assert f.answer_ids == tuple(enc(tok, n.real_needle))
        assert f.span == find_answer_span(f.prompt_ids, f.answer_ids)
        assert d.prompt_ids[d.span[0]:d.span[1]].tolist() == list(d.answer_ids)



# ----------------------------------------------------------------------------- lengths and depths

def test_length_checks(tok, haystack, needles):
    check_length(4096, 4096)
    check_length(1000, None)
    with pytest.raises(UserError, match=r"60000 exceeds .* 32768.*lengths <= 32768"):
        check_length(60000, 32768)
    for bad in (0, -5, 1.5, "100", True):
        with pytest.raises(UserError):
            check_length(bad, None)
    # checked before any work: the tokenizer is never touched
    with pytest.raises(UserError, match="exceeds"):
        build_instance(None, "unused", needles[0], 8192, 50, chat=False, max_positions=4096)
    with pytest.raises(UserError, match="exceeds"):
        build_grid(None, "unused", needles, [1000, 8192], [50], chat=False, max_positions=4096)
    with pytest.raises(UserError, match="too short") as ei:
        build_instance(tok, haystack, needles[0], 210, 50, chat=False, needle_index=2)
    assert "L210_D50_N2" in str(ei.value) and "config.sweep.lengths" in str(ei.value)
    for bad_depth in (-1, 100.5, float("nan"), "deep"):
        with pytest.raises(UserError, match="depth"):
            build_instance(tok, haystack, needles[0], 1000, bad_depth, chat=False)


