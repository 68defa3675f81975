"""What a needle sweep will run, from the config and the tokenizer alone (no model, no jax):
the grid's instances and the stop rule. The engine (rhead_jax.engine) runs them; the PyTorch
baseline of benchmarks/ plans the very same instances with these functions.

The stop rule: a test ends after the step whose token is in `stop_tokens`, except that in default
mode a token of `leading_stop_tokens` (whitespace holding a newline) does not end it before the
first visible answer token: base models often open the answer on a new line (Gemma-3-270M after
"Answer:"). `ends_test` is the rule for one step; a decode loop keeps `seen` per row.
Faithful mode keeps the original's rule: the first newline token ends the test wherever it falls.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from rhead_jax.errors import UserError
from rhead_jax.needle.grid import build_grid
from rhead_jax.needle.haystack import load_haystack, load_needles
from rhead_jax.needle.prompts import Instance
from rhead_jax.needle.tokens import decode_each


def plan_needles(config, tokenizer, max_position_embeddings: int) -> list[Instance]:
    """The needle grid's instances; lengths that cannot fit the model are refused before any work."""
    s = config.sweep
    limit = max_position_embeddings - s.max_new_tokens
    too_long = [L for L in s.lengths if L > limit]
    if too_long:
        raise UserError(
            f"context length(s) {too_long} plus {s.max_new_tokens} generated tokens exceed the model's "
            f"max_position_embeddings={max_position_embeddings}; drop them from config.sweep.lengths")
    haystack = load_haystack(config.haystack or None)
    needles = load_needles(config.needles or None)
    return build_grid(tokenizer, haystack, needles, list(s.lengths), list(s.depths),
                      chat=config.model.chat, faithful=s.faithful, max_positions=limit)


def stop_tokens(tokenizer, *, faithful: bool) -> tuple[int, ...]:
    """Ids that end a test. Faithful: a token that decodes to exactly a newline (the original's
    check). Default: any token containing a newline, and the tokenizer's EOS."""
    ids = range(len(tokenizer))
    texts = decode_each(tokenizer, ids)   # a newline is never added or removed by the clean-up of spaces
    if faithful:
        return tuple(i for i, t in zip(ids, texts) if t == "\n")
    out = {i for i, t in zip(ids, texts) if "\n" in t}
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return tuple(sorted(out))


def leading_stop_tokens(tokenizer, *, faithful: bool) -> tuple[int, ...]:
    """The stop tokens that do not end a test before its first visible answer token: in default
    mode those that decode to whitespace holding a newline ("\n", "\n\n", " \n", ...); faithful: none."""
    if faithful:
        return ()
    ids = stop_tokens(tokenizer, faithful=False)
    texts = tokenizer.batch_decode([[i] for i in ids])
    return tuple(i for i, t in zip(ids, texts) if "\n" in t and not t.strip())


def ends_test(token: int, seen: bool, stops: Iterable[int], leading: Iterable[int]) -> tuple[bool, bool]:
    """One decode step of the stop rule: (the test ends after this step, `seen` after it).

    seen: a token outside `leading` was generated at an earlier step. A token outside `leading`
    sets it; a stop token ends the test once it is set (so a leading token ends it only after a
    visible one). With `leading` empty this is the plain rule: any stop token ends the test.
    """
    seen = seen or token not in leading
    return (token in stops and seen), seen


def answer_length(tokens: Sequence[int], stops: Iterable[int], leading: Iterable[int] = ()) -> int:
    """How many of greedy `tokens` a test generates under the stop rule (the ending token included)."""
    stops, leading, seen = set(stops), set(leading), False
    for n, token in enumerate(tokens, 1):
        end, seen = ends_test(token, seen, stops, leading)
        if end:
            return n
    return len(tokens)
