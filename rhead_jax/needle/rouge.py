"""ROUGE-1 recall keep test (ORIGINAL.md section 5).

The original scores ``rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)
.score(real_needle, response)['rouge1'].recall`` and keeps a test when that recall x 100 > 50.
We call the same package (lowercasing, non-alphanumerics to spaces, Porter stemming).
"""
from __future__ import annotations

from functools import lru_cache

KEEP_THRESHOLD = 50.0
"""A test is kept when ROUGE-1 recall x 100 is strictly greater than this."""


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall (0-1) of ``reference`` (the answer span) against ``prediction`` (the response)."""
    return float(_scorer().score(reference, prediction)["rouge1"].recall)


def keep_test(recall: float) -> bool:
    """The original's keep rule: ``recall * 100 > 50``."""
    return recall * 100 > KEEP_THRESHOLD
