"""Dynamic activation over one sweep's per-test results (paper §3, 'dynamically activated'):
which retrieval heads are always on and which depend on the context (dynamic.json).
"""
from __future__ import annotations

import os

import numpy as np

from rhead_jax import io, jsonl
from rhead_jax.errors import UserError
from rhead_jax.scoring import RETRIEVAL_THRESHOLD

ALWAYS_ON_THRESHOLD = 0.9

RESULT_FIELDS = ("scores", "needle_index", "length", "depth")


def load_results(path: str | os.PathLike) -> list[dict]:
    """A sweep's results.jsonl: one JSON object per line with at least RESULT_FIELDS."""
    try:
        lines = io.as_path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"results file {path} not found: give a sweep's results.jsonl to --results") from None
    except IsADirectoryError:
        raise UserError(f"results file {path} is a directory: give the results.jsonl in it") from None
    except UnicodeDecodeError as e:
        raise UserError(f"results file {path} is not text ({e}): give a sweep's results.jsonl") from None
    out = [rec for _, rec in jsonl.objects(lines, where=f"results file {path}", fields=RESULT_FIELDS,
                                           fix="--results takes a sweep's results.jsonl (one JSON object per line)")]
    if not out:
        raise UserError(f"{path} has no records: --results takes a sweep's results.jsonl")
    return out


def _group_rates(active: np.ndarray, labels: list, heads: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """{head: {label: activation rate of that head over the tests with that label}}."""
    out = {f"{l}-{h}": {} for l, h in heads}
    labels_arr = np.array([str(x) for x in labels])
    for lab in _sorted_labels(set(labels)):
        sel = labels_arr == str(lab)
        for l, h in heads:
            out[f"{l}-{h}"][str(lab)] = float(active[sel, l, h].mean())
    return out


def _sorted_labels(labels) -> list:
    return sorted(labels, key=lambda x: (isinstance(x, str), x))


def dynamic_activation(results: list[dict], always_on: float = ALWAYS_ON_THRESHOLD,
                       threshold: float = RETRIEVAL_THRESHOLD) -> dict:
    """Activation analysis of one sweep (paper §3, 'dynamically activated').

    A head is active in a test when its per-test score is > 0. Over the kept tests (ROUGE gate; a record
    without `kept` counts as kept) every head gets an activation rate; retrieval heads (mean over kept
    tests > `threshold`) are 'always-on' when their rate is >= `always_on`, else 'context-specific'.
    Rates are also broken down by needle, context length and depth for the retrieval heads.
    """
    kept = [r for r in results if r.get("kept", True)]
    if not results:
        raise ValueError("no results")
    L, H = np.asarray(results[0]["scores"], dtype=float).shape
    base = {"tests": len(results), "kept": len(kept), "layers": int(L), "heads": int(H),
            "threshold": threshold, "always_on_threshold": always_on}
    if not kept:
        return {**base, "activation": {}, "mean": {}, "retrieval": [], "always_on": [], "context_specific": [],
                "by_needle": {}, "by_length": {}, "by_depth": {}}
    scores = np.stack([np.asarray(r["scores"], dtype=float) for r in kept])  # [T, L, H]
    active = scores > 0
    rate = active.mean(axis=0)
    mean = scores.mean(axis=0)
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    retrieval = sorted(((l, h) for l, h in all_heads if mean[l, h] > threshold),
                       key=lambda lh: (-mean[lh], lh))
    by = {name: _group_rates(active, [r[field] for r in kept], retrieval)
          for name, field in (("needle", "needle_index"), ("length", "length"), ("depth", "depth"))}
    heads_out = []
    for l, h in retrieval:
        key = f"{l}-{h}"
        heads_out.append({"head": key, "mean": float(mean[l, h]), "activation": float(rate[l, h]),
                          "class": "always-on" if rate[l, h] >= always_on else "context-specific",
                          "by_needle": by["needle"][key], "by_length": by["length"][key],
                          "by_depth": by["depth"][key]})

    ret_mask = np.zeros((L, H), bool)
    for lh in retrieval:
        ret_mask[lh] = True

    def groups(field: str) -> dict:
        out = {}
        values = [r[field] for r in results]
        for lab in _sorted_labels(set(values)):
            rows = np.array([r[field] == lab for r in kept])
            n_kept = int(rows.sum())
            a = active[rows]
            out[str(lab)] = {
                "tests": values.count(lab), "kept": n_kept,
                "mean_active_heads": float(a.sum(axis=(1, 2)).mean()) if n_kept else 0.0,
                "mean_active_retrieval_heads": float(a[:, ret_mask].sum(axis=1).mean()) if n_kept else 0.0,
                "retrieval_heads_active_ever": int(a[:, ret_mask].any(axis=0).sum()) if n_kept else 0,
            }
        return out

    return {
        **base,
        "activation": {f"{l}-{h}": float(rate[l, h]) for l, h in all_heads},
        "mean": {f"{l}-{h}": float(mean[l, h]) for l, h in all_heads},
        "retrieval": heads_out,
        "always_on": [d["head"] for d in heads_out if d["class"] == "always-on"],
        "context_specific": [d["head"] for d in heads_out if d["class"] == "context-specific"],
        "by_needle": groups("needle_index"),
        "by_length": groups("length"),
        "by_depth": groups("depth"),
    }

