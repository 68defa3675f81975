"""Building one needle-in-a-haystack prompt (ORIGINAL.md section 2).

``faithful=True`` reproduces the original's quirks (section 2, QUIRKs):

* the insertion point walks back to one of Llama-2's period ids ``{29889, 869}`` whatever the
  tokenizer (default: every id of the model's own vocabulary that decodes to ``"."``);
* haystack and needle are encoded with the tokenizer's default special tokens and decoded
  without skipping them, so with BOS-adding tokenizers literal BOS strings end up inside the
  context text and become BOS tokens again when the prompt is tokenized (default: encoded without
  special tokens);
* like the original's ``encode_and_trim``, the first ``length`` haystack tokens are decoded to
  text and re-encoded before the needle is inserted (with BOS-adding tokenizers this round trip
  adds one more BOS at the start of the context); the default mode slices the haystack tokens;
* the answer span is searched as the original does (:mod:`rhead_jax.needle.span`).

Everything else (200-token buffer, cut of the haystack, depth arithmetic, the question text with
no separator after the context) is the same in both modes.

The tokenizer-derived data (period ids, tokenized haystack) comes from a
:class:`~rhead_jax.needle.tokens.TokenizerData` that the caller passes as ``data=`` (the grid
builders create one per grid); without one, :func:`build_instance` computes what it needs and
keeps nothing. The answer span is located by :mod:`rhead_jax.needle.span`, the chat prompt built
by :mod:`rhead_jax.needle.chat`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, FrozenSet, Optional, Tuple, Union

import numpy as np

from rhead_jax.errors import UserError

from .chat import chat_prompt
from .haystack import Needle
from .span import answer_token_ids, find_answer_span, find_needle_span, find_question_span, question_token_ids
from .tokens import TokenizedHaystack, TokenizerData, encode, readonly

# names that lived here before the split into tokens / span / chat, still importable from here
from .span import SPAN_OVERLAP, NeedleNotFoundError  # noqa: F401
from .tokens import period_token_ids, tokenized_haystack  # noqa: F401

CONTEXT_BUFFER = 200
"""Tokens left free for the question and the answer (the original's final_context_length_buffer)."""

LLAMA2_PERIOD_IDS: FrozenSet[int] = frozenset({29889, 869})
"""The period ids the original tests for every model family (faithful mode)."""

QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
"""Base models: appended to the context with no separator, exactly as the original."""

CHAT_USER_TEMPLATE = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
"""Chat models: the single user turn."""


def check_length(length: int, max_positions: Optional[int]) -> None:
    """Raise :class:`UserError` if a context ``length`` cannot be run by a model with ``max_positions``.

    The prompt of length ``length`` holds at most ``length`` tokens (200 are left for question and
    answer), so the check is ``length <= max_positions``. ``max_positions=None`` checks only that
    ``length`` is a positive integer.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise UserError(f"context length must be an integer, got {length!r}; fix config.sweep.lengths")
    if length <= 0:
        raise UserError(f"context length must be positive, got {length}; fix config.sweep.lengths")
    if max_positions is not None and length > max_positions:
        raise UserError(
            f"context length {length} exceeds the model's maximum of {max_positions} positions; "
            f"use lengths <= {max_positions} in config.sweep.lengths (or a model / RoPE scaling with a "
            "longer context)"
        )


def _check_depth(depth: float) -> Union[int, float]:
    try:
        d = float(depth)
    except (TypeError, ValueError):
        raise UserError(f"depth must be a number of percent in [0, 100], got {depth!r}; "
                        "fix config.sweep.depths") from None
    if not (0.0 <= d <= 100.0) or math.isnan(d):
        raise UserError(f"depth must be a percentage in [0, 100], got {depth!r}; fix config.sweep.depths")
    return int(d) if d.is_integer() else d


# ----------------------------------------------------------------------------- instances

def instance_key(length: int, depth: float, needle_index: int) -> str:
    """Stable string key of one test, e.g. ``"L1000_D50_N0"`` (depth printed with ``:g``)."""
    return f"L{int(length)}_D{float(depth):g}_N{int(needle_index)}"


@dataclass(frozen=True, eq=False)
class Instance:
    """One needle-in-a-haystack test prompt.

    ``context_ids`` are the tokens the context text was decoded from (haystack with the needle's
    tokens at ``needle_pos``); ``prompt_ids`` are what the model sees. ``span`` = (start, end) is
    the half-open range of ``prompt_ids`` holding the answer (``end - start == len(answer_ids)``).
    ``needle_span`` is the range of ``prompt_ids`` holding the needle's tokens (``needle_ids``, see
    :func:`~rhead_jax.needle.span.find_needle_span`: the context's offset in the prompt +
    ``needle_pos``), ``question_span`` the range holding the question's tokens in the question line
    after the context (:func:`~rhead_jax.needle.span.question_token_ids`); None where not found
    (only rhead_jax.detection's "query" score needs them, and says so).
    """

    length: int
    depth: Union[int, float]
    needle: Needle
    needle_index: int
    chat: bool
    faithful: bool
    context_ids: np.ndarray
    needle_ids: Tuple[int, ...]
    needle_pos: int
    context_text: str
    prompt_text: str
    prompt_ids: np.ndarray
    answer_ids: Tuple[int, ...]
    span: Tuple[int, int]
    needle_span: Optional[Tuple[int, int]] = None
    question_span: Optional[Tuple[int, int]] = None

    @property
    def key(self) -> str:
        return instance_key(self.length, self.depth, self.needle_index)

    @property
    def question(self) -> str:
        return self.needle.question

    @property
    def answer(self) -> str:
        return self.needle.real_needle

    @property
    def span_start(self) -> int:
        return self.span[0]

    @property
    def span_end(self) -> int:
        return self.span[1]

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    def __repr__(self) -> str:  # the arrays and texts are long
        return (f"Instance(key={self.key!r}, chat={self.chat}, faithful={self.faithful}, "
                f"prompt_tokens={self.num_prompt_tokens}, span={self.span})")


def build_instance(
    tokenizer: Any,
    haystack_text: Union[str, TokenizedHaystack],
    needle: Needle,
    length: int,
    depth: float,
    *,
    chat: bool,
    faithful: bool = False,
    needle_index: int = 0,
    max_positions: Optional[int] = None,
    data: Optional[TokenizerData] = None,
) -> Instance:
    """Build the prompt of one test (context ``length`` tokens, needle at ``depth`` percent).

    ``haystack_text`` is the haystack string or a :class:`TokenizedHaystack`. ``data`` is the
    tokenizer's :class:`TokenizerData`: pass the same one for every instance of a sweep so that
    the haystack is tokenized and the period ids are found once (without it, both are computed for
    this instance and dropped). ``chat`` selects the chat-template prompt; ``faithful`` the
    original's quirks (module docstring). ``max_positions``, if given, is checked first with
    :func:`check_length`. Raises :class:`~rhead_jax.errors.UserError` for a bad length, depth or
    a tokenizer without chat template, and :class:`NeedleNotFoundError` (one) if the answer
    cannot be located.
    """
    check_length(length, max_positions)
    length = int(length)
    depth = _check_depth(depth)
    if not isinstance(needle, Needle):
        raise TypeError(f"needle must be a Needle, got {type(needle).__name__}")
    key = instance_key(length, depth, needle_index)
    if data is None:
        data = TokenizerData(tokenizer)
    elif data.tokenizer is not tokenizer:
        raise ValueError("the TokenizerData was made for a different tokenizer")

    if isinstance(haystack_text, TokenizedHaystack):
        hay = haystack_text
        if hay.tokenizer is not tokenizer:
            raise ValueError("the TokenizedHaystack was built with a different tokenizer")
        hay.ensure(length)
    else:
        hay = data.haystack(haystack_text, length)

    # 1. first `length` haystack tokens (faithful: via the original's decode/re-encode round trip)
    ctx = hay.context_tokens(length, faithful=faithful)
    needle_ids = encode(tokenizer, needle.needle, special=faithful)

    # 2. budget: leave CONTEXT_BUFFER tokens; cut the haystack if haystack + needle exceed it
    budget = length - CONTEXT_BUFFER
    if len(ctx) + len(needle_ids) > budget:
        keep = budget - len(needle_ids)
        if keep < 1:
            raise UserError(
                f"context length {length} is too short for the needle of instance {key}: it must "
                f"exceed {CONTEXT_BUFFER} (buffer) + {len(needle_ids)} (needle tokens); use lengths > "
                f"{CONTEXT_BUFFER + len(needle_ids)} in config.sweep.lengths or a shorter needle"
            )
        ctx = ctx[:keep]

    # 3. insertion
    if depth == 100:
        pos = len(ctx)
    else:
        pos = int(len(ctx) * (depth / 100))
        periods = LLAMA2_PERIOD_IDS if faithful else data.period_ids
        while pos > 0 and ctx[pos - 1] not in periods:
            pos -= 1
    new_ctx = ctx[:pos] + needle_ids + ctx[pos:]

    # 4. back to text (special tokens, present only in faithful mode, are kept as literal strings)
    context_text = tokenizer.decode(new_ctx, skip_special_tokens=False)

    # 5. the prompt
    if chat:
        prompt_text, prompt_ids = chat_prompt(
            tokenizer, CHAT_USER_TEMPLATE.format(context=context_text, question=needle.question))
    else:
        prompt_text = context_text + QUESTION_TEMPLATE.format(question=needle.question)
        prompt_ids = encode(tokenizer, prompt_text, special=True)

    # section 3: the answer span (faithful: exactly the original; default: see module docstring)
    answer_ids = answer_token_ids(tokenizer, needle, in_context=not faithful)
    desc = (f"instance {key} (length={length}, depth={depth}, "
            f"chat={chat}, faithful={faithful}, needle={needle.needle!r}, answer={needle.real_needle!r})")
    span = find_answer_span(prompt_ids, answer_ids, prefer_exact=not faithful, description=desc)
    question_ids = question_token_ids(tokenizer, QUESTION_TEMPLATE.format(question=needle.question), needle.question)


    return Instance(
        length=length,
        depth=depth,
        needle=needle,
        needle_index=int(needle_index),
        chat=bool(chat),
        faithful=bool(faithful),
        context_ids=readonly(new_ctx),
        needle_ids=tuple(needle_ids),
        needle_pos=pos,
        context_text=context_text,
        prompt_text=prompt_text,
        prompt_ids=readonly(prompt_ids),
        answer_ids=answer_ids,
        span=span,
        needle_span=find_needle_span(prompt_ids, needle_ids),
        question_span=find_question_span(prompt_ids, question_ids),
    )
