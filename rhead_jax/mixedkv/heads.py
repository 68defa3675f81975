"""Which KV heads keep a full cache: from any ranking, at random, none or all.

Choices (`config.mixedkv.heads`, the `--heads` flag):
  NAME:PATH / PATH  a ranking file (rhead_jax.rankings): a head-score JSON {"L-H": [scores]} (per
                    QUERY head, e.g. the sweep's copy scores) or a gate TSV (per KV head,
                    DuoAttention's full_attention_heads.tsv); `copy:PATH`, `gates:PATH` name them
  random            uniform random scores, one draw per seed of config.mixedkv.seeds
  none              every head streaming (StreamingLLM: sink + recent everywhere); no fraction
  all               every head full (the plain KV cache); no fraction

A query-head ranking becomes a KV-head one by the MAX over the KV head's query heads
(`Ranking.per_kv`): the cache of a KV head serves all G query heads of its group, and dropping it
hurts if ANY of them retrieves; a mean would let one retrieval head among G - 1 idle ones look idle.

A fraction f keeps n = ceil(f x L x K) KV heads full (at least the fraction, so 0.1 of 90 heads is
9 and 0.25 is 23; any f > 0 keeps at least one): the n best by score, ties broken by (layer, head)
order, lower first. Non-finite scores rank last.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from rhead_jax.errors import UserError
from rhead_jax.rankings import Ranking, parse_ranking_spec

KEYWORDS = ("random", "none", "all")


@dataclasses.dataclass(frozen=True)
class HeadChoice:
    """One way to choose full heads: kind "ranking" (with its Ranking), "random", "none" or "all"."""

    name: str
    kind: str
    ranking: Ranking | None = None
    source: str | None = None      # the ranking's file

    @property
    def uses_fraction(self) -> bool:
        return self.kind in ("ranking", "random")


def parse_choices(specs: Sequence[str]) -> list[HeadChoice]:
    """Choice specs (see the module docstring) -> HeadChoices; ranking files are read here, so a
    missing or malformed file is refused before any model is loaded."""
    out: list[HeadChoice] = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        if spec in KEYWORDS:
            out.append(HeadChoice(spec, spec))
        else:
            r = parse_ranking_spec(spec)
            _, sep, path = spec.partition(":")
            out.append(HeadChoice(r.name, "ranking", r, path if sep and not Path(spec).exists() else spec))
    if not out:
        raise UserError("no head choice given: use e.g. --heads copy:WORKDIR/head_scores.json,random,none,all")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"head choice name(s) {', '.join(dup)} given twice; name rankings NAME:PATH")
    return out


def num_full(fraction: float, total: int) -> int:
    """KV heads kept full at `fraction` of `total`: ceil(fraction x total) (module docstring)."""
    if not 0 < fraction <= 1:
        raise UserError(f"full fraction must be in (0, 1], got {fraction}")
    return min(total, max(1, math.ceil(fraction * total - 1e-9)))


def top_full(scores: np.ndarray, n: int) -> np.ndarray:
    """Boolean [L, K]: the n highest scores (ties: lower layer, then lower head first)."""
    s = np.where(np.isfinite(scores), scores, -np.inf).astype(np.float64)
    L, K = s.shape
    layer, head = np.meshgrid(np.arange(L), np.arange(K), indexing="ij")
    order = np.lexsort((head.ravel(), layer.ravel(), -s.ravel()))
    full = np.zeros(L * K, bool)
    full[order[:n]] = True
    return full.reshape(L, K)


def kv_scores(choice: HeadChoice, num_layers: int, num_kv_heads: int, group_size: int, seed: int = 0) -> np.ndarray:
    """[L, K] scores of a ranking or random choice (checked against the model's shape)."""
    if choice.kind == "random":
        return np.random.default_rng(seed).random((num_layers, num_kv_heads))
    s = choice.ranking.per_kv(group_size)
    if s.shape != (num_layers, num_kv_heads):
        what = "query heads" if choice.ranking.kind == "query" else "KV heads"
        n = s.shape[1] * (group_size if choice.ranking.kind == "query" else 1)
        raise UserError(f"ranking {choice.name!r} covers {s.shape[0]} layers x {n} {what}; the model has "
                        f"{num_layers} layers x {num_kv_heads * group_size} query heads / {num_kv_heads} KV heads")
    return s


def full_heads(choice: HeadChoice, num_layers: int, num_kv_heads: int, group_size: int, *,
               fraction: float | None = None, seed: int = 0) -> np.ndarray:
    """Boolean [L, K] (True: full) of a choice at a fraction (ignored by none / all) and seed (random)."""
    if choice.kind == "none":
        return np.zeros((num_layers, num_kv_heads), bool)
    if choice.kind == "all":
        return np.ones((num_layers, num_kv_heads), bool)
    scores = kv_scores(choice, num_layers, num_kv_heads, group_size, seed)
    return top_full(scores, num_full(fraction, num_layers * num_kv_heads))


@dataclasses.dataclass(frozen=True)
class MixedRun:
    """One evaluated head set: its choice, fraction (None for none / all), seed (random) and full heads."""

    choice: HeadChoice
    fraction: float | None
    seed: int | None
    full: np.ndarray = dataclasses.field(compare=False, repr=False)

    @property
    def label(self) -> str:
        if self.fraction is None:
            return self.choice.name
        s = f"{self.choice.name}-f{self.fraction:g}"
        return s + f"-s{self.seed}" if self.seed is not None else s

    @property
    def heads(self) -> list[list[int]]:
        return [[int(l), int(k)] for l, k in zip(*np.nonzero(self.full))]


def plan_runs(choices: Sequence[HeadChoice], fractions: Sequence[float], seeds: Sequence[int], *,
              num_layers: int, num_kv_heads: int, group_size: int) -> list[MixedRun]:
    """Every head set to evaluate: rankings per fraction, random per fraction and seed, none / all once."""
    runs = []
    for c in choices:
        if not c.uses_fraction:
            runs.append(MixedRun(c, None, None, full_heads(c, num_layers, num_kv_heads, group_size)))
            continue
        for f in fractions:
            for s in (seeds if c.kind == "random" else (None,)):
                runs.append(MixedRun(c, float(f), s, full_heads(c, num_layers, num_kv_heads, group_size,
                                                                fraction=f, seed=s or 0)))
    return runs
