"""The paper's failure taxonomy for one needle-in-a-haystack answer (Wu et al. 2024, §4.1).

Words are ROUGE's (rouge_score's tokenizer: lowercase, non-alphanumerics to spaces; its Porter
stemming of words longer than 3 characters); "content words" exclude `STOPWORDS`. In order:
  correct           ROUGE-1 recall of the answer == 1 (full retrieval)
  empty             the response has no words at all
  incomplete        part of the needle's answer, not all of it (recall < 1): at least half of the
                    answer's distinct content words are in the response, OR the response contains a
                    verbatim fragment of the answer of `FRAGMENT` (3) consecutive words with at least
                    one content word ("eat a sandwich", "a sunny day")
  wrong_extraction  a run of `extraction_ngram` (default 5) consecutive response words occurs
                    verbatim in the haystack (the context with the needle removed): the model
                    copied the wrong part of the context
  hallucination     anything else: neither a real part of the answer nor a copied haystack passage
                    (a lone answer word such as "eat" in "eat your meals" does not count)
Single words shared with the haystack are NOT taken as extraction: the haystack is ordinary prose,
so common words overlap by chance. Each instance also records `content_recall`, the copied
passage (`haystack_copy`) and how many response words lie in copied n-grams (`copied_words`).
"""
from __future__ import annotations

from typing import Sequence

from rouge_score import tokenize, tokenizers

from rhead_jax.needle.rouge import rouge1_recall

CATEGORIES = ("correct", "incomplete", "wrong_extraction", "hallucination", "empty")
FAILURES = CATEGORIES[1:]
# words that carry no content for "incomplete" (ROUGE counts them; the taxonomy does not)
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as into onto over under
about up out off than then so too very is are was were be been being am it its this that these those
there here their they them he she his her him we our us you your i my me do does did doing done have
has had what which who whom whose when where why how not no nor can could will would shall should may
might must just also only all any some each every both such own same other more most""".split())
# Fig. 1's colormap (the needle-in-a-haystack test's red -> yellow -> green)
FIG1_COLORS = ("#F0496E", "#EBB839", "#0CD79F")
FRAGMENT = 3  # taxonomy: words in a verbatim answer fragment that makes an answer "incomplete"


def words(text: str) -> list[str]:
    """ROUGE's tokens without stemming: lowercase, non-alphanumerics to spaces."""
    return tokenize.tokenize(text, None)


def stems(text: str) -> list[str]:
    """ROUGE's tokens with its own Porter stemming (words longer than 3 characters)."""
    return tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


def content_stems(text: str) -> set[str]:
    return set(stems(" ".join(w for w in words(text) if w not in STOPWORDS)))


def haystack_ngrams(segments: Sequence[str], n: int) -> frozenset:
    """Every n-gram of stemmed words within each segment (no n-gram spans two segments)."""
    out = set()
    for seg in segments:
        s = stems(seg)
        out.update(tuple(s[i:i + n]) for i in range(len(s) - n + 1))
    return frozenset(out)


def classify_response(response: str, answer: str, *, haystack: Sequence[str] | frozenset = (),
                      recall: float | None = None, ngram: int = 5) -> dict:
    """The paper's failure taxonomy for one answer (module docstring for the rules).

    haystack: the context with the needle removed, as text segments (or their `haystack_ngrams`).
    Returns {"category", "content_recall", "answer_fragment" (bool), "haystack_copy" (str or None),
    "copied_words"}.
    """
    if recall is None:
        recall = rouge1_recall(answer, response)
    resp = stems(response)
    target = content_stems(answer) or set(stems(answer))
    content_recall = len(target & set(resp)) / len(target) if target else 0.0
    ans = stems(answer)
    frags = {tuple(ans[i:i + FRAGMENT]) for i in range(len(ans) - FRAGMENT + 1)
             if set(ans[i:i + FRAGMENT]) & target}
    fragment = any(tuple(resp[i:i + FRAGMENT]) in frags for i in range(len(resp) - FRAGMENT + 1))
    grams = haystack if isinstance(haystack, frozenset) else haystack_ngrams(list(haystack), ngram)
    hits = [i for i in range(len(resp) - ngram + 1) if tuple(resp[i:i + ngram]) in grams]
    covered = {j for i in hits for j in range(i, i + ngram)}
    copy = None
    if hits:
        raw = words(response)
        copy = " ".join(raw[hits[0]:hits[0] + ngram])
    if recall >= 1.0:
        cat = "correct"
    elif not resp:
        cat = "empty"
    elif content_recall >= 0.5 or fragment:
        cat = "incomplete"
    elif hits:
        cat = "wrong_extraction"
    else:
        cat = "hallucination"
    return {"category": cat, "content_recall": content_recall, "answer_fragment": fragment, "haystack_copy": copy,
            "copied_words": len(covered)}
