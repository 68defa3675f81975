"""Tests of rhead_jax.needle.span: locating the answer span (ORIGINAL.md section 3)."""
from __future__ import annotations

import numpy as np
import pytest

from rhead_jax.errors import UserError
from rhead_jax.needle import (
    Needle,
    NeedleNotFoundError,
    answer_token_ids,
    build_instance,
    find_answer_span,
    load_needles,
    san_francisco_needle,
)
from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401 - fixtures
from tests.helpers.needle_tokenizer import REFERENCE_NEEDLES, enc, reference_needles


def _all_needle_sets():
    sets = [("bundled", load_needles()), ("san_francisco", [san_francisco_needle()])]
    if REFERENCE_NEEDLES.is_file():
        sets.append(("original", load_needles(REFERENCE_NEEDLES)))
    return sets


@pytest.mark.parametrize("chat", [False, True])
def test_span_covers_exactly_the_answer(tok, haystack, chat):
    sets = _all_needle_sets()
    if len(sets) < 3:
        reference_needles()  # skips with the reason
    for _, ns in sets:
        for n in ns:
            for depth in (0, 50, 100):
                inst = build_instance(tok, haystack, n, 2500, depth, chat=chat)
                s, e = inst.span
                assert e - s == len(inst.answer_ids)
                assert inst.prompt_ids[s:e].tolist() == list(inst.answer_ids)
                assert tok.decode(inst.prompt_ids[s:e].tolist()).strip().lower() == n.real_needle.strip().lower()
                # the span lies inside the needle, inside the context (before the question)
                assert inst.context_text.index(n.needle) <= len(tok.decode(inst.prompt_ids[:s].tolist()))
                assert e <= inst.num_prompt_tokens - len(enc(tok, n.question))


def test_find_answer_span_original_search():
    ans = list(range(100, 112))  # 12 distinct ids
    prompt = [1, 2, 3] + ans + [4, 5]
    # the original's search: the window starting one token early misses only the last id
    # (11/12 > 0.9) and is found first
    assert find_answer_span(prompt, ans) == (2, 14)
    assert find_answer_span(prompt, ans, prefer_exact=True) == (3, 15)
    # no exact occurrence: falls back to the 90% set test
    fuzzy = [1, 2, 3, 99] + ans[1:] + [4, 5]
    assert find_answer_span(fuzzy, ans, prefer_exact=True) == find_answer_span(fuzzy, ans) == (3, 15)
    # exactly 90% coverage is not enough ("more than 90%")
    ten = list(range(200, 210))
    with pytest.raises(NeedleNotFoundError):
        find_answer_span([1] + ten[:9] + [2, 3], ten)
    assert find_answer_span(np.array([7, 7] + ten, dtype=np.int32), ten) == (2, 12)
    with pytest.raises(UserError, match="no tokens"):
        find_answer_span([1, 2], [])


def test_needle_not_found_error(tok, haystack):
    with pytest.raises(NeedleNotFoundError) as ei:
        find_answer_span([1, 2, 3, 4], [7, 8, 9], description="my instance")
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, UserError)
    assert "my instance" in str(ei.value)
    bad = Needle(needle="The lantern of Gorrowby is painted a deep green every spring.",
                 question="What colour is the lantern of Gorrowby?",
                 real_needle="painted with seventeen thin coats of saffron yellow lacquer by the ferrymen")
    with pytest.raises(NeedleNotFoundError) as ei:
        build_instance(tok, haystack, bad, 1000, 50, chat=False, needle_index=3)
    msg = str(ei.value)
    for part in ("L1000_D50_N3", "length=1000", "depth=50", bad.needle, "not a sub-phrase", "Fix the needles file"):
        assert part in msg


def test_answer_token_ids(tok, needles):
    n = needles[0]
    standalone = answer_token_ids(tok, n, in_context=False)
    assert list(standalone) == enc(tok, n.real_needle)
    in_ctx = answer_token_ids(tok, n, in_context=True)
    assert tok.decode(list(in_ctx)) == " " + n.real_needle  # keeps the leading space of the needle
    assert tuple(in_ctx) != tuple(standalone)
    other = Needle("some words here.", "q?", "not in the needle at all")
    assert answer_token_ids(tok, other, in_context=True) == tuple(enc(tok, other.real_needle))




@pytest.mark.parametrize("chat,faithful", [(False, False), (True, False), (False, True), (True, True)])
def test_needle_and_question_spans(tok, haystack, chat, faithful):
    """Instance.needle_span holds the needle's tokens (the context's offset + needle_pos);
    question_span the question's, after the needle and before the last prompt token."""
    from rhead_jax.needle.span import find_question_span, question_token_ids

    for n in load_needles():
        for depth in (0, 50, 100):
            inst = build_instance(tok, haystack, n, 1500, depth, chat=chat, faithful=faithful)
            (n0, n1), (q0, q1) = inst.needle_span, inst.question_span
            assert inst.prompt_ids[n0:n1].tolist() == list(inst.needle_ids)
            offset = n0 - inst.needle_pos    # where the context starts in the prompt
            assert inst.prompt_ids[offset:n0].tolist() == inst.context_ids[:inst.needle_pos].tolist()
            assert n0 <= inst.span[0] < inst.span[1] <= n1 < q0 < q1 < inst.num_prompt_tokens - 1
            assert tok.decode(inst.prompt_ids[q0:q1].tolist()).strip() == n.question
    assert question_token_ids(tok, "no question here", "What?") is None
    assert find_question_span([5, 1, 2, 6, 1, 2], [1, 2]) == (4, 6) and find_question_span([1, 2], [3]) is None
