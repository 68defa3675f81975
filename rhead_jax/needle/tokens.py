"""What a tokenizer contributes to needle prompts: its period ids and the tokenized haystack.

There is no module-level cache. The per-tokenizer data lives in a :class:`TokenizerData` that the
caller creates and drops: :func:`rhead_jax.needle.grid.iter_grid` / ``build_grid`` make one per
grid, so the haystack is tokenized and the period ids are searched once per grid;
:func:`rhead_jax.needle.prompts.build_instance` makes a throw-away one unless it is given
``data=``. Nothing here keeps a tokenizer alive beyond the objects that the caller holds.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

import numpy as np
from absl import logging

from rhead_jax.errors import UserError

HAYSTACK_MARGIN = 64
"""Extra tokens beyond the longest length, so that no end-of-text effect reaches the context."""

_CUT = re.compile(r"(?<=\S) (?=\S)")
"""Where a haystack prefix may end: before a single space between two non-space characters. A
byte-level or metaspace pre-tokenizer starts a new piece there, so the prefix's tokens are the
first tokens of the whole text (TokenizedHaystack checks it with a second, longer cut)."""

_CUT_WINDOW = 4096
"""Characters searched backwards for a cut."""


def encode(tokenizer: Any, text: str, *, special: bool) -> List[int]:
    """``tokenizer(text)``'s input ids, with (``special=True``) or without its default special tokens."""
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def decode_each(tokenizer: Any, ids: Sequence[int]) -> List[str]:
    """Each id decoded on its own, special tokens kept, no clean-up of spaces: the Rust tokenizer's
    batch decode where there is one (~12x faster than ``batch_decode``'s Python loop over a 49K
    vocabulary), else ``batch_decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return backend.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)
    return tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def readonly(ids: Sequence[int]) -> np.ndarray:
    """``ids`` as a flat, read-only int32 array."""
    a = np.asarray(ids, dtype=np.int32).reshape(-1)
    a.flags.writeable = False
    return a


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def period_token_ids(tokenizer: Any) -> FrozenSet[int]:
    """Every vocabulary id whose decoded string, stripped of whitespace, is ``"."``.

    Computed on every call (:attr:`TokenizerData.period_ids` keeps the result). Candidates are the
    ids whose token string contains a period (or is a byte-fallback token for 0x2E); each candidate
    is then checked by decoding it. If that finds nothing, every id is decoded.
    """
    try:
        vocab = dict(tokenizer.get_vocab())
    except Exception:  # pragma: no cover - exotic tokenizers
        vocab = {}
    cands = [i for t, i in vocab.items() if "." in t or "<0X2E>" in t.upper()]

    def check(ids: Sequence[int]) -> FrozenSet[int]:
        if not ids:
            return frozenset()
        texts = decode_each(tokenizer, ids)
        return frozenset(int(i) for i, s in zip(ids, texts) if s.strip() == ".")

    ids = check(sorted(set(cands)))
    if not ids:
        ids = check(list(range(_vocab_size(tokenizer))))
    return ids


class TokenizedHaystack:
    """A haystack text tokenized once and reused for every instance of a sweep.

    Like the original, the text is repeated (whole copies) until it is long enough; unlike it, the
    criterion is the token count (at least ``min_tokens`` plus a small margin) rather than the word
    count, which makes no difference for the first ``length`` tokens but never comes up short.
    ``tokens`` are encoded without special tokens (default mode); ``tokens_with_special`` with the
    tokenizer's defaults (faithful mode, computed on first use). It holds its tokenizer.

    Only as much text as the tokens need is tokenized (``whole=False``, the default): a prefix of
    the repeated text, cut before a space between two words (``_CUT``), about ``min_tokens`` plus
    the margin long, and grown when a longer length asks for more. A 2K-token grid on a 4.4 MB
    haystack tokenizes ~10 KB, not 4.4 MB. The prefix's tokens are the first tokens of the whole
    text (pre-tokenizers split there); each cut is checked against a second, longer one, and a
    tokenizer that merges across it gets the whole text tokenized, as with ``whole=True`` (which
    the gates' data uses: it samples windows from the whole text).
    """

    def __init__(self, tokenizer: Any, text: str, min_tokens: int = 0, *, whole: bool = False) -> None:
        if not isinstance(text, str) or not text.strip():
            raise UserError("haystack text is empty; set config.haystack to a non-empty .txt file or a "
                            "directory of them (\"\" = the bundled Areopagitica)")
        self.tokenizer = tokenizer
        self.text = text
        self.whole = whole
        self._source = ""                    # the text whose tokens these are
        self._copies = 0                     # > 0: _source is that many whole copies of text
        self._tokens: Optional[np.ndarray] = None
        self._tokens_special: Optional[np.ndarray] = None
        self._faithful_ctx: Dict[int, List[int]] = {}
        self.ensure(min_tokens)

    @property
    def repeated_text(self) -> str:
        """The text that was tokenized: whole copies of ``text``, or a prefix of their repetition."""
        return self._source

    @property
    def tokens(self) -> np.ndarray:
        """Token ids (int32, read-only) of the repeated text, no special tokens."""
        assert self._tokens is not None
        return self._tokens

    @property
    def tokens_with_special(self) -> np.ndarray:
        """Token ids of the repeated text encoded with the tokenizer's default special tokens."""
        if self._tokens_special is None:
            self._tokens_special = readonly(encode(self.tokenizer, self.repeated_text, special=True))
        return self._tokens_special

    def ensure(self, min_tokens: int) -> None:
        """Make sure at least ``min_tokens`` (+ margin) tokens are available, tokenizing more if not."""
        need = int(min_tokens) + HAYSTACK_MARGIN
        if self._tokens is not None and len(self._tokens) >= need:
            return
        found = None if self.whole or self._copies else self._prefix_tokens(need)
        if found is None:
            self._copies, toks = self._whole_tokens(need)
            self._source = self.text * self._copies
        else:
            self._source, toks = found
        self._tokens = readonly(toks)
        self._tokens_special = None
        self._faithful_ctx.clear()

    def _whole_tokens(self, need: int) -> tuple:
        """(copies, tokens of text * copies): at least `need` tokens, copies estimated by words."""
        words = max(1, len(self.text.split()))
        copies = max(1, self._copies, math.ceil(need / words))
        while True:
            toks = encode(self.tokenizer, self.text * copies, special=False)
            if len(toks) >= need:
                return copies, toks
            per_copy = max(1, len(toks) // copies)
            copies = max(copies + 1, math.ceil(need / per_copy))

    def _repeat(self, n: int) -> str:
        """The first n characters of the text repeated."""
        return (self.text * max(1, math.ceil(n / len(self.text))))[:n]

    def _cut(self, src: str, n: int) -> int:
        """The largest cut (`_CUT`) at or before n in src; 0 if none in the window before it."""
        lo = max(0, n - _CUT_WINDOW)
        last = 0
        for m in _CUT.finditer(src, lo, min(n + 1, len(src))):
            last = m.start()
        return last

    def _prefix_tokens(self, need: int) -> Optional[tuple]:
        """(a cut prefix of the repeated text, its tokens) with at least `need` tokens, checked
        against a longer cut; None where there is no cut or the check fails (a tokenizer that
        merges across spaces): the caller tokenizes whole copies."""
        chars = max(2 * len(self._source), int(need * 5.5) + 256)   # ~4 characters a token in prose
        while True:
            if chars >= len(self.text) and chars >= len(self.text) * math.ceil(need / max(1, len(self.text.split()))):
                return None   # as long as the whole copies: nothing to save
            slack = max(256, chars // 16)
            src = self._repeat(chars + slack + 1)
            p, q = self._cut(src, chars), self._cut(src, chars + slack)
            if p == 0 or q <= p:
                return None
            toks = encode(self.tokenizer, src[:p], special=False)
            if len(toks) >= need:
                longer = encode(self.tokenizer, src[:q], special=False)
                if longer[:len(toks)] != toks:
                    logging.info("haystack: the tokenizer merges across a space; tokenizing whole copies")
                    return None
                return src[:p], toks
            chars = int(chars * need / max(1, len(toks)) * 1.1) + 256

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
            cached = encode(self.tokenizer, text, special=True)
            self._faithful_ctx[length] = cached
        return list(cached)


def tokenized_haystack(tokenizer: Any, text: str, min_tokens: int = 0) -> TokenizedHaystack:
    """A new :class:`TokenizedHaystack` of (tokenizer, text) (nothing is cached: reuse the object,
    or a :class:`TokenizerData`, to tokenize once)."""
    return TokenizedHaystack(tokenizer, text, min_tokens)


class TokenizerData:
    """One tokenizer's derived data for building needle prompts, computed on first use and kept.

    * :attr:`period_ids`: the ids that decode to ``"."`` (:func:`period_token_ids`), where the
      default mode may insert a needle;
    * :meth:`haystack`: the :class:`TokenizedHaystack` of a haystack text, one per distinct text,
      grown to the longest length asked for.

    Whoever builds several instances for one tokenizer creates one and passes it along
    (``build_instance(..., data=data)``); ``iter_grid`` / ``build_grid`` create one per grid. It
    lives as long as the caller keeps it, and so do the tokenizer and the haystack tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._period_ids: Optional[FrozenSet[int]] = None
        self._haystacks: Dict[str, TokenizedHaystack] = {}

    @property
    def period_ids(self) -> FrozenSet[int]:
        if self._period_ids is None:
            self._period_ids = period_token_ids(self.tokenizer)
        return self._period_ids

    def haystack(self, text: str, min_tokens: int = 0) -> TokenizedHaystack:
        """The tokenized ``text`` (tokenized on first use), with at least ``min_tokens`` tokens."""
        hay = self._haystacks.get(text) if isinstance(text, str) else None
        if hay is None:
            hay = TokenizedHaystack(self.tokenizer, text, min_tokens)
            self._haystacks[text] = hay
        else:
            hay.ensure(min_tokens)
        return hay

    def __repr__(self) -> str:
        return (f"TokenizerData({type(self.tokenizer).__name__}, haystacks={len(self._haystacks)}, "
                f"period_ids={'computed' if self._period_ids is not None else 'not yet'})")
