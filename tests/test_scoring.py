"""The vmapped score equals a literal transcription of the original's per-head loop."""
from __future__ import annotations

import numpy as np

from rhead_jax import scoring


def _original_loop(top1, generated, prompt_ids, start, end):
    """ORIGINAL.md §4 as the original writes it: Python loops over steps, layers and heads."""
    N, L, H = top1.shape
    score = [[0 for _ in range(H)] for _ in range(L)]
    for step in range(N):
        if generated[step] < 0:
            break
        for layer in range(L):
            for head in range(H):
                i = top1[step, layer, head]
                if start <= i < end and generated[step] == prompt_ids[i]:
                    score[layer][head] += 1 / (end - start)
    return score


def test_matches_original_loop_on_random_cases():
    rng = np.random.RandomState(0)
    B, N, L, H, P, V = 5, 9, 3, 4, 40, 6  # tiny vocab: many accidental token matches
    prompt = rng.randint(0, V, (B, P))
    top = rng.randint(0, P + 5, (B, N, L, H, 1))  # some slots beyond the prompt (generated tokens)
    gen = rng.randint(0, V, (B, N))
    gen[1, 4:] = -1  # a row that stopped early
    top[1, 4:] = -1
    start = rng.randint(0, 20, B)
    end = start + rng.randint(1, 10, B)
    counts = np.asarray(scoring.copy_counts(top, gen, prompt, start, end))
    scores = np.asarray(scoring.retrieval_scores(top, gen, prompt, start, end))
    for b in range(B):
        ref = _original_loop(top[b, ..., 0], gen[b], prompt[b], start[b], end[b])
        np.testing.assert_allclose(scores[b], np.array(ref), rtol=1e-6)
        ours = [[scoring.original_float(int(c), int(end[b] - start[b])) for c in row] for row in counts[b]]
        assert ours == ref  # bit-for-bit the original's float64 sums, ints 0 where nothing happened
    assert counts.sum() > 0


def test_only_top1_counts_and_copy_can_exceed_one():
    prompt = np.array([[7, 8, 9, 7, 8]])
    span = (np.array([0]), np.array([2]))  # tokens 7, 8
    top = np.zeros((1, 4, 1, 2, 2), np.int32)
    top[0, :, 0, 0, 0] = [0, 1, 0, 1]      # head 0 copies every step
    top[0, :, 0, 1, 0] = 4                 # head 1's top-1 outside the span ...
    top[0, :, 0, 1, 1] = [0, 1, 0, 1]      # ... its 2nd choice would copy, but only top-1 counts
    gen = np.array([[7, 8, 7, 8]])
    s = np.asarray(scoring.retrieval_scores(top, gen, prompt, *span))
    assert s[0, 0, 0] == 2.0 and s[0, 0, 1] == 0.0


def test_summaries():
    hs = {"0-0": [0, 0.5], "0-1": [0.05, 0.05], "1-0": [1.0, 1.0], "1-1": []}
    assert scoring.retrieval_heads(hs) == ["0-0", "1-0"]
    assert [k for k, _ in scoring.top_heads(hs, 2)] == ["1-0", "0-0"]
