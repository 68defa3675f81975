"""Layer kinds of hybrid models (Gemma 2/3: local sliding-window and global layers) in the reports.

  layer_kinds(windows)             [L] "local" (the layer has a window) or "global", from ModelConfig.windows
  read_layer_kinds(path, L)        the kinds the sweep recorded in the summary.json next to a head-score
                                   file ("layer_kinds"), or None (no summary, none recorded, another shape)
  kind_summary(head_scores, kinds) per kind: its layers, heads, retrieval heads (mean > 0.1) and mean score
  kind_entry(path, head_scores)    {"layer_kinds", "by_kind"} for analyze's summary entry of a file whose
                                   model mixes kinds; {} for a dense model (one kind) or unknown kinds

The sweep writes `layer_kinds` and `layer_windows` into its summary.json (rhead_jax.detection), so the
analysis can mark the kinds without the model; head_scores.json keeps the original format.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rhead_jax.scoring import RETRIEVAL_THRESHOLD, head_means, parse_head

LOCAL, GLOBAL = "local", "global"
KINDS = (GLOBAL, LOCAL)   # the order of tables and legends
SUMMARY = "summary.json"  # the sweep's summary, next to its head_scores.json


def layer_kinds(windows: Sequence[int | None]) -> list[str]:
    """[L] windows (None: full attention) -> [L] "local" / "global"."""
    return [GLOBAL if w is None else LOCAL for w in windows]


def is_hybrid(kinds: Sequence[str] | None) -> bool:
    """True when the layers are of more than one kind (a dense model's plots and tables stay as they were)."""
    return bool(kinds) and len(set(kinds)) > 1


def read_layer_kinds(head_scores_path: str | os.PathLike, num_layers: int) -> list[str] | None:
    """The `layer_kinds` of the sweep summary next to `head_scores_path`, when it has one entry per
    layer of `num_layers` and names known kinds; else None (published files, other tools' outputs)."""
    from rhead_jax import io

    path = io.as_path(head_scores_path).parent / SUMMARY
    try:
        summary = io.read_json(path)
    except (OSError, ValueError):
        return None
    kinds = summary.get("layer_kinds") if isinstance(summary, dict) else None
    if (not isinstance(kinds, list) or len(kinds) != num_layers
            or not all(k in KINDS for k in kinds)):
        return None
    return kinds


def kind_summary(head_scores: dict[str, list[float]], kinds: Sequence[str],
                 threshold: float = RETRIEVAL_THRESHOLD) -> dict[str, dict]:
    """{kind: {"layers": [l], "heads": n, "retrieval_heads": n (mean > threshold), "mean": mean score of
    its heads, "top": [[head, mean]] its retrieval heads, best first}} for each kind present, KINDS order."""
    means = head_means(head_scores)
    out = {}
    for kind in KINDS:
        layers = [l for l, k in enumerate(kinds) if k == kind]
        if not layers:
            continue
        heads = {h: m for h, m in means.items() if kinds[parse_head(h)[0]] == kind}
        ret = sorted(((h, float(m)) for h, m in heads.items() if m > threshold), key=lambda x: (-x[1], parse_head(x[0])))
        out[kind] = {"layers": layers, "heads": len(heads), "retrieval_heads": len(ret),
                     "mean": float(np.mean(list(heads.values()))) if heads else 0.0,
                     "top": [[h, round(m, 4)] for h, m in ret]}
    return out


def kind_entry(head_scores_path: str | os.PathLike, head_scores: dict[str, list[float]]) -> dict:
    """What analyze adds to a file's summary entry: {"layer_kinds", "by_kind"} when the sweep next to
    it recorded more than one kind of layer, else {}."""
    num_layers = 1 + max(parse_head(h)[0] for h in head_scores) if head_scores else 0
    kinds = read_layer_kinds(head_scores_path, num_layers)
    if not is_hybrid(kinds):
        return {}
    return {"layer_kinds": kinds, "by_kind": kind_summary(head_scores, kinds)}


def format_kinds(by_kind: dict[str, dict]) -> str:
    """One line: retrieval heads per kind of layer, e.g. `global (layers 5, 11, 17): 3 of 12 heads > 0.1,
    mean 0.180; local (15 layers): 0 of 60 heads > 0.1, mean 0.000`."""
    parts = []
    for kind, e in by_kind.items():
        n = len(e["layers"])
        where = f"layers {', '.join(map(str, e['layers']))}" if n <= 6 else f"{n} layers"
        parts.append(f"{kind} ({where}): {e['retrieval_heads']} of {e['heads']} heads > {RETRIEVAL_THRESHOLD}, "
                     f"mean {e['mean']:.3f}")
    return "; ".join(parts)
