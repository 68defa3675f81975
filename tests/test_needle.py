"""Tests of rhead_jax.needle: data loading, prompt building, answer spans, grid and ROUGE.

No real model or download: the tokenizer is a small byte-level BPE trained here on the bundled
haystack, wrapped in PreTrainedTokenizerFast with a BOS-adding post-processor and a chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rhead_jax.needle import (
    CONTEXT_BUFFER,
    LLAMA2_PERIOD_IDS,
    QUESTION_TEMPLATE,
    Instance,
    Needle,
    NeedleNotFoundError,
    TokenizedHaystack,
    answer_token_ids,
    build_grid,
    build_instance,
    check_length,
    find_answer_span,
    grid_keys,
    instance_key,
    iter_grid,
    keep_test,
    load_haystack,
    load_needles,
    paper_depths,
    paper_lengths,
    period_token_ids,
    rouge1_recall,
    san_francisco_needle,
    tokenized_haystack,
)
from rhead_jax.needle.haystack import DEFAULT_NEEDLES_PATH, SAN_FRANCISCO_NEEDLES_PATH
from rhead_jax.needle.prompts import _ids_from_chat_output

REFERENCE_NEEDLES = Path(__file__).resolve().parents[2] / "shared/reference/needles.jsonl"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _make_tokenizer(chat_template=CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([load_haystack()], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="session")
def haystack():
    return load_haystack()


@pytest.fixture(scope="session")
def needles():
    return load_needles()


def _reference_needles():
    if not REFERENCE_NEEDLES.is_file():
        pytest.skip(f"the original needles file is not available at {REFERENCE_NEEDLES}")
    return load_needles(REFERENCE_NEEDLES)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_haystack(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_haystack(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="empty"):
        load_haystack(tmp_path)  # its only .txt file is blank
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
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
    ref = _reference_needles()
    assert len(ref) == 3
    assert ref[1].real_needle == "take a walk in Chaoyang Park and have a cup of Espresso in the evening"


def test_load_needles_errors(tmp_path):
    good = {"needle": "a b c.", "question": "q?", "real_needle": "b c"}
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: not valid JSON"):
        load_needles(p)
    p.write_text(json.dumps({"needle": "a", "question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: missing field\(s\) real_needle"):
        load_needles(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps([1, 2]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        load_needles(p)
    p.write_text(json.dumps({**good, "question": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: field\\(s\\) question must be non-empty"):
        load_needles(p)
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no needles"):
        load_needles(p)
    with pytest.raises(FileNotFoundError):
        load_needles(tmp_path / "nope.jsonl")
    p.write_text(json.dumps({**good, "extra": 1}) + "\n", encoding="utf-8")
    assert load_needles(p) == [Needle("a b c.", "q?", "b c")]


# ----------------------------------------------------------------------------- prompt building

def test_period_token_ids(tok):
    ids = period_token_ids(tok)
    assert tok.convert_tokens_to_ids(".") in ids
    expected = {i for i in range(len(tok)) if tok.decode([i]).strip() == "."}
    assert ids == expected
    assert period_token_ids(tok) is ids  # cached


@pytest.mark.parametrize("depth", [11, 22, 33, 50, 67, 89])
def test_needle_inserted_at_sentence_boundary(tok, haystack, needles, depth):
    n = needles[0]
    inst = build_instance(tok, haystack, n, 3000, depth, chat=False)
    ctx = inst.context_ids.tolist()
    pos, m = inst.needle_pos, len(inst.needle_ids)
    assert list(inst.needle_ids) == _enc(tok, n.needle)
    assert ctx[pos:pos + m] == list(inst.needle_ids)
    assert pos > 0 and tok.decode([ctx[pos - 1]]).strip() == "."
    hay_ctx = ctx[:pos] + ctx[pos + m:]
    start = int(len(hay_ctx) * (depth / 100))
    assert pos <= start
    # the nearest period at or before the depth's insertion point
    periods = period_token_ids(tok)
    assert not any(t in periods for t in hay_ctx[pos:start])
    k = inst.context_text.index(n.needle)
    assert inst.context_text[k - 1] == "."


def test_depth_0_and_100(tok, haystack, needles):
    n = needles[1]
    first = build_instance(tok, haystack, n, 2000, 0, chat=False)
    assert first.needle_pos == 0
    assert first.context_text.startswith(n.needle)
    last = build_instance(tok, haystack, n, 2000, 100, chat=False)
    assert last.needle_pos == len(last.context_ids) - len(last.needle_ids)
    assert last.context_text.endswith(n.needle)
    # the question follows the context with no separator, exactly as in the original
    assert last.prompt_text == last.context_text + QUESTION_TEMPLATE.format(question=n.question)
    assert last.prompt_text.endswith(n.needle + "Based on the content of the book, Question: " + n.question + "\nAnswer:")
    # the haystack before the needle is the same at both depths
    assert last.context_text[: -len(n.needle)] == first.context_text[len(n.needle):]


def test_no_period_in_haystack_inserts_at_start(tok, needles):
    text = "a haystack without any sentence end " * 400
    inst = build_instance(tok, text, needles[0], 1500, 50, chat=False)
    assert inst.needle_pos == 0
    assert inst.context_text.startswith(needles[0].needle)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [1000, 6158, 50000])
def test_prompt_length_close_to_length(tok, haystack, needles, chat, length):
    inst = build_instance(tok, haystack, needles[2], length, 44, chat=chat)
    assert len(inst.context_ids) == length - CONTEXT_BUFFER
    assert length - CONTEXT_BUFFER < inst.num_prompt_tokens <= length
    assert inst.prompt_ids.dtype == np.int32 and not inst.prompt_ids.flags.writeable
    if length == 50000:  # longer than one copy of the essay: repeated as in the original
        assert len(_enc(tok, haystack)) < length
        assert inst.context_text.count("AREOPAGITICA") >= 2


def test_chat_prompt(tok, haystack, needles):
    n = needles[-1]
    inst = build_instance(tok, haystack, n, 2000, 56, chat=True)
    user = f"<book>{inst.context_text}</book>\nBased on the content of the book, Question: {n.question}\nAnswer:"
    assert inst.prompt_text == f"<s><|user|>\n{user}</s>\n<|assistant|>\n"
    expected = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert inst.prompt_ids.tolist() == list(expected)
    assert inst.prompt_ids.tolist().count(tok.bos_token_id) == 1


def test_chat_requires_template(haystack, needles):
    plain = _make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat_template"):
        build_instance(plain, haystack, needles[0], 1000, 50, chat=True)


def test_ids_from_chat_output():
    assert _ids_from_chat_output({"input_ids": [1, 2, 3]}) == [1, 2, 3]
    assert _ids_from_chat_output([[1, 2, 3]]) == [1, 2, 3]
    assert _ids_from_chat_output(np.array([[1, 2, 3]])) == [1, 2, 3]
    assert _ids_from_chat_output([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="batch of 2"):
        _ids_from_chat_output([[1], [2]])


# ----------------------------------------------------------------------------- answer spans

def _all_needle_sets():
    sets = [("bundled", load_needles()), ("san_francisco", [san_francisco_needle()])]
    if REFERENCE_NEEDLES.is_file():
        sets.append(("original", load_needles(REFERENCE_NEEDLES)))
    return sets


@pytest.mark.parametrize("chat", [False, True])
def test_span_covers_exactly_the_answer(tok, haystack, chat):
    sets = _all_needle_sets()
    if len(sets) < 3:
        _reference_needles()  # skips with the reason
    for _, ns in sets:
        for n in ns:
            for depth in (0, 50, 100):
                inst = build_instance(tok, haystack, n, 2500, depth, chat=chat)
                s, e = inst.span
                assert e - s == len(inst.answer_ids)
                assert inst.prompt_ids[s:e].tolist() == list(inst.answer_ids)
                assert tok.decode(inst.prompt_ids[s:e].tolist()).strip().lower() == n.real_needle.strip().lower()
                # the span lies inside the needle, inside the context (before the question)
                assert inst.context_text.index(n.needle) <= len(tok.decode(inst.prompt_ids[:s].tolist()))
                assert e <= inst.num_prompt_tokens - len(_enc(tok, n.question))


def test_find_answer_span_original_search():
    ans = list(range(100, 112))  # 12 distinct ids
    prompt = [1, 2, 3] + ans + [4, 5]
    # the original's search: the window starting one token early misses only the last id
    # (11/12 > 0.9) and is found first
    assert find_answer_span(prompt, ans) == (2, 14)
    assert find_answer_span(prompt, ans, prefer_exact=True) == (3, 15)
    # no exact occurrence: falls back to the 90% set test
    fuzzy = [1, 2, 3, 99] + ans[1:] + [4, 5]
    assert find_answer_span(fuzzy, ans, prefer_exact=True) == find_answer_span(fuzzy, ans) == (3, 15)
    # exactly 90% coverage is not enough ("more than 90%")
    ten = list(range(200, 210))
    with pytest.raises(NeedleNotFoundError):
        find_answer_span([1] + ten[:9] + [2, 3], ten)
    assert find_answer_span(np.array([7, 7] + ten, dtype=np.int32), ten) == (2, 12)
    with pytest.raises(ValueError, match="no tokens"):
        find_answer_span([1, 2], [])


def test_needle_not_found_error(tok, haystack):
    with pytest.raises(NeedleNotFoundError) as ei:
        find_answer_span([1, 2, 3, 4], [7, 8, 9], description="my instance")
    assert isinstance(ei.value, ValueError)
    assert "my instance" in str(ei.value)
    bad = Needle(needle="The lantern of Gorrowby is painted a deep green every spring.",
                 question="What colour is the lantern of Gorrowby?",
                 real_needle="painted with seventeen thin coats of saffron yellow lacquer by the ferrymen")
    with pytest.raises(NeedleNotFoundError) as ei:
        build_instance(tok, haystack, bad, 1000, 50, chat=False, needle_index=3)
    msg = str(ei.value)
    for part in ("L1000_D50_N3", "length=1000", "depth=50", bad.needle, "not a sub-phrase"):
        assert part in msg


def test_answer_token_ids(tok, needles):
    n = needles[0]
    standalone = answer_token_ids(tok, n, in_context=False)
    assert list(standalone) == _enc(tok, n.real_needle)
    in_ctx = answer_token_ids(tok, n, in_context=True)
    assert tok.decode(list(in_ctx)) == " " + n.real_needle  # keeps the leading space of the needle
    assert tuple(in_ctx) != tuple(standalone)
    other = Needle("some words here.", "q?", "not in the needle at all")
    assert answer_token_ids(tok, other, in_context=True) == tuple(_enc(tok, other.real_needle))


# ----------------------------------------------------------------------------- faithful mode

@pytest.mark.parametrize("chat", [False, True])
def test_faithful_differs_only_in_quirks(tok, haystack, needles, chat):
    n = needles[0]
    bos = tok.bos_token_id
    for depth in (33, 100):
        d = build_instance(tok, haystack, n, 2000, depth, chat=chat, faithful=False)
        f = build_instance(tok, haystack, n, 2000, depth, chat=chat, faithful=True)
        assert (d.faithful, f.faithful) == (False, True)
        # QUIRK: Llama-2's period ids, whatever the tokenizer
        if depth < 100:
            assert f.needle_pos == 0 or f.context_ids[f.needle_pos - 1] in LLAMA2_PERIOD_IDS
            assert d.context_ids[d.needle_pos - 1] in period_token_ids(tok)
        # QUIRK: special tokens kept: BOS before the haystack (twice, via the decode/re-encode
        # round trip) and before the needle, as literal strings in the context text
        assert f.needle_ids[0] == bos and list(f.needle_ids[1:]) == list(d.needle_ids)
        assert f.context_text.startswith("<s>")
        assert "<s>" + n.needle in f.context_text
        assert "<s>" not in d.context_text and bos not in d.context_ids.tolist()
        assert f.prompt_ids.tolist().count(bos) == 4  # prompt/template BOS + 2 haystack + 1 needle
        assert d.prompt_ids.tolist().count(bos) == 1
        # same: budget, question, template
        assert len(f.context_ids) == len(d.context_ids) == 2000 - CONTEXT_BUFFER
        tail = f"Based on the content of the book, Question: {n.question}\nAnswer:"
        assert tail in f.prompt_text and tail in d.prompt_text
        assert f.prompt_text.split(tail)[1] == d.prompt_text.split(tail)[1]
        # same haystack text, except the tokens the BOS strings take from the budget
        f_hay = f.context_text.replace("<s>", "").replace(n.needle, "")
        d_hay = d.context_text.replace(n.needle, "")
        assert d_hay.startswith(f_hay[:-20]) and len(d_hay) > len(f_hay)
        # span: default exact; faithful = the original's search on the standalone answer
        assert f.answer_ids == tuple(_enc(tok, n.real_needle))
        assert f.span == find_answer_span(f.prompt_ids, f.answer_ids)
        assert d.prompt_ids[d.span[0]:d.span[1]].tolist() == list(d.answer_ids)


# ----------------------------------------------------------------------------- lengths and depths

def test_length_checks(tok, haystack, needles):
    check_length(4096, 4096)
    check_length(1000, None)
    with pytest.raises(ValueError, match=r"60000 exceeds .* 32768"):
        check_length(60000, 32768)
    for bad in (0, -5, 1.5, "100", True):
        with pytest.raises(ValueError):
            check_length(bad, None)
    # checked before any work: the tokenizer is never touched
    with pytest.raises(ValueError, match="exceeds"):
        build_instance(None, "unused", needles[0], 8192, 50, chat=False, max_positions=4096)
    with pytest.raises(ValueError, match="exceeds"):
        build_grid(None, "unused", needles, [1000, 8192], [50], chat=False, max_positions=4096)
    with pytest.raises(ValueError, match="too short"):
        build_instance(tok, haystack, needles[0], 210, 50, chat=False)
    for bad_depth in (-1, 100.5, float("nan"), "deep"):
        with pytest.raises(ValueError, match="depth"):
            build_instance(tok, haystack, needles[0], 1000, bad_depth, chat=False)


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
    with pytest.raises(ValueError, match="duplicate"):
        grid_keys([1000, 1000], [0], 1)
    with pytest.raises(ValueError, match="duplicate"):
        build_grid(tok, haystack, needles, [1000], [50, 50.0], chat=False)
    lazy = iter_grid(tok, haystack, needles[:1], [1000], [0, 100], chat=True)
    assert [i.key for i in lazy] == ["L1000_D0_N0", "L1000_D100_N0"]


def test_haystack_tokenized_once(tok, haystack, needles):
    hay = tokenized_haystack(tok, haystack, 3000)
    assert tokenized_haystack(tok, haystack, 1000) is hay
    tokens = hay.tokens
    assert len(tokens) >= 3000 and not tokens.flags.writeable
    build_grid(tok, hay, needles[:1], [1000, 2000], [0, 50], chat=False)
    build_instance(tok, haystack, needles[0], 2500, 50, chat=False)  # via the cache
    assert hay.tokens is tokens  # not re-tokenized
    own = TokenizedHaystack(tok, haystack, 1000)
    with pytest.raises(ValueError, match="different tokenizer"):
        build_instance(_make_tokenizer(), own, needles[0], 1000, 50, chat=False)
    with pytest.raises(ValueError, match="empty"):
        TokenizedHaystack(tok, "   ")


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
