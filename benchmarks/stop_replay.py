"""Replay the stop rule of `--config.sweep.stop_when_stable` (rhead_jax.stability.should_stop) on finished
head-score files: each file's tests in a random order (one per seed), in rounds of --round tests; at how
many tests the rule stops, and how many of the full file's top 10 its top 10 holds. Also the stricter
rule "every top-10 head in the top 10 of >= 95% of resamples, two rounds running", for comparison.

    python -m benchmarks.stop_replay [FILE ...] [--round 20] [--seeds 10]
    (default FILEs: the published paper files in shared/reference/head_scores/)

Prints a markdown table (docs/trust.md). No model, no timing: numpy only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from rhead_jax import stability as st

PAPER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "head_scores", "*.json")


def strict_replay(S: np.ndarray, round_size: int, k: int, seed: int, resamples: int) -> int:
    """Tests at which "every top-k head in >= 95% of resamples, two rounds running" first holds (T if never)."""
    T = S.shape[0]
    order = np.random.default_rng([seed, 1]).permutation(T)
    ok = []
    for end in range(round_size, T + round_size, round_size):
        n = min(end, T)
        c = st.stop_check(S[order[:n]], k, resamples=resamples, seed=seed)
        ok.append(c["tests"] >= st.STOP_MIN_TESTS and c["min_frequency"] >= 0.95)
        if len(ok) >= 2 and ok[-1] and ok[-2] and n < T:
            return n
    return T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--round", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args()
    files = a.files or sorted(glob.glob(os.path.normpath(PAPER)))
    print(f"| file | tests | stops at (mean, min-max over {a.seeds} seeds) | top-{a.k} overlap with all tests "
          f"(min, mean) | strict 95% rule stops at (mean; = tests: never) |")
    print("|---|---:|---|---|---|")
    for f in files:
        with open(f) as fh:
            _, S = st.score_matrix(json.load(fh))
        runs = [st.replay(S, a.round, a.k, seed=s, resamples=a.resamples) for s in range(a.seeds)]
        strict = [strict_replay(S, a.round, a.k, s, a.resamples) for s in range(a.seeds)]
        at = [r["stopped_at"] for r in runs]
        ov = [r["overlap"] for r in runs]
        print(f"| {os.path.basename(f)} | {S.shape[0]} | {np.mean(at):.0f} ({min(at)}-{max(at)}) | "
              f"{min(ov)}, {np.mean(ov):.1f} | {np.mean(strict):.0f} ({min(strict)}-{max(strict)}) |", flush=True)


if __name__ == "__main__":
    main()
