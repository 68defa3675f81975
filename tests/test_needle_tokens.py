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
