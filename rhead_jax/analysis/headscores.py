"""Head-score files: reading and checking them, their [L, H] mean matrix, the paper's Fig. 3 buckets
and the per-file summary (summary.json's entries).

A head-score file is the original's format, `{"<layer>-<head>": [score_test_1, ...], ...}` (0-based
layer and query head, one list per head, all of the same length); LOCOS's released envelope and
QRHead's head sets (.yaml) are read too (rhead_jax.rankings). A head's retrieval score is the mean of
its list; a mean > 0.1 (`scoring.RETRIEVAL_THRESHOLD`) marks a retrieval head.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from rhead_jax import io
from rhead_jax.errors import UserError
from rhead_jax.scoring import BUCKET_EDGES, BUCKETS, head_means, parse_head, retrieval_heads, top_heads

# ----------------------------------------------------------------------------------------------- loading
FORMAT_HINT = ('a head-score file is a JSON object {"<layer>-<head>": [score, ...], ...} '
               "such as a sweep's head_scores.json")


def read_json(path: str | os.PathLike, what: str):
    """The JSON object in `path`; a missing, directory or non-JSON path raises UserError naming `what`."""
    try:
        return io.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found: check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory: give the JSON file in it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); {FORMAT_HINT}") from None


def load_head_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read one `{"L-H": [scores]}` file and check its keys and that its lists have one common length.
    LOCOS's released files (its envelope) and QRHead's head sets (.yaml) are read too
    (rhead_jax.rankings.unwrap_released / read_qrhead_head_set)."""
    from rhead_jax import rankings as rk

    if Path(path).suffix in rk.QRHEAD_SUFFIXES:
        return rk.read_qrhead_head_set(path)
    data = rk.unwrap_released(read_json(path, "head-score file"))
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object; {FORMAT_HINT}")
    for key, v in data.items():
        try:
            parse_head(key)
        except ValueError:
            raise UserError(f"{path}: head key {key!r} is not '<layer>-<head>' (0-based integers, e.g. '12-3'); "
                            f"{FORMAT_HINT}") from None
        if not isinstance(v, list):
            raise UserError(f"{path}: head {key!r} has {type(v).__name__} {v!r:.40}, not a list of scores; "
                            f"{FORMAT_HINT}")
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise UserError(f"{path}: heads have lists of different lengths {sorted(lengths)}; every head needs "
                        "one score per test")
    return data


def shape_of(head_scores: dict[str, list[float]]) -> tuple[int, int]:
    """(layers, heads) = 1 + the largest layer and head index among the keys."""
    idx = np.array([parse_head(k) for k in head_scores])
    return int(idx[:, 0].max()) + 1, int(idx[:, 1].max()) + 1


def mean_matrix(head_scores: dict[str, list[float]]) -> np.ndarray:
    """[L, H] float array of mean scores (NaN where a key is missing)."""
    L, H = shape_of(head_scores)
    out = np.full((L, H), np.nan)
    for key, m in head_means(head_scores).items():
        out[parse_head(key)] = m
    return out


# ---------------------------------------------------------------------------------------------- per file
def bucket_of(mean: float) -> str:
    """Fig. 3 bucket of one mean score. Scores are non-negative; a mean <= 0 counts as '=0'."""
    if mean <= BUCKET_EDGES[0]:
        return BUCKETS[0]
    if mean <= BUCKET_EDGES[1]:
        return BUCKETS[1]
    if mean <= BUCKET_EDGES[2]:
        return BUCKETS[2]
    return BUCKETS[3]


def bucket_counts(means: Iterable[float]) -> dict[str, int]:
    counts = {b: 0 for b in BUCKETS}
    for m in means:
        counts[bucket_of(m)] += 1
    return counts


def bucket_shares(means: Iterable[float]) -> dict[str, float]:
    """Percentages 0-100 of heads per bucket (they sum to 100)."""
    counts = bucket_counts(means)
    total = sum(counts.values())
    return {b: (100.0 * c / total if total else 0.0) for b, c in counts.items()}


def file_summary(head_scores: dict[str, list[float]], top_k: int = 20) -> dict:
    """The summary.json entry of one file."""
    means = head_means(head_scores)
    L, H = shape_of(head_scores)
    return {
        "buckets": bucket_shares(means.values()),
        "layers": L,
        "heads": H,
        "tests": len(next(iter(head_scores.values()))),
        "retrieval_heads": len(retrieval_heads(head_scores)),
        "top": [[k, float(v)] for k, v in top_heads(head_scores, top_k)],
    }

