"""The stop rule of rhead_jax.plan: default mode lets newline tokens before the first visible answer
token pass (base models often answer on a new line), faithful mode stops at the first newline token
(the original's rule)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rhead_jax.checkpoints.gguf import convert_gguf_to_hf
from rhead_jax.plan import answer_length, ends_test, leading_stop_tokens, stop_tokens
from tests.helpers.tiny_gguf import tiny_gemma_hf_weights, write_tiny_gemma3_gguf


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory):
    """The tiny Gemma-style tokenizer (SentencePiece with newline-run tokens) through our GGUF import."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("gemma")
    out = convert_gguf_to_hf(write_tiny_gemma3_gguf(tmp / "tiny.gguf", tiny_gemma_hf_weights()), tmp / "out")
    return transformers.AutoTokenizer.from_pretrained(out)


def test_leading_tokens_by_mode(gemma_tokenizer) -> None:
    tok = gemma_tokenizer
    nl, nl2 = tok.convert_tokens_to_ids(["\n", "\n\n"])
    default, leading = stop_tokens(tok, faithful=False), leading_stop_tokens(tok, faithful=False)
    assert {nl, nl2} <= set(leading) < set(default)
    assert tok.eos_token_id in default and tok.eos_token_id not in leading
    assert all(tok.decode([i]).strip() == "" and "\n" in tok.decode([i]) for i in leading)
    assert leading_stop_tokens(tok, faithful=True) == ()
    # tokens that decode to exactly "\n": the newline piece and its byte-fallback token
    assert stop_tokens(tok, faithful=True) == tuple(sorted(tok.convert_tokens_to_ids(["<0x0A>", "\n"])))


def test_answer_length_default_mode(gemma_tokenizer) -> None:
    tok = gemma_tokenizer
    stops, leading = stop_tokens(tok, faithful=False), leading_stop_tokens(tok, faithful=False)
    nl, nl2, the, at = tok.convert_tokens_to_ids(["\n", "\n\n", "the", "at"])
    eos = tok.eos_token_id
    # Leading newlines pass; the first newline after a visible token ends the test (and counts).
    assert answer_length([nl, nl2, the, at, nl, the, the], stops, leading) == 5
    assert answer_length([the, nl, the], stops, leading) == 2
    assert answer_length([nl, eos, the], stops, leading) == 2        # EOS ends it at once
    assert answer_length([nl, nl, nl], stops, leading) == 3          # nothing visible: runs to the cap
    assert answer_length([the, at, the], stops, leading) == 3


def test_answer_length_faithful_mode(gemma_tokenizer) -> None:
    tok = gemma_tokenizer
    stops, leading = stop_tokens(tok, faithful=True), leading_stop_tokens(tok, faithful=True)
    nl, nl2, the, eos = *tok.convert_tokens_to_ids(["\n", "\n\n", "the"]), tok.eos_token_id
    assert answer_length([nl, nl2, the, nl], stops, leading) == 1    # the original: first "\n" ends it
    assert answer_length([nl2, the, nl], stops, leading) == 3        # "\n\n" is not "\n"
    assert answer_length([eos, the, nl], stops, leading) == 3        # EOS is not checked


def test_ends_test_step_by_step() -> None:
    stops, leading = {1, 7, 8}, {7, 8}
    seen = False
    trace = []
    for token in (7, 8, 5, 3, 7, 9):
        end, seen = ends_test(token, seen, stops, leading)
        trace.append((end, seen))
    assert trace == [(False, False), (False, False), (False, True), (False, True), (True, True), (False, True)]
    assert ends_test(1, False, stops, leading) == (True, True)      # a non-leading stop ends at once
    assert ends_test(7, False, stops, ()) == (True, True)            # no leading set: the plain rule


@pytest.mark.slow
def test_smollm2_leading_tokens(smollm_dir: Path) -> None:
    """SmolLM2's default-mode leading tokens: its newline and newline-run tokens, never EOS."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    leading = leading_stop_tokens(tok, faithful=False)
    assert tok.convert_tokens_to_ids("Ċ") in leading and tok.eos_token_id not in leading
    assert set(leading) < set(stop_tokens(tok, faithful=False))
