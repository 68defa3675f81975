"""The non-literal needle set (rhead_jax/needle/data/nonliteral_*.jsonl, PROVENANCE.md)."""
from __future__ import annotations

import json
import re

from rhead_jax.needle.haystack import DEFAULT_NEEDLES_PATH, load_needles

DATA = DEFAULT_NEEDLES_PATH.parent
STOP = {"a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "from", "his", "her", "their", "which",
        "has", "have", "been", "is", "was", "one", "up", "and", "its", "two", "last", "every", "over", "past",
        "once", "right", "next", "actually", "whole", "inside", "top", "can", "see", "under", "beneath", "along"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP}


def test_needles_share_no_content_word_and_mark_the_answer():
    needles = load_needles(DATA / "nonliteral_needles.jsonl")
    raw = [json.loads(l) for l in (DATA / "nonliteral_needles.jsonl").read_text().splitlines()]
    assert 10 <= len(needles) <= 20
    for n, r in zip(needles, raw):
        assert n.real_needle in n.needle and r["cue"] in n.needle          # the marked span, the landmark
        assert r["latent"] in n.question and r["latent"] not in n.needle   # the hop's end is not in the needle
        assert not (_words(n.needle) & _words(n.question)), (n.needle, n.question)
    assert len({n.real_needle for n in needles}) == len(needles)


def test_open_and_closed_book_controls_pair_with_the_needles():
    needles = load_needles(DATA / "nonliteral_needles.jsonl")
    for name, context in (("open", lambda n: n.needle), ("closed", None)):
        rows = [json.loads(l) for l in (DATA / f"nonliteral_{name}_book.jsonl").read_text().splitlines()]
        assert [(r["question"], r["answer"]) for r in rows] == [(n.question, n.real_needle) for n in needles]
        for r, n in zip(rows, needles):
            if context:
                assert r["context"] == context(n)
            else:
                assert n.real_needle not in r["context"] and not (_words(r["context"]) & _words(n.needle))
