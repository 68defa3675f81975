"""Tests of rhead_jax.needle's data (haystack.py), grid (grid.py), ROUGE (rouge.py) and package names.

Tokenizer-derived data: test_needle_tokens.py; answer spans: test_needle_span.py; chat prompts:
test_needle_chat.py; building one instance: test_needle_prompts.py. No real model or download: the
tokenizer is tests/helpers/needle_tokenizer.py's small byte-level BPE trained on the bundled haystack.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import rhead_jax.needle as needle_pkg
from rhead_jax.errors import MissingFileError, UserError
from rhead_jax.needle import (
    Instance,
    Needle,
    build_grid,
    grid_keys,
    instance_key,
    iter_grid,
    keep_test,
    load_haystack,
    load_needles,
    paper_depths,
    paper_lengths,
    rouge1_recall,
    san_francisco_needle,
)
from rhead_jax.needle.haystack import DEFAULT_NEEDLES_PATH, SAN_FRANCISCO_NEEDLES_PATH
from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401 - fixtures
from tests.helpers.needle_tokenizer import reference_needles


def test_public_names_importable():
    # every name callers import from rhead_jax.needle (and the former homes in needle.prompts)
    for name in needle_pkg.__all__:
        assert getattr(needle_pkg, name) is not None, name
    from rhead_jax.needle.prompts import (  # noqa: F401
        SPAN_OVERLAP,
        Instance,
        NeedleNotFoundError,
        TokenizedHaystack,
        answer_token_ids,
        build_instance,
        check_length,
        find_answer_span,
        instance_key,
        period_token_ids,
        tokenized_haystack,
    )
    assert NeedleNotFoundError is needle_pkg.NeedleNotFoundError


# ----------------------------------------------------------------------------- data and loaders

def test_bundled_haystack_is_clean_essay(haystack):
    assert haystack.startswith("AREOPAGITICA\n\n")
    assert haystack.endswith("but greatest and wisest men.\n")
    assert "\r" not in haystack
    low = haystack.lower()
    for marker in ("project gutenberg", "*** start", "*** end", "ebook"):
        assert marker not in low
    assert haystack.count("\n\n") > 100  # paragraph breaks kept
    assert "  " not in haystack  # whitespace collapsed
    assert 17000 < len(haystack.split()) < 19000


def test_load_haystack_directory_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")  # no trailing newline
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert load_haystack(tmp_path) == "first file\nsecond file\n"
    assert load_haystack(tmp_path / "b.txt") == "second file\n"
    assert load_haystack(str(tmp_path / "a.txt")) == "first file"


def test_load_haystack_errors(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist") as ei:
        load_haystack(tmp_path / "missing.txt")
    # a UserError (one `error:` line in the commands) that old `except FileNotFoundError` still catches
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, UserError)
    assert str(tmp_path / "missing.txt") in str(ei.value) and "config.haystack" in str(ei.value)
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty") as ei:
        load_haystack(tmp_path / "empty.txt")
    assert "empty.txt" in str(ei.value) and "config.haystack" in str(ei.value)
    with pytest.raises(UserError, match="empty"):
        load_haystack(tmp_path)  # its only .txt file is blank
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        load_haystack(tmp_path / "sub")


def test_bundled_needles(needles, haystack):
    assert 3 <= len(needles) <= 4
    assert all(isinstance(n, Needle) for n in needles)
    for n in needles:
        assert n.real_needle.lower() in n.needle.lower()  # answer span is a sub-phrase
        assert n.needle not in haystack and n.real_needle not in haystack
        assert n.answer == n.real_needle
        assert len(n.real_needle.split()) >= 12
    # the original's field names, one object per line
    recs = [json.loads(line) for line in DEFAULT_NEEDLES_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(set(r) == {"needle", "question", "real_needle"} for r in recs)
    with pytest.raises(Exception):
        needles[0].needle = "x"  # frozen


def test_san_francisco_needle():
    assert len([line for line in SAN_FRANCISCO_NEEDLES_PATH.read_text().splitlines() if line.strip()]) == 1
    sf = san_francisco_needle()
    assert sf == Needle(
        needle="The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        question="What is the best thing to do in San Francisco?",
        real_needle="eat a sandwich and sit in Dolores Park on a sunny day",
    )


def test_reference_needles_file_loads():
    ref = reference_needles()
    assert len(ref) == 3
    assert ref[1].real_needle == "take a walk in Chaoyang Park and have a cup of Espresso in the evening"


def test_load_needles_errors(tmp_path):
    good = {"needle": "a b c.", "question": "q?", "real_needle": "b c"}
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 3: not valid JSON"):
        load_needles(p)
    p.write_text(json.dumps({"needle": "a", "question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: missing field\(s\) real_needle"):
        load_needles(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps([1, 2]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 2: expected a JSON object"):
        load_needles(p)
    p.write_text(json.dumps({**good, "question": ""}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1: field\\(s\\) question must be non-empty"):
        load_needles(p)
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no needles"):
        load_needles(p)
    with pytest.raises(MissingFileError) as ei:
        load_needles(tmp_path / "nope.jsonl")
    assert isinstance(ei.value, FileNotFoundError)
    assert "nope.jsonl" in str(ei.value) and "config.needles" in str(ei.value)
    with pytest.raises(UserError, match="not a file"):
        load_needles(tmp_path)
    # every message names the file and says what a line must hold
    p.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1: not valid JSON") as ei:
        load_needles(p)
    assert str(p) in str(ei.value) and "needle, question, real_needle" in str(ei.value)
    p.write_text(json.dumps({**good, "extra": 1}) + "\n", encoding="utf-8")
    assert load_needles(p) == [Needle("a b c.", "q?", "b c")]




# ----------------------------------------------------------------------------- grid

def test_paper_grid_values():
    lengths = paper_lengths()
    assert lengths == np.round(np.linspace(1000, 50000, 20)).astype(int).tolist()
    assert len(lengths) == 20 and lengths[:3] == [1000, 3579, 6158] and lengths[-1] == 50000
    assert all(type(x) is int for x in lengths)
    assert paper_depths() == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert all(type(x) is int for x in paper_depths())


def test_build_grid_order_and_keys(tok, haystack, needles):
    grid = build_grid(tok, haystack, needles[:2], [1500, 1000], [50, 0, 100], chat=False)
    assert all(isinstance(i, Instance) for i in grid)
    assert [(i.length, i.depth, i.needle_index) for i in grid] == [
        (L, d, k) for L in (1000, 1500) for d in (0, 50, 100) for k in (0, 1)
    ]
    keys = [i.key for i in grid]
    assert keys[:3] == ["L1000_D0_N0", "L1000_D0_N1", "L1000_D50_N0"]
    assert keys == grid_keys([1500, 1000], [50, 0, 100], 2)
    assert len(set(keys)) == len(keys)
    assert grid[1].needle == needles[1]
    assert instance_key(1000, 12.5, 3) == "L1000_D12.5_N3"
    assert instance_key(np.int64(3579), np.int64(56), 0) == "L3579_D56_N0"
    with pytest.raises(UserError, match="duplicate"):
        grid_keys([1000, 1000], [0], 1)
    with pytest.raises(UserError, match="duplicate"):
        build_grid(tok, haystack, needles, [1000], [50, 50.0], chat=False)
    lazy = iter_grid(tok, haystack, needles[:1], [1000], [0, 100], chat=True)
    assert [i.key for i in lazy] == ["L1000_D0_N0", "L1000_D100_N0"]



# ----------------------------------------------------------------------------- ROUGE

ROUGE_PAIRS = [
    ("eat a sandwich and sit in Dolores Park on a sunny day",
     "Eat a sandwich and sit in Dolores Park."),
    ("take a walk in Chaoyang Park and have a cup of Espresso in the evening",
     "Taking walks in Chaoyang park, then espressos in the evenings."),
    ("Because he is a mean person and also he can't ride a horse or dive a car.",
     "He is mean and cannot ride horses."),
    ("records were once again broken", ""),
    ("the cats are running", "cat ran"),
    ("finished in 1847 by a mason named Tobias Quell after nine years of work",
     "Tobias Quell, a mason, finished it in 1847 after 9 years of work."),
]


@pytest.mark.parametrize("reference,prediction", ROUGE_PAIRS)
def test_rouge_matches_rouge_score(reference, prediction):
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(reference, prediction)
    assert rouge1_recall(reference, prediction) == pytest.approx(expected["rouge1"].recall, abs=1e-12)


def test_rouge_values_and_keep_rule():
    assert rouge1_recall("eat a sandwich and sit in Dolores Park on a sunny day",
                         "Eat a sandwich and sit in Dolores Park.") == pytest.approx(8 / 12)
    assert rouge1_recall("the cats are running", "cat ran") == pytest.approx(1 / 4)  # stems: cat, run
    assert rouge1_recall("sitting in parks", "sit in the park") == pytest.approx(1.0)
    assert rouge1_recall("anything", "") == 0.0
    assert not keep_test(0.5)
    assert keep_test(0.5000001) and keep_test(1.0)
    assert not keep_test(0.0)
