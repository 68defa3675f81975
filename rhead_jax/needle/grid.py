"""The paper's test grid (ORIGINAL.md section 1): 20 context lengths x 10 depths x the needles."""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Union

import numpy as np

from rhead_jax.errors import UserError

from .haystack import Needle
from .prompts import Instance, build_instance, check_length, instance_key
from .tokens import TokenizedHaystack, TokenizerData


def paper_lengths(start: int = 1000, stop: int = 50000, num: int = 20) -> List[int]:
    """``round(linspace(1000, 50000, 20))`` as Python ints: [1000, 3579, 6158, ..., 50000]."""
    return [int(x) for x in np.round(np.linspace(start, stop, num=num, endpoint=True)).astype(int)]


def paper_depths(start: float = 0, stop: float = 100, num: int = 10) -> List[int]:
    """``round(linspace(0, 100, 10))`` percent: [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]."""
    return [int(x) for x in np.round(np.linspace(start, stop, num=num, endpoint=True)).astype(int)]


def _sorted_unique(values: Sequence[Any], what: str) -> List[Any]:
    vals = list(values)
    if not vals:
        raise UserError(f"no {what} given; config.sweep.{what} needs at least one value")
    out = sorted(vals)
    keys = [f"{float(v):g}" for v in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UserError(f"duplicate {what}: {', '.join(dup)} (instance keys would collide); "
                        f"list each value once in config.sweep.{what}")
    return out


def grid_keys(lengths: Sequence[int], depths: Sequence[float], num_needles: int) -> List[str]:
    """The keys of :func:`build_grid`'s instances, in the same order, without building anything."""
    return [instance_key(L, d, i)
            for L in _sorted_unique(lengths, "lengths")
            for d in _sorted_unique(depths, "depths")
            for i in range(int(num_needles))]


def iter_grid(
    tokenizer: Any,
    haystack_text: Union[str, TokenizedHaystack],
    needles: Sequence[Needle],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    chat: bool,
    faithful: bool = False,
    max_positions: Optional[int] = None,
) -> Iterator[Instance]:
    """Lazily yield the grid's instances ordered by (length, depth, needle index), ascending.

    Lengths and depths are sorted (duplicates raise); every length is checked against
    ``max_positions`` before anything is built. One :class:`TokenizerData` is created for the
    grid, so the haystack is tokenized once (for the longest length) and the tokenizer's period
    ids are found once; it is dropped with the iterator. Use this instead of :func:`build_grid` to
    keep memory flat in long sweeps.
    """
    lengths = _sorted_unique(lengths, "lengths")
    depths = _sorted_unique(depths, "depths")
    needles = list(needles)
    if not needles:
        raise UserError("no needles given; config.needles must name a JSONL file with at least one needle")
    for L in lengths:
        check_length(L, max_positions)
    data = TokenizerData(tokenizer)
    if isinstance(haystack_text, TokenizedHaystack):
        hay = haystack_text
        hay.ensure(max(lengths))
    else:
        hay = data.haystack(haystack_text, max(lengths))
    for L in lengths:
        for d in depths:
            for i, nd in enumerate(needles):
                yield build_instance(tokenizer, hay, nd, L, d, chat=chat, faithful=faithful, needle_index=i,
                                     data=data)


def build_grid(*args: Any, **kwargs: Any) -> List[Instance]:
    """All instances of the grid as a list: `iter_grid`'s arguments, order and checks."""
    return list(iter_grid(*args, **kwargs))
