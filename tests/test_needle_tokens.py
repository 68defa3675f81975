"""Tests of rhead_jax.needle.tokens: period ids, the tokenized haystack, TokenizerData (no module state)."""
from __future__ import annotations

import gc
import weakref

import pytest

from rhead_jax.errors import UserError
from rhead_jax.needle import (
    TokenizedHaystack,
    TokenizerData,
    build_grid,
    build_instance,
    period_token_ids,
    tokenized_haystack,
)
from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401 - fixtures
from tests.helpers.needle_tokenizer import make_tokenizer


def test_period_token_ids(tok):
    ids = period_token_ids(tok)
    assert tok.convert_tokens_to_ids(".") in ids
    expected = {i for i in range(len(tok)) if tok.decode([i]).strip() == "."}
    assert ids == expected
    # computed once per TokenizerData (the caller's), not cached by the module
    data = TokenizerData(tok)
    assert data.period_ids == ids and data.period_ids is data.period_ids
    assert TokenizerData(tok).period_ids is not data.period_ids


def test_haystack_tokenized_once(tok, haystack, needles):
    data = TokenizerData(tok)
    hay = data.haystack(haystack, 3000)
    assert data.haystack(haystack, 1000) is hay
    tokens = hay.tokens
    assert len(tokens) >= 3000 and not tokens.flags.writeable
    build_grid(tok, hay, needles[:1], [1000, 2000], [0, 50], chat=False)
    build_instance(tok, haystack, needles[0], 2500, 50, chat=False, data=data)  # via the caller's data
    assert hay.tokens is tokens  # not re-tokenized
    assert data.haystack(haystack + " ", 10) is not hay  # another text, another haystack
    # without a TokenizerData nothing is kept: tokenized_haystack makes a new one each time
    assert tokenized_haystack(tok, haystack, 1000) is not tokenized_haystack(tok, haystack, 1000)
    own = TokenizedHaystack(tok, haystack, 1000)
    other = make_tokenizer()
    with pytest.raises(ValueError, match="different tokenizer"):
        build_instance(other, own, needles[0], 1000, 50, chat=False)
    with pytest.raises(ValueError, match="different tokenizer"):
        build_instance(other, haystack, needles[0], 1000, 50, chat=False, data=data)
    with pytest.raises(UserError, match="empty"):
        TokenizedHaystack(tok, "   ")


def test_repeated_haystack_prefix_is_stable(tok, haystack):
    # growing the haystack (more copies) leaves the tokens of a shorter length unchanged
    small = TokenizedHaystack(tok, haystack, 1000)
    big = TokenizedHaystack(tok, haystack, 60000)
    assert len(big.tokens) >= 60000
    assert small.tokens[:1000].tolist() == big.tokens[:1000].tolist()
    assert small.context_tokens(1000, faithful=True) == big.context_tokens(1000, faithful=True)


def test_no_module_state_keeps_the_tokenizer(haystack, needles):
    # the per-tokenizer data lives only in objects the caller holds: once the caller drops the
    # tokenizer (and its TokenizerData), nothing in rhead_jax.needle keeps it alive
    own = make_tokenizer()
    ref = weakref.ref(own)
    grid = build_grid(own, haystack, needles[:1], [1000], [50], chat=True)
    build_instance(own, haystack, needles[0], 1000, 0, chat=False)
    data = TokenizerData(own)
    build_instance(own, haystack, needles[0], 1000, 50, chat=False, data=data)
    assert data.tokenizer is own and "haystacks=1" in repr(data)
    del own, data
    gc.collect()
    assert ref() is None
    assert grid[0].key == "L1000_D50_N0"  # instances do not need the tokenizer


def test_prefix_tokenization_is_the_whole_texts(tok, haystack, needles):
    # only what the longest length needs is tokenized, and its tokens are the whole text's
    whole = TokenizedHaystack(tok, haystack, 0, whole=True)
    part = TokenizedHaystack(tok, haystack, 1000)
    assert whole.repeated_text == haystack and len(part.repeated_text) < len(haystack) // 4
    n = len(part.tokens)
    assert 1000 < n < len(whole.tokens) and part.tokens.tolist() == whole.tokens[:n].tolist()
    assert part.context_tokens(1000, faithful=True) == whole.context_tokens(1000, faithful=True)
    part.ensure(3000)   # grown incrementally, still the whole text's tokens
    assert len(part.tokens) > 3000 and part.tokens.tolist() == whole.tokens[:len(part.tokens)].tolist()
    # past one copy of the text: a prefix of the repetition, whose tokens are the copies'
    more = len(whole.tokens) + 100
    part.ensure(more)
    copies = TokenizedHaystack(tok, haystack, more, whole=True)
    assert copies.repeated_text == haystack * 2 and len(part.repeated_text) < len(copies.repeated_text)
    assert part.tokens.tolist() == copies.tokens[:len(part.tokens)].tolist()
    # the grid's prompts, default and faithful, are those of the whole text
    for faithful in (False, True):
        kw = dict(chat=False, faithful=faithful)
        a = build_grid(tok, haystack, needles[:2], [600, 1500], [0, 50, 100], **kw)
        b = build_grid(tok, TokenizedHaystack(tok, haystack, 0, whole=True), needles[:2], [600, 1500], [0, 50, 100],
                       **kw)
        assert [x.prompt_ids.tolist() for x in a] == [x.prompt_ids.tolist() for x in b]
        assert [x.span for x in a] == [x.span for x in b]


class _EndEffectTokenizer:
    """Characters as ids, but the text's last character gets another id: a prefix's tokens are
    then not the longer text's, which the cut check must catch."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        ids = [ord(c) for c in text]
        if ids:
            ids[-1] += 1000
        return {"input_ids": ids}


def test_prefix_tokenization_falls_back_to_whole_copies(haystack):
    t = _EndEffectTokenizer()
    hay = TokenizedHaystack(t, haystack, 1000)
    assert hay.repeated_text == haystack and len(hay.tokens) == len(haystack)


@pytest.mark.parametrize("clean_up", [False, True])
def test_decode_each_and_stop_tokens_match_batch_decode(tok, clean_up):
    from rhead_jax.needle.tokens import decode_each
    from rhead_jax.plan import stop_tokens

    old, tok.clean_up_tokenization_spaces = tok.clean_up_tokenization_spaces, clean_up
    try:
        ids = list(range(len(tok)))
        slow = tok.batch_decode([[i] for i in ids])     # what stop_tokens decoded with before
        assert decode_each(tok, ids) == tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        assert stop_tokens(tok, faithful=True) == tuple(i for i, t in zip(ids, slow) if t == "\n")
        expected = {i for i, t in zip(ids, slow) if "\n" in t} | {tok.eos_token_id}
        assert stop_tokens(tok, faithful=False) == tuple(sorted(expected)) and len(expected) >= 2
    finally:
        tok.clean_up_tokenization_spaces = old
