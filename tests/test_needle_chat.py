"""Tests of rhead_jax.needle.chat: one user turn through the chat template, in needle prompts."""
from __future__ import annotations

import numpy as np
import pytest

from rhead_jax.errors import UserError
from rhead_jax.needle import build_instance, chat_prompt
from rhead_jax.needle.chat import ids_from_chat_output
from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401 - fixtures
from tests.helpers.needle_tokenizer import make_tokenizer


def test_chat_prompt(tok, haystack, needles):
    n = needles[-1]
    inst = build_instance(tok, haystack, n, 2000, 56, chat=True)
    user = f"<book>{inst.context_text}</book>\nBased on the content of the book, Question: {n.question}\nAnswer:"
    assert inst.prompt_text == f"<s><|user|>\n{user}</s>\n<|assistant|>\n"
    expected = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert inst.prompt_ids.tolist() == list(expected)
    assert inst.prompt_ids.tolist().count(tok.bos_token_id) == 1


def test_chat_requires_template(haystack, needles):
    plain = make_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no chat_template.*chat=False"):
        build_instance(plain, haystack, needles[0], 1000, 50, chat=True)
    with pytest.raises(UserError, match="no chat_template"):
        chat_prompt(plain, "hello")
    assert build_instance(plain, haystack, needles[0], 1000, 50, chat=False).prompt_ids[0] == plain.bos_token_id


def test_chat_prompt_text_and_ids(tok):
    text, ids = chat_prompt(tok, "What is in the <book>?")
    assert text == "<s><|user|>\nWhat is in the <book>?</s>\n<|assistant|>\n"
    # the template writes BOS itself; the ids are the text's tokens without added special tokens
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and all(type(i) is int for i in ids)


def test_ids_from_chat_output():
    assert ids_from_chat_output({"input_ids": [1, 2, 3]}) == [1, 2, 3]
    assert ids_from_chat_output([[1, 2, 3]]) == [1, 2, 3]
    assert ids_from_chat_output(np.array([[1, 2, 3]])) == [1, 2, 3]
    assert ids_from_chat_output([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="batch of 2"):
        ids_from_chat_output([[1], [2]])


