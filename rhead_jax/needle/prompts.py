"""Building needle-in-a-haystack prompts and locating the answer span (ORIGINAL.md sections 2-3).

``faithful=True`` reproduces the original's quirks (section 2, QUIRKs):

* the insertion point walks back to one of Llama-2's period ids ``{29889, 869}`` whatever the
  tokenizer (default: every id of the model's own vocabulary that decodes to ``"."``);
* haystack and needle are encoded with the tokenizer's default special tokens and decoded
  without skipping them, so with BOS-adding tokenizers literal BOS strings end up inside the
  context text and become BOS tokens again when the prompt is tokenized (default: encoded without
  special tokens);
* like the original's ``encode_and_trim``, the first ``length`` haystack tokens are decoded to
  text and re-encoded before the needle is inserted (with BOS-adding tokenizers this round trip
  adds one more BOS at the start of the context); the default mode slices the cached tokens.

Answer span (section 3). Faithful mode does exactly what the original does: the answer is
encoded on its own and the first window of n prompt tokens whose id SET covers > 90% of the
answer's distinct ids wins. That search has two flaws which the default mode avoids:

* when every answer id occurs in the prompt, a window starting one token (or, for answers with
  21+ distinct ids, two or more tokens) BEFORE the answer already passes the 90% test, so the
  span comes out shifted to the left and misses the answer's last token(s);
* byte-level BPE tokenizers (Qwen, Llama-3, SmolLM2, ...) encode a standalone answer's first
  word without its leading space, so its first id(s) differ from the ones in the context; that
  sometimes hides the shift above, sometimes causes it (when the word splits into more tokens),
  and makes answers with <= 10 distinct ids unfindable.

The default mode therefore takes the answer's ids as they occur inside the needle (needle
tokens overlapping the answer's characters, :func:`answer_token_ids`) and looks for their first
exact occurrence in the prompt, falling back to the 90% search only if there is none.

Everything else (200-token buffer, cut of the haystack, depth arithmetic, the question text with
no separator after the context) is the same in both modes. A missing answer span raises
:class:`NeedleNotFoundError` in both modes (the original silently used (-1, -1)).
"""
from __future__ import annotations

import hashlib
import math
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import numpy as np

from .haystack import Needle

CONTEXT_BUFFER = 200
"""Tokens left free for the question and the answer (the original's final_context_length_buffer)."""

LLAMA2_PERIOD_IDS: FrozenSet[int] = frozenset({29889, 869})
"""The period ids the original tests for every model family (faithful mode)."""

QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
"""Base models: appended to the context with no separator, exactly as the original."""

CHAT_USER_TEMPLATE = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
"""Chat models: the single user turn."""

SPAN_OVERLAP = 0.9
"""A window matches when its set of ids covers MORE than this fraction of the answer's distinct ids."""

_HAYSTACK_MARGIN = 64  # extra tokens beyond the longest length, so that no end-of-text effect reaches it


class NeedleNotFoundError(ValueError):
    """The answer span could not be located in the prompt ids (the original used (-1, -1))."""


def check_length(length: int, max_positions: Optional[int]) -> None:
    """Raise ValueError if a context ``length`` cannot be run by a model with ``max_positions``.

    The prompt of length ``length`` holds at most ``length`` tokens (200 are left for question and
    answer), so the check is ``length <= max_positions``. ``max_positions=None`` checks only that
    ``length`` is a positive integer.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"context length must be an integer, got {length!r}")
    if length <= 0:
        raise ValueError(f"context length must be positive, got {length}")
    if max_positions is not None and length > max_positions:
        raise ValueError(
            f"context length {length} exceeds the model's maximum of {max_positions} positions; "
            f"use lengths <= {max_positions} (or a model / RoPE scaling with a longer context)"
        )


def _check_depth(depth: float) -> Union[int, float]:
    try:
        d = float(depth)
    except (TypeError, ValueError):
        raise ValueError(f"depth must be a number of percent in [0, 100], got {depth!r}") from None
    if not (0.0 <= d <= 100.0) or math.isnan(d):
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth!r}")
    return int(d) if d.is_integer() else d


# ----------------------------------------------------------------------------- per-tokenizer caches

class _PerTokenizerCache:
    """Maps a tokenizer object (by identity, weakly) to a dict of cached values."""

    def __init__(self) -> None:
        self._entries: Dict[int, Tuple[Any, Dict[Any, Any]]] = {}

    def get(self, tokenizer: Any) -> Dict[Any, Any]:
        key = id(tokenizer)
        entry = self._entries.get(key)
        if entry is not None:
            ref, store = entry
            if ref() is tokenizer:
                return store
        store: Dict[Any, Any] = {}
        try:
            ref = weakref.ref(tokenizer, lambda _r, k=key: self._entries.pop(k, None))
        except TypeError:  # not weak-referenceable: keep a strong reference
            ref = (lambda t=tokenizer: t)
        self._entries[key] = (ref, store)
        return store


_PERIOD_CACHE = _PerTokenizerCache()
_HAYSTACK_CACHE = _PerTokenizerCache()


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def period_token_ids(tokenizer: Any) -> FrozenSet[int]:
    """Every vocabulary id whose decoded string, stripped of whitespace, is ``"."``.

    Cached per tokenizer. Candidates are the ids whose token string contains a period (or is a
    byte-fallback token for 0x2E); each candidate is then checked by decoding it. If that finds
    nothing, every id is decoded.
    """
    store = _PERIOD_CACHE.get(tokenizer)
    if "ids" in store:
        return store["ids"]
    try:
        vocab = dict(tokenizer.get_vocab())
    except Exception:  # pragma: no cover - exotic tokenizers
        vocab = {}
    cands = [i for t, i in vocab.items() if "." in t or "<0X2E>" in t.upper()]

    def check(ids: Sequence[int]) -> FrozenSet[int]:
        if not ids:
            return frozenset()
        texts = tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        return frozenset(int(i) for i, s in zip(ids, texts) if s.strip() == ".")

    ids = check(sorted(set(cands)))
    if not ids:
        ids = check(list(range(_vocab_size(tokenizer))))
    store["ids"] = ids
    return ids


# ----------------------------------------------------------------------------- tokenized haystack

def _encode(tokenizer: Any, text: str, *, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


class TokenizedHaystack:
    """A haystack text tokenized once and reused for every instance of a sweep.

    Like the original, the text is repeated (whole copies) until it is long enough; unlike it, the
    criterion is the token count (at least ``min_tokens`` plus a small margin) rather than the word
    count, which makes no difference for the first ``length`` tokens but never comes up short.
    ``tokens`` are encoded without special tokens (default mode); ``tokens_with_special`` with the
    tokenizer's defaults (faithful mode, computed on first use).
    """

    def __init__(self, tokenizer: Any, text: str, min_tokens: int = 0, *, _weak: bool = False) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("haystack text is empty")
        # the module cache holds its haystacks with a weak tokenizer reference, so that caching
        # never keeps a tokenizer alive; a haystack built by the user holds it normally
        self._tokenizer = tokenizer
        if _weak:
            try:
                self._tokenizer = weakref.ref(tokenizer)
            except TypeError:
                pass
        self.text = text
        self._copies = 0
        self._tokens: Optional[np.ndarray] = None
        self._tokens_special: Optional[np.ndarray] = None
        self._faithful_ctx: Dict[int, List[int]] = {}
        self.ensure(min_tokens)

    @property
    def tokenizer(self) -> Any:
        tok = self._tokenizer
        if isinstance(tok, weakref.ref):
            tok = tok()
            if tok is None:
                raise RuntimeError("the tokenizer of this cached haystack no longer exists")
        return tok

    @property
    def repeated_text(self) -> str:
        return self.text * self._copies

    @property
    def tokens(self) -> np.ndarray:
        """Token ids (int32, read-only) of the repeated text, no special tokens."""
        assert self._tokens is not None
        return self._tokens

    @property
    def tokens_with_special(self) -> np.ndarray:
        """Token ids of the repeated text encoded with the tokenizer's default special tokens."""
        if self._tokens_special is None:
            self._tokens_special = _readonly(_encode(self.tokenizer, self.repeated_text, special=True))
        return self._tokens_special

    def ensure(self, min_tokens: int) -> None:
        """Make sure at least ``min_tokens`` (+ margin) tokens are available, re-tokenizing if not."""
        need = int(min_tokens) + _HAYSTACK_MARGIN
        if self._tokens is not None and len(self._tokens) >= need:
            return
        words = max(1, len(self.text.split()))
        copies = max(1, self._copies, math.ceil(need / words))
        while True:
            toks = _encode(self.tokenizer, self.text * copies, special=False)
            if len(toks) >= need:
                break
            per_copy = max(1, len(toks) // copies)
            copies = max(copies + 1, math.ceil(need / per_copy))
        self._copies = copies
        self._tokens = _readonly(toks)
        self._tokens_special = None
        self._faithful_ctx.clear()

    def context_tokens(self, length: int, *, faithful: bool) -> List[int]:
        """The haystack tokens for a context of ``length`` tokens, before the needle goes in."""
        self.ensure(length)
        if not faithful:
            return self.tokens[:length].tolist()
        cached = self._faithful_ctx.get(length)
        if cached is None:
            # The original's encode_and_trim + insert_needle: encode (default specials), keep the
            # first `length` tokens, decode them to text, and encode that text again.
            full = self.tokens_with_special
            if len(full) > length:
                text = self.tokenizer.decode(full[:length].tolist(), skip_special_tokens=False)
            else:  # pragma: no cover - ensure() always leaves more tokens than `length`
                text = self.repeated_text
            cached = _encode(self.tokenizer, text, special=True)
            self._faithful_ctx[length] = cached
        return list(cached)


def tokenized_haystack(tokenizer: Any, text: str, min_tokens: int = 0) -> TokenizedHaystack:
    """Return the cached :class:`TokenizedHaystack` of (tokenizer, text), grown to ``min_tokens``."""
    store = _HAYSTACK_CACHE.get(tokenizer)
    key = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
    hay = store.get(key)
    if hay is None:
        hay = TokenizedHaystack(tokenizer, text, min_tokens, _weak=True)
        store[key] = hay
    else:
        hay.ensure(min_tokens)
    return hay


def _readonly(ids: Sequence[int]) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int32).reshape(-1)
    a.flags.writeable = False
    return a


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


def _ids_from_chat_output(out: Any) -> List[int]:
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        if len(out) != 1:
            raise ValueError(f"apply_chat_template returned a batch of {len(out)} sequences, expected one")
        out = list(out[0])
    return [int(i) for i in out]


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

    Raises :class:`NeedleNotFoundError` if nothing matches (``description`` names the instance in
    the message) and ValueError for an empty answer.
    """
    answer = [int(a) for a in answer_ids]
    if not answer:
        raise ValueError("answer span tokenizes to no tokens")
    p = np.asarray(prompt_ids).reshape(-1)
    n = len(answer)
    i = _exact_window(p, answer) if prefer_exact else None
    if i is None:
        i = _overlap_windows(p, answer)
    if i is not None:
        return i, i + n
    where = f" for {description}" if description else ""
    raise NeedleNotFoundError(
        f"answer span not found in the prompt{where}: no window of {n} prompt tokens covers more "
        f"than {SPAN_OVERLAP:.0%} of the answer's {len(set(answer))} distinct token ids. Possible "
        "causes: the answer (real_needle) is not a sub-phrase of the needle (check spelling and "
        "punctuation); the tokenizer encodes the answer on its own differently than inside the "
        "needle (faithful mode: byte-level BPE encodes the first word without its leading space, so "
        "an answer of 10 or fewer distinct tokens can never pass the 90% test); the needle was cut "
        "off or altered by the chat template; or the context length is too short for the needle."
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
    return tuple(_encode(tokenizer, answer, special=False))


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
) -> Instance:
    """Build the prompt of one test (context ``length`` tokens, needle at ``depth`` percent).

    ``haystack_text`` is the haystack string (tokenized once per tokenizer and text, then cached)
    or a :class:`TokenizedHaystack`. ``chat`` selects the chat-template prompt; ``faithful`` the
    original's quirks (module docstring). ``max_positions``, if given, is checked first with
    :func:`check_length`. Raises :class:`NeedleNotFoundError` if the answer cannot be located.
    """
    check_length(length, max_positions)
    length = int(length)
    depth = _check_depth(depth)
    if not isinstance(needle, Needle):
        raise TypeError(f"needle must be a Needle, got {type(needle).__name__}")

    if isinstance(haystack_text, TokenizedHaystack):
        hay = haystack_text
        if hay.tokenizer is not tokenizer:
            raise ValueError("the TokenizedHaystack was built with a different tokenizer")
        hay.ensure(length)
    else:
        hay = tokenized_haystack(tokenizer, haystack_text, length)

    # 1. first `length` haystack tokens (faithful: via the original's decode/re-encode round trip)
    ctx = hay.context_tokens(length, faithful=faithful)
    needle_ids = _encode(tokenizer, needle.needle, special=faithful)

    # 2. budget: leave CONTEXT_BUFFER tokens; cut the haystack if haystack + needle exceed it
    budget = length - CONTEXT_BUFFER
    if len(ctx) + len(needle_ids) > budget:
        keep = budget - len(needle_ids)
        if keep < 1:
            raise ValueError(
                f"context length {length} is too short for this needle: it must exceed "
                f"{CONTEXT_BUFFER} (buffer) + {len(needle_ids)} (needle tokens)"
            )
        ctx = ctx[:keep]

    # 3. insertion
    if depth == 100:
        pos = len(ctx)
    else:
        pos = int(len(ctx) * (depth / 100))
        periods = LLAMA2_PERIOD_IDS if faithful else period_token_ids(tokenizer)
        while pos > 0 and ctx[pos - 1] not in periods:
            pos -= 1
    new_ctx = ctx[:pos] + needle_ids + ctx[pos:]

    # 4. back to text (special tokens, present only in faithful mode, are kept as literal strings)
    context_text = tokenizer.decode(new_ctx, skip_special_tokens=False)

    # 5. the prompt
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat_template; use chat=False for base models")
        messages = [{"role": "user",
                     "content": CHAT_USER_TEMPLATE.format(context=context_text, question=needle.question)}]
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = _ids_from_chat_output(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    else:
        prompt_text = context_text + QUESTION_TEMPLATE.format(question=needle.question)
        prompt_ids = _encode(tokenizer, prompt_text, special=True)

    # section 3: the answer span (faithful: exactly the original; default: see module docstring)
    answer_ids = answer_token_ids(tokenizer, needle, in_context=not faithful)
    desc = (f"instance {instance_key(length, depth, needle_index)} (length={length}, depth={depth}, "
            f"chat={chat}, faithful={faithful}, needle={needle.needle!r}, answer={needle.real_needle!r})")
    span = find_answer_span(prompt_ids, answer_ids, prefer_exact=not faithful, description=desc)

    return Instance(
        length=length,
        depth=depth,
        needle=needle,
        needle_index=int(needle_index),
        chat=bool(chat),
        faithful=bool(faithful),
        context_ids=_readonly(new_ctx),
        needle_ids=tuple(needle_ids),
        needle_pos=pos,
        context_text=context_text,
        prompt_text=prompt_text,
        prompt_ids=_readonly(prompt_ids),
        answer_ids=answer_ids,
        span=span,
    )
