"""A sweep that stops when the ranking is settled (config.sweep.stop_when_stable; issue 27, ask 3).

Order. The grid runs in rounds; each round holds one batch of every context length, and the batches
spread over depths and needles from the first round on. Per length the (depth, needle) cells are
taken in the order j = 0, 1, ...: depth = DEPTHS[(j + i) % D] with the depths in a spread order
(ends first, then halves: 0, 100, 50, 25, 75, ...) and needle = (j % D + j // D + i) % N, i the
length's index; so every D consecutive cells of a length cover all depths, every N cover all
needles, and lengths start at different depths. That is a bijection onto the D x N cells of each
length, so the full grid is run exactly once whatever the round. Batches stay of one length and of
config.sweep.batch_size, so the compiled programs and the shared prefix (and its branches) are the
same as in grid order; what the order costs is padding: a batch of one (length, depth) cell pads
its rows to nearly equal prompts, a round's batch mixes depths (prompts differ by a needle or two
of tokens, not more: the context length is the same). Measured in docs/trust.md.

Stop. After each round, the kept tests so far go through rhead_jax.stability.stop_check (k = 10)
and the sweep stops after the first round at which `stability.should_stop` holds: two rounds
running whose bootstrap top-10 overlap is >= 9 of 10 and whose top 10 moved by at most one head,
on at least 10 kept tests. Deterministic: the batches are a function of the plan, and the decision
after a round is a function of that round's results, read back from the result files on a resume;
so a killed sweep resumes to the same stop, and a finished one re-run stops where it stopped.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import stability
from rhead_jax.needle.prompts import Instance
from rhead_jax.scoring import head_key

STOP_K = 10


def spread(n: int) -> list[int]:
    """0..n-1 with the ends first, then the midpoints of the gaps (0, n-1, n//2, ...): any prefix
    covers the range about evenly."""
    if n <= 2:
        return list(range(n))
    out = [0, n - 1]
    gaps = [(0, n - 1)]
    while len(out) < n:
        nxt = []
        for a, b in gaps:
            if b - a > 1:
                m = (a + b) // 2
                out.append(m)
                nxt += [(a, m), (m, b)]
        gaps = nxt
    return out


def round_batches(instances: Sequence[Instance], batch_size: int | Mapping[int, int]
                  ) -> tuple[list[list[int]], list[int]]:
    """(batches: lists of instance indices, round of each batch), rounds in order (module docstring).
    batch_size: rows per batch, or per length (Engine.batch_sizes)."""
    lengths = sorted({i.length for i in instances})
    depths = sorted({i.depth for i in instances})
    needles = sorted({i.needle_index for i in instances})
    cell = {(i.length, i.depth, i.needle_index): n for n, i in enumerate(instances)}
    D, N = len(depths), len(needles)
    if len(cell) != len(instances) or len(cell) != len(lengths) * D * N:
        raise ValueError("round_batches needs a full grid: every (length, depth, needle) once")
    order = [depths[p] for p in spread(D)]
    per_length = []
    for li, L in enumerate(lengths):
        seq = [cell[(L, order[(j + li) % D], needles[(j % D + j // D + li) % N])] for j in range(D * N)]
        n = batch_size[L] if isinstance(batch_size, Mapping) else batch_size
        per_length.append([seq[s:s + n] for s in range(0, len(seq), n)])
    batches, rounds = [], []
    for r in range(max(len(b) for b in per_length)):
        for b in per_length:
            if r < len(b):
                batches.append(b[r])
                rounds.append(r)
    return batches, rounds


class _RoundStore:
    """The batches of one round as a store of their own (local index b -> global ids[b]) for
    Engine.run_batches; any other attribute (root, the preemption flags) is the store's own."""

    def __init__(self, store, ids: Sequence[int]):
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_ids", list(ids))

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __setattr__(self, name, value):
        setattr(self._store, name, value)

    def done(self, b: int) -> bool:
        return self._store.done(self._ids[b])

    def write(self, b: int, results: list[dict]) -> None:
        self._store.write(self._ids[b], results)

    def read(self, b: int) -> list[dict]:
        return self._store.read(self._ids[b])

    def scan(self, n: int) -> dict[int, list[dict]]:
        """{b: results} of the round's first n batches that are done (a torn file is not: rerun)."""
        return {b: self.read(b) for b in range(n) if self.done(b)}


def kept_matrix(results: Sequence[dict]) -> np.ndarray:
    """[kept tests, L * H] copy scores in layer-head order (stability.score_matrix's)."""
    rows = [np.asarray(r["scores"], np.float64).ravel() for r in results if r["kept"]]
    if not rows:
        return np.zeros((0, np.asarray(results[0]["scores"]).size if results else 0))
    return np.stack(rows)


def run_rounds(engine, store, batches: Sequence[Sequence[int]], rounds: Sequence[int],
               run_one: Callable[[int], list[dict]], *, desc: str, num_heads: int,
               k: int = STOP_K) -> tuple[list[list[dict]], dict]:
    """Run the rounds (Engine.run_batches on each) until `stability.should_stop`; returns (the run
    batches' results, in batch order, and the record of the stop for summary.json)."""
    n_rounds = max(rounds) + 1
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="test")
    per_batch: list[list[dict]] = []
    checks: list[dict] = []
    stopped = False
    for r in range(n_rounds):
        ids = [b for b in range(len(batches)) if rounds[b] == r]
        view = _RoundStore(store, ids)
        bar.update(sum(len(batches[ids[b]]) for b in range(len(ids)) if view.done(b)))
        per_batch += engine.run_batches(view, [len(batches[b]) for b in ids], lambda b: run_one(ids[b]),
                                        desc=f"{desc} round {r + 1}/{n_rounds}", bar=bar)
        results = [x for rs in per_batch for x in rs]
        c = stability.stop_check(kept_matrix(results), k)
        checks.append({"round": r + 1, "tests": len(results), "kept": c["tests"],
                       "expected_overlap": round(c["expected_overlap"], 4),
                       "min_frequency": round(c["min_frequency"], 4), "settled": c["settled"],
                       "top_k": [head_key(divmod(i, num_heads)) for i in c["top_k"]]})
        logging.info("%s: round %d/%d, %d tests (%d kept): bootstrap top-%d overlap %.2f, settled %s", desc, r + 1,
                     n_rounds, len(results), c["tests"], k, c["expected_overlap"], c["settled"])
        if r + 1 < n_rounds and stability.should_stop(checks):
            stopped = True
            break
    bar.close()
    ran = sum(len(x) for x in per_batch)
    if stopped:
        reason = (f"the top {k} was settled after round {len(checks)} of {n_rounds}: two rounds running with a "
                  f"bootstrap top-{k} overlap >= {k - stability.STOP_SLACK} of {k} and at most "
                  f"{stability.STOP_SLACK} head moved")
    elif stability.should_stop(checks):
        reason = f"the grid ran to its end; the top {k} settled in the last round"
    else:
        reason = f"the grid ran to its end before the top {k} settled"
    return per_batch, {"tests_run": ran, "tests_total": total, "rounds_run": len(checks), "rounds_total": n_rounds,
                       "stopped_early": stopped, "reason": reason,
                       "rule": RULE.format(k=k, k1=k - stability.STOP_SLACK), "checks": checks}


RULE = ("stop after the first round r such that rounds r-1 and r each have >= 10 kept tests, a bootstrap "
        "(1000 resamples of the kept tests) expected top-{k} overlap with the current top {k} of >= {k1}, "
        "and a top {k} that moved by at most one head from the round before")
