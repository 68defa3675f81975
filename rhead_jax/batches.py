"""The batches of a plan: instances of one length, in grid order, at most a batch size each.

Batches: a short batch is padded to `batch_size` rows (repeating its last row, results dropped;
rhead_jax.engine.Engine.generate) so every batch of a length shares one compiled program; the
batch list is a function of the plan alone, so a resumed run recomputes exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import collections
from typing import Mapping, Sequence

from rhead_jax.needle.prompts import Instance

__all__ = ["grid_batches", "make_batches", "round_up"]


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_batches(instances: Sequence[Instance], batch_size: int | Mapping[int, int]) -> list[list[int]]:
    """Indices of instances grouped by length (grid order kept), at most batch_size per batch (an int,
    or one per length: Engine.batch_sizes)."""
    size = batch_size.__getitem__ if isinstance(batch_size, Mapping) else (lambda length: batch_size)
    batches: list[list[int]] = []
    for i, inst in enumerate(instances):
        if (batches and len(batches[-1]) < size(inst.length)
                and instances[batches[-1][0]].length == inst.length):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def grid_batches(instances: Sequence[Instance], batch_size: int) -> tuple[int, list[list[int]]]:
    """(batch size, make_batches(...)) with the batch size capped at the largest group of one
    length: a batch is never padded beyond it (padding rows cost full compute)."""
    per_length = collections.Counter(i.length for i in instances)
    size = min(batch_size, max(per_length.values()))
    return size, make_batches(instances, size)
