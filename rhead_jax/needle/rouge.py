"""ROUGE-1 recall keep test (ORIGINAL.md section 5).

The original scores ``rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)
.score(real_needle, response)['rouge1'].recall`` and keeps a test when that recall x 100 > 50.
We call the same package (lowercasing, non-alphanumerics to spaces, Porter stemming).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from functools import lru_cache

KEEP_THRESHOLD = 50.0
"""A test is kept when ROUGE-1 recall x 100 is strictly greater than this."""


def _rouge_scorer_module():
    """`rouge_score.rouge_scorer`, importing of nltk only the Porter stemmer it stems with.

    rouge_score runs `import nltk` (for rougeLsum's sentence splitter, unused here) and
    `from nltk.stem import porter`; nltk's package imports (its corpora readers and every
    stemmer) add ~76 MiB of resident memory and ~1 s to a sweep's first scored batch
    (docs/performance.md, "Peak RSS"). Here `nltk` and `nltk.stem` are bare packages while
    rouge_score is imported, so only `nltk.stem.porter` and its own imports load: the same stemmer
    code. The bare packages leave sys.modules afterwards (a later `import nltk` imports nltk whole);
    where nltk is already imported, or is not a plain package, it is imported as usual."""
    if "rouge_score.rouge_scorer" not in sys.modules and "nltk" not in sys.modules:
        spec = importlib.util.find_spec("nltk")
        paths = list(spec.submodule_search_locations or ()) if spec is not None else []
        if paths:
            bare = {"nltk": paths, "nltk.stem": [os.path.join(p, "stem") for p in paths]}
            for name, path in bare.items():
                sys.modules[name] = types.ModuleType(name)
                sys.modules[name].__path__ = path
            try:
                from rouge_score import rouge_scorer
            finally:
                for name in bare:
                    sys.modules.pop(name, None)
            return rouge_scorer
    from rouge_score import rouge_scorer

    return rouge_scorer


@lru_cache(maxsize=1)
def _scorer():
    return _rouge_scorer_module().RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall (0-1) of ``reference`` (the answer span) against ``prediction`` (the response)."""
    return float(_scorer().score(reference, prediction)["rouge1"].recall)


def keep_test(recall: float) -> bool:
    """The original's keep rule: ``recall * 100 > 50``."""
    return recall * 100 > KEEP_THRESHOLD
