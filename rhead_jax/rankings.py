"""Head rankings from any detector, read into one shape.

A ranking scores heads. Files:
  - a head-score JSON `{"L-H": [score per test]}` (the sweep's head_scores.json and
    head_scores_<name>.json, rhead_jax.detectors' files, the published ones): one mean score per
    QUERY head;
  - a gate TSV (DuoAttention's full_attention_heads.tsv; rhead_jax.gates writes the same format):
    one row per layer, one tab-separated float per KV head, clipped to [0, 1] when read;
  - LOCOS's released head JSON (its envelope around the head-score JSON, `unwrap_released`) and
    QRHead's head-set YAML (a ranked list of heads, `read_qrhead_head_set`).

`Ranking.per_query` and `Ranking.per_kv` give [L, H] / [L, K] arrays. A query-head ranking becomes a
KV-head one by the max over the KV head's query heads: a KV head's cache can only be dropped if
none of the query heads that read it retrieves (the head that copies the needle needs every key).
A KV-head ranking becomes a query-head one by repeating each KV head's score over its group.
Query head h reads KV head h // G (G = H / K, the group size; HF's `repeat_kv` order).

Group sizes (`group_sizes`): given (a model's config, --group_size), or inferred where a KV
ranking [L, K] and a query ranking [L, H] of the same depth meet (G = H / K). `comparable` says at
which levels two rankings can be compared: two files of one model, compared per query head and/or
per KV head (rhead_jax.analysis.compare.compare_rankings).

Top heads (`Ranking.top_query_heads`, what an ablation masks): k counts QUERY heads. A query ranking
gives its k best heads (ties: layer, then head order, as scoring.top_heads); a KV ranking takes KV
heads best first (same tie order) and masks their query heads, in head order, until k query heads
are masked (the last KV head may be masked in part when G does not divide k).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from rhead_jax import io, scoring
from rhead_jax.errors import UserError

KINDS = ("query", "kv")
LEVELS = ("query", "kv")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """scores [L, H] (kind "query") or [L, K] (kind "kv"); `name` labels it in tables and plots;
    `path` is the file it was read from ("" when built in memory)."""

    name: str
    scores: np.ndarray
    kind: str
    path: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.scores.shape)

    @property
    def kind_text(self) -> str:
        return "per query head" if self.kind == "query" else "per KV head"

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

    def at(self, level: str, group_size: int) -> np.ndarray:
        """per_query or per_kv by name ("query" | "kv")."""
        return self.per_query(group_size) if level == "query" else self.per_kv(group_size)

    def top_query_heads(self, k: int, group_size: int = 1) -> list[tuple[int, int]]:
        """The k query heads an ablation masks (module docstring), best first."""
        order = ranked_heads(self.scores)
        if self.kind == "query":
            return order[:k]
        heads = [(l, kv * group_size + j) for l, kv in order for j in range(group_size)]
        return heads[:k]

    def ties_at_cut(self, k: int, group_size: int = 1) -> int:
        """How many heads share the score of the k-th query head chosen by `top_query_heads` while
        lying on both sides of the cut (0 when the cut falls between two scores): the choice among
        them is the tie order's, not the scores'."""
        s = self.per_query(group_size).ravel()
        if not 0 < k < s.size:
            return 0
        v = np.sort(s)[::-1]
        if v[k - 1] != v[k]:
            return 0
        return int((s == v[k - 1]).sum())


def ranked_heads(scores: np.ndarray) -> list[tuple[int, int]]:
    """[L, N] scores -> every (layer, index), best first; ties by layer, then index."""
    L, N = scores.shape
    flat = np.asarray(scores, np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))  # stable: -score, then row-major (layer, index)
    return [(int(i) // N, int(i) % N) for i in order]


def head_score_array(head_scores: dict) -> np.ndarray:
    """{"L-H": [scores]} -> [L, H] mean scores (an empty list scores 0, as in the original)."""
    means = scoring.head_means(head_scores)
    heads = [scoring.parse_head(k) for k in means]
    L, H = max(l for l, _ in heads) + 1, max(h for _, h in heads) + 1
    out = np.zeros((L, H), np.float64)
    for k, v in means.items():
        out[scoring.parse_head(k)] = v
    return out


# ------------------------------------------------------------------------ other toolkits' head files
QRHEAD_SUFFIXES = (".yaml", ".yml")


def unwrap_released(data):
    """LOCOS's released head files (github.com/aryopg/locos, locos/detectors/*.py: logit_contrib, dla,
    attention_spatial, ...) wrap the original's `{"L-H": [score per trial]}` in an envelope
    `{"meta": {...}, "scores": {"L-H": [...]}, "trial_ids": [...], "confidence_intervals": {...}}`:
    its "scores". Anything else is returned as it is."""
    if isinstance(data, dict) and isinstance(data.get("scores"), dict) and "meta" in data:
        return data["scores"]
    return data


def read_qrhead_head_set(path) -> dict[str, list[float]]:
    """QRHead's head sets (github.com/princeton-pli/QRHead, src/qrretriever/configs/*.yaml): a YAML
    config whose `attn_head_set` is "L-H,L-H,..." (its top heads, best first, no scores) ->
    {"L-H": [(n - rank) / n]} for the n listed heads (1 for the best, 1/n for the last); the heads
    it does not list score 0 once padded to the model's shape (`pad_head_scores`)."""
    import yaml

    text = _read_text(path, "QRHead head set")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"QRHead head set {path} is not valid YAML ({e})") from None
    heads = cfg.get("attn_head_set") if isinstance(cfg, dict) else None
    if not isinstance(heads, str) or not heads.strip():
        raise UserError(f"QRHead head set {path}: expected `attn_head_set: \"L-H,L-H,...\"` (QRHead's configs/*.yaml)")
    keys = [k.strip() for k in heads.split(",") if k.strip()]
    try:
        parsed = [scoring.parse_head(k) for k in keys]
    except ValueError:
        raise UserError(f"QRHead head set {path}: attn_head_set holds a key that is not '<layer>-<head>'") from None
    if len(set(parsed)) != len(parsed):
        raise UserError(f"QRHead head set {path}: attn_head_set lists a head twice")
    n = len(keys)
    return {f"{l}-{h}": [(n - r) / n] for r, (l, h) in enumerate(parsed)}


def pad_head_scores(data: dict[str, list[float]], layers: int, heads: int) -> dict[str, list[float]]:
    """`data` with every head of a layers x heads model, a missing head scoring [0.0] per test."""
    n = len(next(iter(data.values())))
    return {f"{l}-{h}": data.get(f"{l}-{h}", [0.0] * n) for l in range(layers) for h in range(heads)}


def _read_text(path, what: str) -> str:
    p = io.as_path(path)
    if not p.exists():
        raise UserError(f"{what} {path} not found: check the path")
    if p.is_dir():
        raise UserError(f"{what} {path} is a directory: give the file in it")
    try:
        return p.read_text()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not text ({e})") from None


def read_gates_tsv(path) -> np.ndarray:
    """A DuoAttention gate TSV -> [L, K] float64, clipped to [0, 1]."""
    text = _read_text(path, "gate file")
    try:
        rows = [[float(x) for x in line.split("\t")] for line in text.strip().splitlines() if line.strip()]
    except ValueError as e:
        raise UserError(f"gate file {path}: not a tab-separated float matrix ({e})") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise UserError(f"gate file {path}: expected one row of KV-head gates per layer, all of one length "
                        f"(got rows of {sorted({len(r) for r in rows})} values)")
    g = np.asarray(rows, np.float64)
    if not np.isfinite(g).all():
        raise UserError(f"gate file {path}: holds NaN or infinite values")
    return np.clip(g, 0.0, 1.0)


def write_gates_tsv(path, gates) -> None:
    """[L, K] gates -> DuoAttention's TSV (atomically)."""
    g = np.asarray(gates, np.float64)
    io.atomic_write_text(path, "".join("\t".join(repr(float(x)) for x in row) + "\n" for row in g))


def read_ranking(path, name: str | None = None) -> Ranking:
    """A ranking file (.json head scores or .tsv gates) -> Ranking named `name` (default: file stem)."""
    p = Path(str(path))
    label = name or p.stem
    if p.suffix == ".tsv":
        return Ranking(label, read_gates_tsv(path), "kv", str(path))
    if p.suffix in QRHEAD_SUFFIXES:
        return Ranking(label, head_score_array(read_qrhead_head_set(path)), "query", str(path))
    text = _read_text(path, "ranking file")
    try:
        data = unwrap_released(json.loads(text))
        return Ranking(label, head_score_array(data), "query", str(path))
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"ranking file {path}: expected a head-score JSON {{\"L-H\": [scores]}} or a gate "
                        f".tsv ({e})") from None


def split_spec(spec: str) -> tuple[str | None, str]:
    """'NAME:PATH' -> (NAME, PATH); 'PATH' (also gs://..., or a path holding ':' that exists) -> (None, PATH)."""
    spec = str(spec)
    name, sep, path = spec.partition(":")
    if not sep or Path(spec).exists() or path.startswith("//") or not name or "/" in name:
        return None, spec
    return name, path


def parse_ranking_spec(spec: str) -> Ranking:
    """'NAME:PATH' or 'PATH' -> Ranking."""
    name, path = split_spec(spec)
    return read_ranking(path, name)


# --------------------------------------------------------------------------------- groups and levels
def group_sizes(rankings: Sequence[Ranking], group_size: int | None = None) -> dict[str, int | None]:
    """{name: G or None (unknown)}. With `group_size` every ranking gets it (a query ranking whose
    head count it does not divide is refused); else a ranking's G is inferred from the rankings of the
    other kind with the same number of layers whose head counts divide (H / K); two different
    inferences are refused (give the group size)."""
    out: dict[str, int | None] = {}
    for r in rankings:
        L, N = r.shape
        if group_size is not None:
            if group_size < 1:
                raise UserError(f"the group size must be >= 1, got {group_size}")
            if r.kind == "query" and N % group_size:
                raise UserError(f"{r.name} ({r.path or 'ranking'}) has {N} query heads per layer, not a multiple "
                                f"of the group size {group_size}: give the group size of its model")
            out[r.name] = group_size
            continue
        found = set()
        for o in rankings:
            if o.kind == r.kind or o.shape[0] != L:
                continue
            H, K = (N, o.shape[1]) if r.kind == "query" else (o.shape[1], N)
            if H % K == 0:
                found.add(H // K)
        if len(found) > 1:
            raise UserError(f"{r.name} ({r.shape[0]} x {N}) pairs with rankings of group sizes {sorted(found)}: "
                            "give the group size (--group_size, or --model) of its model")
        out[r.name] = found.pop() if found else None
    return out


def comparable(a: Ranking, b: Ranking, ga: int | None, gb: int | None) -> tuple[dict[str, int | None], str]:
    """({level: group size} at which `a` and `b` can be compared, why not / what is left out).

    Per query head when at least one is a query ranking, per KV head when at least one is a KV
    ranking or when both are query rankings of a known group size > 1. With G = 1 (MHA) the two
    levels coincide and only one is given. Two query rankings of an unknown group size are compared
    per query head, with group size None."""
    if a.shape[0] != b.shape[0]:
        return {}, f"different layer counts ({a.shape[0]} vs {b.shape[0]})"
    if a.kind == b.kind:
        if a.shape != b.shape:
            return {}, f"different head counts ({a.shape[1]} vs {b.shape[1]})"
        if a.kind == "kv":
            return {"kv": ga or gb or 1}, "both per KV head"
        g = ga if ga == gb else None
        if g is None or g == 1:
            return {"query": g}, ("MHA: per KV head = per query head" if g == 1
                                  else "group size unknown: per query head only")
        return {"query": g, "kv": g}, ""
    q, kv = (a, b) if a.kind == "query" else (b, a)
    g = (ga if a.kind == "query" else gb)
    if g is None or kv.shape[1] * g != q.shape[1]:
        return {}, (f"{q.shape[1]} query heads vs {kv.shape[1]} KV heads per layer"
                    + (f" with group size {g}" if g else ""))
    if g == 1:
        return {"kv": 1}, "MHA: per query head = per KV head"
    return {"query": g, "kv": g}, ""


def check_ranking_shape(r: Ranking, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
    """A ranking used on a model must be its shape: [L, H] (query) or [L, K] (KV)."""
    want = (num_layers, num_heads if r.kind == "query" else num_kv_heads)
    if r.shape != want:
        what = "query heads" if r.kind == "query" else "KV heads"
        raise UserError(f"ranking {r.name} ({r.path or 'in memory'}) is {r.shape[0]} layers x {r.shape[1]} {what}, "
                        f"the model {want[0]} x {want[1]} (from a different model?)")


def resolve_k(spec: str | int, n: int) -> int:
    """An overlap k: an integer, or a percentage of the n heads ('25%' of 256 -> 64, rounded)."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100
            if not 0 < frac <= 1:
                raise ValueError
            return max(1, int(math.floor(frac * n + 0.5)))
        k = int(text)
        if k < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"top-k {spec!r}: give an integer >= 1 or a percentage in (0, 100], e.g. 20 or 25%") from None
    return min(k, n)
