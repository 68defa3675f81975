"""Head rankings from any detector, read into one shape.

A ranking scores heads. Files:
  - a head-score JSON `{"L-H": [score per test]}` (the sweep's head_scores.json and
    head_scores_<name>.json, rhead_jax.detectors' files, the published ones): one mean score per
    QUERY head;
  - a gate TSV (DuoAttention's full_attention_heads.tsv; rhead_jax.gates writes the same format):
    one row per layer, one tab-separated float per KV head, clipped to [0, 1] when read.

`Ranking.per_query` and `Ranking.per_kv` give [L, H] / [L, K] arrays. A query-head ranking becomes a
KV-head one by the max over the KV head's query heads: a KV head's cache can only be dropped if
none of the query heads that read it retrieves (the head that copies the needle needs every key).
A KV-head ranking becomes a query-head one by repeating each KV head's score over its group.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from rhead_jax import io, scoring
from rhead_jax.errors import UserError

KINDS = ("query", "kv")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """scores [L, H] (kind "query") or [L, K] (kind "kv"); `name` labels it in tables and plots."""

    name: str
    scores: np.ndarray
    kind: str

    def per_query(self, group_size: int) -> np.ndarray:
        if self.kind == "query":
            return self.scores
        return np.repeat(self.scores, group_size, axis=1)

    def per_kv(self, group_size: int) -> np.ndarray:
        if self.kind == "kv":
            return self.scores
        L, H = self.scores.shape
        if H % group_size:
            raise UserError(f"ranking {self.name!r} has {H} query heads per layer, not a multiple of the "
                            f"group size {group_size}")
        return self.scores.reshape(L, H // group_size, group_size).max(-1)


def head_score_array(head_scores: dict) -> np.ndarray:
    """{"L-H": [scores]} -> [L, H] mean scores (an empty list scores 0, as in the original)."""
    means = scoring.head_means(head_scores)
    heads = [scoring.parse_head(k) for k in means]
    L, H = max(l for l, _ in heads) + 1, max(h for _, h in heads) + 1
    out = np.zeros((L, H), np.float64)
    for k, v in means.items():
        out[scoring.parse_head(k)] = v
    return out


def read_gates_tsv(path) -> np.ndarray:
    """A DuoAttention gate TSV -> [L, K] float64, clipped to [0, 1]."""
    text = io.as_path(path).read_text()
    try:
        rows = [[float(x) for x in line.split("\t")] for line in text.strip().splitlines() if line.strip()]
    except ValueError as e:
        raise UserError(f"gate file {path}: not a tab-separated float matrix ({e})") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise UserError(f"gate file {path}: expected one row of KV-head gates per layer, all of one length")
    return np.clip(np.asarray(rows, np.float64), 0.0, 1.0)


def write_gates_tsv(path, gates) -> None:
    """[L, K] gates -> DuoAttention's TSV (atomically)."""
    g = np.asarray(gates, np.float64)
    io.atomic_write_text(path, "".join("\t".join(repr(float(x)) for x in row) + "\n" for row in g))


def read_ranking(path, name: str | None = None) -> Ranking:
    """A ranking file (.json head scores or .tsv gates) -> Ranking named `name` (default: file stem)."""
    p = Path(str(path))
    label = name or p.stem
    if not io.as_path(path).exists():
        raise UserError(f"ranking file {path} not found")
    if p.suffix == ".tsv":
        return Ranking(label, read_gates_tsv(path), "kv")
    try:
        data = json.loads(io.as_path(path).read_text())
        return Ranking(label, head_score_array(data), "query")
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"ranking file {path}: expected a head-score JSON {{\"L-H\": [scores]}} or a gate "
                        f".tsv ({e})") from None


def parse_ranking_spec(spec: str) -> Ranking:
    """'NAME:PATH' or 'PATH' -> Ranking."""
    name, sep, path = spec.partition(":")
    if sep and not Path(spec).exists():
        return read_ranking(path, name)
    return read_ranking(spec)
