"""How sure is each head's score, and how many tests settle the ranking (issue 27, ask 2).

Input: a head-score file's scores as a matrix S [T tests, N heads] (`score_matrix`; the kept tests
of a sweep, or a published file). A head's score is its mean over the tests. Everything here
resamples TESTS (a test's scores for all heads move together), seeded, vectorized with numpy:

  bootstrap_means   [R, N] head means of R resamples of the T tests drawn with replacement: a
                    resample is a count vector W [T] (multinomial, T draws), its means W @ S / T,
                    so memory is O(R T + R N), never R x T x N.
  intervals         per head, the 95% percentile interval of those means (scipy.stats.bootstrap's
                    method="percentile" on the same resampling; the tests check they agree).
  straddle          heads whose interval contains the retrieval threshold (0.1): their call as a
                    retrieval head is uncertain; the retrieval-head count is then a range, from
                    the heads whose whole interval is above 0.1 to those whose upper end is.
  top_k_frequency   per head, the share of resamples in which it is in the top k (k = 10, and
                    k = the number of heads over the threshold).
  convergence       the mean overlap of the top k of n tests drawn at random WITHOUT replacement
                    with the top k of all T tests, for n = 5, 10, 20, 50, 100, 200, 500, ... and T.
  tests_for         the fewest tests n (on a grid of step 5) whose mean top-k overlap reaches a target
                    (e.g. 9 of the top 10; "tests_for_overlap"), or reaches it in 90% of the draws
                    ("tests_for_overlap_90").

`stability(head_scores)` returns stability.json's entry of one file; `stop_check` is the rule of a
sweep that stops when the ranking is settled (rhead_jax.rounds). Ties at the k-th score (e.g. many
heads at 0) are broken by head order (the file's key order), the same in every resample.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rhead_jax.scoring import RETRIEVAL_THRESHOLD, parse_head

RESAMPLES = 1000
SEED = 0
DRAWS = 200                     # random subsets per n of the convergence curve
CONFIDENCE = 0.95
CURVE_POINTS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def score_matrix(head_scores: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
    """(head keys in layer-head order, S [T, N] float64) of a `{"L-H": [scores]}` file."""
    keys = sorted(head_scores, key=parse_head)
    S = np.array([head_scores[k] for k in keys], np.float64).T.reshape(-1, len(keys))
    return keys, S


def resample_counts(T: int, R: int, rng: np.random.Generator) -> np.ndarray:
    """[R, T] int: how often each test is drawn in each of R resamples of T draws with replacement."""
    idx = rng.integers(0, T, size=(R, T))
    return np.bincount((np.arange(R)[:, None] * T + idx).ravel(), minlength=R * T).reshape(R, T)


def bootstrap_means(S: np.ndarray, R: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[R, N] mean of each head over R bootstrap resamples of the T rows of S [T, N]."""
    T = S.shape[0]
    W = resample_counts(T, R, np.random.default_rng(seed))
    return (W @ S) / T


def intervals(boot: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """[N, 2] percentile interval of each head's bootstrap means [R, N]."""
    a = (1 - confidence) / 2
    return np.quantile(boot, [a, 1 - a], axis=0).T


def top_k_sets(means: np.ndarray, k: int) -> np.ndarray:
    """[..., N] bool: the k largest of each row of means [..., N] (ties: the lower head index)."""
    N = means.shape[-1]
    order = np.argsort(-means, axis=-1, kind="stable")[..., :k]
    out = np.zeros(means.shape, bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out if k <= N else np.ones(means.shape, bool)


def top_k_frequency(boot: np.ndarray, k: int) -> np.ndarray:
    """[N] share of the resamples [R, N] in which each head is in the top k."""
    return top_k_sets(boot, k).mean(axis=0)


def curve_points(T: int, points: Sequence[int] = CURVE_POINTS) -> list[int]:
    return sorted({n for n in points if n < T} | {T})


def subset_overlap(S: np.ndarray, n: int, k: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """[draws] |top-k of n random tests (without replacement) ∩ top-k of all tests| of S [T, N]."""
    T = S.shape[0]
    full = top_k_sets(S.mean(0), k)
    rng = np.random.default_rng([seed, n])
    pick = np.argsort(rng.random((draws, T)), axis=1)[:, :n]
    W = np.zeros((draws, T))
    np.put_along_axis(W, pick, 1.0, axis=1)
    return (top_k_sets(W @ S / n, k) & full).sum(1)


def convergence(S: np.ndarray, k: int, points: Sequence[int] = CURVE_POINTS, draws: int = DRAWS,
                seed: int = SEED) -> dict[str, float]:
    """{"n": mean top-k overlap of n random tests with all tests} for n in `curve_points`."""
    return {str(n): float(subset_overlap(S, n, k, draws, seed).mean()) for n in curve_points(S.shape[0], points)}


def tests_for(S: np.ndarray, k: int, target: float, step: int = 5, draws: int = DRAWS, seed: int = SEED,
              share: float | None = None) -> int | None:
    """The fewest tests n (a multiple of `step`, or T) whose mean top-k overlap with all T tests is
    >= target (with `share`: whose overlap is >= target in at least that share of the draws)."""
    T = S.shape[0]
    for n in [*range(step, T, step), T]:
        ov = subset_overlap(S, n, k, draws, seed)
        if (ov.mean() >= target) if share is None else ((ov >= target).mean() >= share):
            return n
    return None


def stability(head_scores: dict[str, list[float]], *, k: int = 10, resamples: int = RESAMPLES, seed: int = SEED,
              threshold: float = RETRIEVAL_THRESHOLD, draws: int = DRAWS, curve: bool = True) -> dict:
    """stability.json's entry of one head-score file (module docstring). Needs at least one test.
    curve=False leaves out the convergence curve and tests_for (a sweep's summary needs neither)."""
    keys, S = score_matrix(head_scores)
    T, N = S.shape
    if T == 0:
        raise ValueError("no tests: a head-score file with empty lists has no score to bootstrap")
    k = min(k, N)
    means = S.mean(0)
    boot = bootstrap_means(S, resamples, seed)
    ci = intervals(boot)
    order = np.argsort(-means, kind="stable")
    lo_above, hi_above = int((ci[:, 0] > threshold).sum()), int((ci[:, 1] > threshold).sum())
    straddle = [keys[i] for i in order if ci[i, 0] <= threshold <= ci[i, 1]]
    n_ret = int((means > threshold).sum())
    freq = top_k_frequency(boot, k)
    by_freq = sorted(range(N), key=lambda i: (-freq[i], -means[i], i))
    out = {
        "tests": int(T), "heads": int(N), "k": int(k), "resamples": int(resamples), "seed": int(seed),
        "confidence": CONFIDENCE, "threshold": threshold, "method": "percentile bootstrap over tests",
        "top_k": [keys[i] for i in order[:k]],
        "straddle": straddle,
        "retrieval_heads": n_ret,
        "retrieval_heads_range": [lo_above, hi_above],
        "ci": {keys[i]: [float(ci[i, 0]), float(ci[i, 1])] for i in order},
        "mean": {keys[i]: float(means[i]) for i in order},
        "top_k_frequency": {keys[i]: float(freq[i]) for i in by_freq},
    }
    if curve:
        out["convergence"] = convergence(S, k, draws=draws, seed=seed)
        out["tests_for_overlap"] = {str(t): tests_for(S, k, t, draws=draws, seed=seed) for t in (k - 1, k) if t > 0}
        out["tests_for_overlap_90"] = {str(t): tests_for(S, k, t, draws=draws, seed=seed, share=0.9)
                                       for t in (k - 1,) if t > 0}
    if n_ret:
        f2 = top_k_frequency(boot, n_ret)
        out["top_k_frequency_threshold"] = {"k": n_ret, "frequency": {keys[i]: float(f2[i]) for i in order[:n_ret]}}
    return out


def head_intervals(head_scores: dict[str, list[float]], heads: Sequence[str], *, resamples: int = RESAMPLES,
                   seed: int = SEED) -> dict[str, list[float]]:
    """{head: [lo, hi]} 95% bootstrap intervals of the given heads' means (the sweep's summary line)."""
    keys, S = score_matrix({h: head_scores[h] for h in heads})
    if S.shape[0] == 0:
        return {}
    ci = intervals(bootstrap_means(S, resamples, seed))
    return {h: [float(ci[i, 0]), float(ci[i, 1])] for i, h in enumerate(keys)}


# ------------------------------------------------------------------------------------ the stop rule
# A sweep with config.sweep.stop_when_stable stops after the first round r at which, for r and the
# round before it (STOP_ROUNDS = 2 rounds running), with at least STOP_MIN_TESTS kept tests:
#   - the bootstrap's expected top-k overlap (the mean over resamples of |top-k of the resample ∩ the
#     current top-k|, = the sum of the current top-k heads' top-k frequencies) is >= k - STOP_SLACK, and
#   - the top k changed by at most STOP_SLACK heads since the round before.
# "Every top-k head in the top k of >= 95% of resamples" is too strict: on Yi-6B-200K and
# llama-2-13b-64k the 10th and 11th heads are so close that it needs nearly the whole file, or never
# holds (benchmarks/stop_replay.py; docs/trust.md).
STOP_ROUNDS = 2
STOP_MIN_TESTS = 10
STOP_SLACK = 1


def stop_check(S: np.ndarray, k: int = 10, *, resamples: int = RESAMPLES, seed: int = SEED,
               slack: int = STOP_SLACK, min_tests: int = STOP_MIN_TESTS) -> dict:
    """One round's check on the kept tests so far, S [T, N]: {"tests", "top_k" (head indices),
    "expected_overlap", "min_frequency", "settled"} (settled: T >= min_tests and expected overlap
    >= k - slack)."""
    T, N = S.shape
    k = min(k, N)
    if T == 0:
        return {"tests": 0, "top_k": [], "expected_overlap": 0.0, "min_frequency": 0.0, "settled": False}
    top = top_k_sets(S.mean(0), k)
    f = top_k_frequency(bootstrap_means(S, resamples, seed), k)
    ov = float(f[top].sum())
    return {"tests": int(T), "top_k": np.nonzero(top)[0].tolist(), "expected_overlap": ov,
            "min_frequency": float(f[top].min()), "settled": bool(T >= min_tests and ov >= k - slack - 1e-9)}


def should_stop(checks: Sequence[dict], *, rounds: int = STOP_ROUNDS, slack: int = STOP_SLACK) -> bool:
    """The stop rule over the checks of the rounds so far (oldest first): the last `rounds` are
    settled and the top k moved by at most `slack` heads between each two of them."""
    if len(checks) < rounds:
        return False
    last = checks[-rounds:]
    if not all(c["settled"] for c in last):
        return False
    return all(len(set(a["top_k"]) - set(b["top_k"])) <= slack for a, b in zip(last, last[1:]))


def replay(S: np.ndarray, round_size: int, k: int = 10, *, seed: int = SEED, resamples: int = RESAMPLES) -> dict:
    """The stop rule replayed on a finished file S [T, N]: its tests in a random order (seeded), in
    rounds of `round_size`; {"seed", "stopped_at" (tests), "of", "overlap" (top-k at the stop vs all
    tests), "stopped" (False: the rule never fired before the end)}."""
    T = S.shape[0]
    order = np.random.default_rng([seed, 1]).permutation(T)
    checks = []
    full = set(np.nonzero(top_k_sets(S.mean(0), k))[0].tolist())
    for end in range(round_size, T + round_size, round_size):
        n = min(end, T)
        checks.append(stop_check(S[order[:n]], k, resamples=resamples, seed=seed))
        if should_stop(checks) or n == T:
            return {"seed": seed, "stopped_at": n, "of": T, "stopped": n < T or should_stop(checks),
                    "overlap": len(full & set(checks[-1]["top_k"]))}
    raise AssertionError("unreachable")
