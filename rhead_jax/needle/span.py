"""Locating the answer span in a prompt's token ids (ORIGINAL.md section 3).

Faithful mode does exactly what the original does: the answer is encoded on its own and the first
window of n prompt tokens whose id SET covers > 90% of the answer's distinct ids wins. That search
has two flaws which the default mode avoids:

* when every answer id occurs in the prompt, a window starting one token (or, for answers with
  21+ distinct ids, two or more tokens) BEFORE the answer already passes the 90% test, so the
  span comes out shifted to the left and misses the answer's last token(s);
* byte-level BPE tokenizers (Qwen, Llama-3, SmolLM2, ...) encode a standalone answer's first
  word without its leading space, so its first id(s) differ from the ones in the context; that
  sometimes hides the shift above, sometimes causes it (when the word splits into more tokens),
  and makes answers with <= 10 distinct ids unfindable.

The default mode therefore takes the answer's ids as they occur inside the needle (needle tokens
overlapping the answer's characters, :func:`answer_token_ids`) and looks for their first exact
occurrence in the prompt, falling back to the 90% search only if there is none. A missing span
raises :class:`NeedleNotFoundError` in both modes (the original silently used (-1, -1)).
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from rhead_jax.errors import UserError

from .haystack import Needle
from .tokens import encode

SPAN_OVERLAP = 0.9
"""A window matches when its set of ids covers MORE than this fraction of the answer's distinct ids."""


class NeedleNotFoundError(UserError):
    """The answer span could not be located in the prompt ids (the original used (-1, -1))."""


def _overlap_windows(p: np.ndarray, answer: List[int]) -> Optional[int]:
    """Section 3: first i whose window p[i:i+n] (truncated at the end, like the original's slice)
    has a SET of ids covering more than 90% of the answer's distinct ids."""
    n = len(answer)
    distinct = set(answer)
    d = len(distinct)
    # fewest distinct ids a window must contain: smallest k with k / d > 0.9 (same float test)
    k_min = next(k for k in range(d + 1) if float(k) / d > SPAN_OVERLAP)
    if not p.size:
        return None
    mask = np.isin(p, np.fromiter(distinct, dtype=np.int64, count=d))
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    starts = np.arange(p.size)
    counts = csum[np.minimum(starts + n, p.size)] - csum[starts]
    for i in np.nonzero(counts >= k_min)[0]:  # a necessary condition; check exactly, in order
        i = int(i)
        if float(len(set(p[i:i + n].tolist()) & distinct)) / d > SPAN_OVERLAP:
            return i
    return None


def _exact_window(p: np.ndarray, answer: List[int]) -> Optional[int]:
    """First i with p[i:i+n] == answer, or None."""
    n = len(answer)
    if n > p.size:
        return None
    a = np.asarray(answer, dtype=p.dtype if p.size else np.int64)
    for i in np.nonzero(p[: p.size - n + 1] == a[0])[0]:
        i = int(i)
        if np.array_equal(p[i:i + n], a):
            return i
    return None


def find_answer_span(
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    prefer_exact: bool = False,
    description: Optional[str] = None,
) -> Tuple[int, int]:
    """Locate the answer's tokens in the prompt; returns the half-open span ``(start, start + n)``.

    ``prefer_exact=False`` is the original's search (ORIGINAL.md section 3): with
    n = len(answer_ids), windows ``prompt_ids[i:i+n]`` are scanned for i = 0, 1, ...; the first
    whose SET of ids covers more than 90% of the answer's distinct ids wins. Note that when the
    answer's ids all occur in the prompt and it has 11 or more distinct ids, the window starting
    ONE TOKEN BEFORE the answer already passes (it misses only the last answer token), so this
    search returns a span shifted one token to the left.

    ``prefer_exact=True`` (rhead_jax's default mode) first looks for the first exact contiguous
    occurrence of ``answer_ids`` and falls back to the 90% search only if there is none.

    Raises :class:`NeedleNotFoundError` (a :class:`~rhead_jax.errors.UserError`) if nothing
    matches (``description`` names the instance in the message) or the answer has no tokens.
    """
    answer = [int(a) for a in answer_ids]
    where = f" for {description}" if description else ""
    if not answer:
        raise NeedleNotFoundError(f"answer span tokenizes to no tokens{where}; give the needle a "
                                  "non-empty real_needle (the answer, a sub-phrase of the needle)")
    p = np.asarray(prompt_ids).reshape(-1)
    n = len(answer)
    i = _exact_window(p, answer) if prefer_exact else None
    if i is None:
        i = _overlap_windows(p, answer)
    if i is not None:
        return i, i + n
    raise NeedleNotFoundError(
        f"answer span not found in the prompt{where}: no window of {n} prompt tokens covers more "
        f"than {SPAN_OVERLAP:.0%} of the answer's {len(set(answer))} distinct token ids. Possible "
        "causes: the answer (real_needle) is not a sub-phrase of the needle (check spelling and "
        "punctuation); the tokenizer encodes the answer on its own differently than inside the "
        "needle (faithful mode: byte-level BPE encodes the first word without its leading space, so "
        "an answer of 10 or fewer distinct tokens can never pass the 90% test); the needle was cut "
        "off or altered by the chat template; or the context length is too short for the needle. "
        "Fix the needles file (real_needle must be copied from needle), use a longer answer or "
        "context length, or turn faithful mode off (config.sweep.faithful=False)."
    )


def answer_token_ids(tokenizer: Any, needle: Needle, *, in_context: bool) -> Tuple[int, ...]:
    """Token ids of the answer span.

    ``in_context=False`` (faithful, ORIGINAL.md section 3): the answer encoded on its own without
    special tokens. ``in_context=True`` (default mode): the answer's tokens as they occur inside
    the needle, i.e. the needle's own tokens (no special tokens) whose characters overlap the
    answer's first case-insensitive occurrence in the needle. This keeps a leading space
    (byte-level BPE: " rent" rather than "rent", which may even split differently) and the
    needle's capitalisation. Falls back to the standalone encoding when the answer is not a
    sub-string of the needle or the tokenizer gives no offsets (slow tokenizers).
    """
    answer = needle.real_needle
    if in_context:
        m = re.search(re.escape(answer.strip()), needle.needle, flags=re.IGNORECASE)
        if m is not None:
            try:
                enc = tokenizer(needle.needle, add_special_tokens=False, return_offsets_mapping=True,
                                verbose=False)
                offsets = enc["offset_mapping"]
                ids = enc["input_ids"]
            except (NotImplementedError, KeyError, TypeError, ValueError):
                offsets = None
            if offsets is not None and len(offsets) == len(ids):
                a, b = m.span()
                hit = [k for k, (s, e) in enumerate(offsets) if e > s and e > a and s < b]
                if hit:
                    return tuple(int(t) for t in ids[hit[0]: hit[-1] + 1])
    return tuple(encode(tokenizer, answer, special=False))


# ----------------------------------------------------------------------------- needle and question spans
# (rhead_jax.detection's "query" score: the question's attention on the needle during the prefill)


def find_needle_span(prompt_ids: Sequence[int], needle_ids: Sequence[int]) -> Optional[Tuple[int, int]]:
    """Where the needle's tokens stand in the prompt: the half-open span of the first exact
    occurrence of ``needle_ids`` (the tokens inserted into the context, Instance.needle_ids) in
    ``prompt_ids``, else the 90% window of :func:`find_answer_span`; None if neither matches.

    The context's tokens re-tokenize to themselves inside the prompt, so this is the prompt's
    offset of the context plus Instance.needle_pos (checked on SmolLM2's grid: chat, base and
    faithful prompts); the search also holds for a tokenizer that merges across a boundary."""
    try:
        return find_answer_span(prompt_ids, needle_ids, prefer_exact=True)
    except NeedleNotFoundError:
        return None


def question_token_ids(tokenizer: Any, text: str, question: str) -> Optional[Tuple[int, ...]]:
    """The question's tokens as they stand in ``text`` (the prompt's question line, e.g.
    "Based on the content of the book, Question: {question}\\nAnswer:"): the tokens of ``text``
    (no special tokens) whose characters overlap the LAST occurrence of ``question`` in it, as
    :func:`answer_token_ids` takes the answer's tokens from the needle. None without offsets (slow
    tokenizers) or when the question is not in ``text``."""
    a = text.rfind(question.strip())
    if a < 0 or not question.strip():
        return None
    b = a + len(question.strip())
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets, ids = enc["offset_mapping"], enc["input_ids"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return None
    hit = [k for k, (s, e) in enumerate(offsets) if e > s and e > a and s < b]
    return tuple(int(t) for t in ids[hit[0]: hit[-1] + 1]) if hit else None


def find_question_span(prompt_ids: Sequence[int], question_ids: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """The half-open span of the LAST exact occurrence of ``question_ids`` in ``prompt_ids`` (the
    question follows the context), or None."""
    if not question_ids:
        return None
    p = np.asarray(prompt_ids).reshape(-1)[::-1]
    i = _exact_window(p, [int(t) for t in question_ids][::-1])
    if i is None:
        return None
    n = len(question_ids)
    return p.size - i - n, p.size - i
