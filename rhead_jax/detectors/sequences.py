"""The repeated random sequences of the detectors and the attention-mass targets they score."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rhead_jax.errors import UserError
from rhead_jax.models.attention import MassTargets, mass_targets

DETECTORS = ("induction", "duplicate", "previous")   # file names; each is the attention target of that name


@dataclasses.dataclass(frozen=True)
class Sequences:
    """tokens [samples, T] int32 with T = start + length * repeats; `start` = 1 with a BOS, else 0
    (the position of the first random token)."""

    tokens: np.ndarray
    length: int
    repeats: int
    start: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])


def ordinary_token_ids(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Token ids the random blocks draw from: ids below the model's and the tokenizer's vocabulary
    size that are neither special nor added tokens."""
    n = min(int(vocab_size), len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    try:
        special |= set(tokenizer.get_added_vocab().values())
    except (AttributeError, NotImplementedError):
        pass
    return np.array([i for i in range(n) if i not in special], np.int32)


def bos_id(tokenizer: Any) -> int | None:
    """The BOS the tokenizer puts before ordinary text, or None (SmolLM2 puts none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def random_repeats(tokenizer: Any, vocab_size: int, *, length: int, repeats: int, samples: int, seed: int,
                   max_positions: int | None = None) -> Sequences:
    """`samples` sequences of BOS (if any) + a block of `length` distinct random ordinary ids repeated
    `repeats` times; sample s draws its block from numpy's default_rng([seed, s])."""
    pool = ordinary_token_ids(tokenizer, vocab_size)
    if length > len(pool):
        raise UserError(f"config.detectors.length={length} exceeds the {len(pool)} ordinary token ids the "
                        "tokenizer has (the tokens of a block are distinct); use a smaller length")
    bos = bos_id(tokenizer)
    start = 0 if bos is None else 1
    T = start + length * repeats
    if max_positions is not None and T > max_positions:
        raise UserError(f"detector sequences of {T} tokens ({'BOS + ' if start else ''}{length} x {repeats}) exceed "
                        f"the model's {max_positions} positions; lower config.detectors.length or repeats")
    rows = []
    for s in range(samples):
        block = np.random.default_rng([seed, s]).choice(pool, size=length, replace=False)
        rows.append(([bos] if start else []) + np.tile(block, repeats).tolist())
    return Sequences(tokens=np.asarray(rows, np.int32), length=length, repeats=repeats, start=start)


def detector_targets(batch: int, seq: Sequences) -> MassTargets:
    """The targets of DETECTORS (in that order) for `batch` rows of `seq`'s shape: induction and
    duplicate over the queries from the second repeat on, previous over every query after the first."""
    T, n, s = seq.num_tokens, seq.length, seq.start
    second = (s + n, T)
    queries = np.array([[second, second, (1, T)]] * batch, np.int32)
    return mass_targets(batch, len(DETECTORS), queries=queries, period=np.full(batch, n), start=np.full(batch, s))


def query_counts(targets: MassTargets) -> np.ndarray:
    """[B, M] queries each target averages over (its query range)."""
    q = np.asarray(targets.queries)
    return (q[..., 1] - q[..., 0]).astype(np.float64)
