"""What a needle sweep will run, from the config and the tokenizer alone (no model, no jax):
the grid's instances and the stop tokens. The engine (rhead_jax.engine) runs them; the PyTorch
baseline of benchmarks/ plans the very same instances with these functions."""
from __future__ import annotations

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
