"""The retrieval score (ORIGINAL.md §4-5), pure and vectorized with `vmap`.

A copy event for head (l, h) at decode step n: the head's most-attended cache slot j lies in the
answer span [start, end) AND prompt_ids[j] equals the token generated at step n. Each event adds
1 / (end - start); the test's score is the sum over steps (it can exceed 1). A head's retrieval
score is the mean over the tests kept by the ROUGE gate; > 0.1 marks a retrieval head.

`copy_counts` is written for ONE head and ONE test (a scan-free reduction over steps) and lifted
with `jax.vmap` over heads, layers and tests: no Python loop over heads or steps anywhere.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

RETRIEVAL_THRESHOLD = 0.1
# Paper Fig. 3 buckets of a head's mean score (labels are the keys analysis writes to summary.json)
BUCKETS = ("=0", "(0,0.1]", "(0.1,0.5]", ">0.5")
BUCKET_EDGES = (0.0, RETRIEVAL_THRESHOLD, 0.5)
_HEAD_KEY = re.compile(r"^(\d+)-(\d+)$")


def parse_head(key: str) -> tuple[int, int]:
    """A head-score file's key '12-3' -> (layer 12, query head 3); ValueError on anything else."""
    m = _HEAD_KEY.match(str(key).strip())
    if not m:
        raise ValueError(f"malformed head {key!r}: expected LAYER-HEAD with 0-based integers, e.g. 16-19")
    return int(m.group(1)), int(m.group(2))


def head_key(head: tuple[int, int]) -> str:
    return f"{head[0]}-{head[1]}"


def _copy_hits_one_head(top_slot, generated, prompt_ids, start, end):
    """top_slot [N] (this head's top-1 slot per step, -1 = no step), generated [N] (-1 = none),
    prompt_ids [P], span [start, end) -> [N] bool: the steps that are copy events."""
    in_span = (top_slot >= start) & (top_slot < end)
    token_there = prompt_ids[jnp.clip(top_slot, 0, prompt_ids.shape[0] - 1)]
    return in_span & (token_there == generated) & (generated >= 0)


def _copy_count_one_head(top_slot, generated, prompt_ids, start, end):
    """The number of copy events (int32) of `_copy_hits_one_head`."""
    return _copy_hits_one_head(top_slot, generated, prompt_ids, start, end).sum(dtype=jnp.int32)


def _lift(one_head, step_axis: bool):
    """one_head over heads, then layers (top_slot [N, L, H]), then tests ([B, N, L, H]); the output
    keeps the step axis first when `step_axis` ([B, N, L, H]), else [B, L, H]."""
    out = 1 if step_axis else 0
    per_layer = jax.vmap(one_head, in_axes=(1, None, None, None, None), out_axes=out)
    per_test = jax.vmap(per_layer, in_axes=(1, None, None, None, None), out_axes=out)
    return jax.vmap(per_test, in_axes=(0, 0, 0, 0, 0))


_batched = _lift(_copy_count_one_head, step_axis=False)
_batched_hits = _lift(_copy_hits_one_head, step_axis=True)


@jax.jit
def copy_counts(topk_index, generated, prompt_ids, span_start, span_end):
    """Copy events per test and head.

    Args:
      topk_index: [B, N, L, H, k] captured slots (rhead_jax.models.generate.Generation); only
        the top-1 (k = 0) is used, as in the original.
      generated: [B, N] generated tokens, -1 after a row stopped.
      prompt_ids: [B, P] prompt tokens (cache slot j < prompt length holds prompt_ids[j]).
      span_start, span_end: [B] the answer span.
    Returns:
      [B, L, H] int32 counts; the score is counts / (span_end - span_start).
    """
    top1 = topk_index[..., 0]
    return _batched(top1, generated, prompt_ids, span_start, span_end)


@jax.jit
def copy_events(topk_index, generated, prompt_ids, span_start, span_end):
    """[B, N, L, H] bool: the decode steps at which each head copies (the events `copy_counts`
    counts; same arguments). rhead_jax.explore shows them step by step."""
    return _batched_hits(topk_index[..., 0], generated, prompt_ids, span_start, span_end)


def retrieval_scores(topk_index, generated, prompt_ids, span_start, span_end):
    """[B, L, H] float32 per-test scores (counts / span length)."""
    counts = copy_counts(topk_index, generated, prompt_ids, span_start, span_end)
    n = (jnp.asarray(span_end) - jnp.asarray(span_start)).astype(jnp.float32)
    return counts / n[:, None, None]


@functools.lru_cache(maxsize=None)
def _sequential_sums(span_len: int, max_count: int = 1024) -> np.ndarray:
    """table[c] = 1/n added c times in float64, left to right: the original's `+=` arithmetic."""
    return np.concatenate([[0.0], np.cumsum(np.full(max_count, 1.0 / span_len))])


def original_float(count: int, span_len: int) -> float | int:
    """The value the original code holds after `count` copy events: int 0 or a float64 sum."""
    return 0 if count == 0 else float(_sequential_sums(span_len)[count])


def head_means(head_scores: dict[str, list[float]]) -> dict[str, float]:
    """Mean score per head of a `{"L-H": [score, ...]}` file (0 for an empty list)."""
    return {k: (float(np.mean(v)) if len(v) else 0.0) for k, v in head_scores.items()}


def top_heads(head_scores: dict[str, list[float]], k: int = 20) -> list[tuple[str, float]]:
    """The k heads with the largest mean score, best first (ties: layer, then head order)."""
    means = head_means(head_scores)
    order = sorted(means, key=lambda key: (-means[key], *map(int, key.split("-"))))
    return [(key, means[key]) for key in order[:k]]


def retrieval_heads(head_scores: dict[str, list[float]], threshold: float = RETRIEVAL_THRESHOLD) -> list[str]:
    return [key for key, m in head_means(head_scores).items() if m > threshold]
