"""rhead_jax.needle.rouge scores with rouge_score without importing nltk whole (only its Porter
stemmer): the same recalls as rouge_score with nltk imported as usual."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PAIRS = [
    ("eat a sandwich and sit in Dolores Park on a sunny day.", "Eating sandwiches, sitting in the park: sunny days!"),
    ("The running dogs were happily jumping", "dogs runs and jumped happy"),
    ("Generalization, conditional probabilities and hopefulness", "generalize conditionally; probability hopeful"),
    ("rent a bike", "Rented bikes are cheaper than renting cars"),
    ("", "anything"),
]


def _run(code: str):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rouge_recalls_equal_rouge_scores_with_nltk_imported_whole():
    ours = _run(f"""
        import json, sys
        from rhead_jax.needle.rouge import rouge1_recall
        r = [rouge1_recall(a, b) for a, b in {PAIRS!r}]
        print(json.dumps([r, "nltk" in sys.modules, "nltk.stem.porter" in sys.modules]))
    """)
    reference = _run(f"""
        import json, nltk
        from rouge_score import rouge_scorer
        s = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        print(json.dumps([s.score(a, b)["rouge1"].recall for a, b in {PAIRS!r}]))
    """)
    recalls, nltk_whole, porter = ours
    assert recalls == reference and any(0 < r < 1 for r in recalls)
    assert porter and not nltk_whole     # the stemmer came from nltk, its package's imports did not


def test_nltk_imports_whole_afterwards():
    ok = _run("""
        import json
        from rhead_jax.needle.rouge import rouge1_recall
        rouge1_recall("a b", "a")
        import nltk
        print(json.dumps(callable(nltk.sent_tokenize) and nltk.stem.PorterStemmer is not None))
    """)
    assert ok is True
