"""Tests of rhead_jax.qa: task files, prompts (the shared chat prompt of rhead_jax.needle.chat), metrics.

The metric and loader tests repeat tests/test_ablation.py's QA / CoT section, which belongs here.
"""
from __future__ import annotations

import pytest

from rhead_jax import qa
from rhead_jax.errors import MissingFileError, UserError
from tests.helpers.needle_tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_squad_normalization_and_metrics():
    assert qa.normalize_answer("The  Cat, sat!") == "cat sat"
    assert qa.normalize_answer("An apple a day") == "apple day"
    assert qa.exact_match("the Marta Voss.", "Marta Voss") == 1.0
    assert qa.exact_match("Marta", "Marta Voss") == 0.0
    assert qa.f1_score("Marta", "Marta Voss") == pytest.approx(2 / 3)
    assert qa.f1_score("keeper Marta Voss", ["nobody", "Marta Voss"]) == pytest.approx(0.8)
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("a", "cat") == 0.0  # "a" normalizes to empty
    assert qa.f1_score("cat cat", "cat") == pytest.approx(2 / 3)


def test_cot_number_extraction():
    assert qa.extract_number("3 + 4 = 7. Then 7 * 2 = 14. The answer is 14.") == 14
    assert qa.extract_number("The answer is $1,250.50, since 3 items") == 1250.5
    assert qa.extract_number("So we get 12 rolls left") == 12
    assert qa.extract_number("#### -3") == -3
    assert qa.extract_number("no numbers here") is None
    assert qa.score_response("cot", "The answer is 12.", {"answer": 12})["correct"] == 1.0
    assert qa.score_response("cot", "The answer is 12.", {"answer": "13"})["correct"] == 0.0


def test_scores_and_aggregate():
    item = {"answers": ["Marta Voss"]}
    m = qa.score_response("qa", "Marta", item)
    assert m == {"em": 0.0, "f1": pytest.approx(2 / 3)}
    assert qa.item_accuracy("qa", m) == pytest.approx(2 / 3)
    assert qa.item_accuracy("cot", {"correct": 1.0}) == 1.0
    assert qa.aggregate("qa", [m, {"em": 1.0, "f1": 1.0}]) == {"em": 0.5, "f1": pytest.approx(5 / 6)}
    assert qa.aggregate("cot", [{"correct": 1.0}, {"correct": 0.0}]) == {"accuracy": 0.5}
    assert qa.aggregate("cot", []) == {"accuracy": 0.0}


def test_bundled_task_files_load():
    items = qa.load_tasks(qa.QA_TASKS_PATH, "qa")
    assert len(items) >= 5 and all(any(a in it["context"] for a in it["answers"]) for it in items)
    assert len(qa.load_tasks(qa.COT_TASKS_PATH, "cot")) >= 5


def test_task_file_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(UserError, match="line 1: missing field"):
        qa.load_tasks(p, "qa")
    p.write_text('{"question": "q", "answer": "many"}\n')
    with pytest.raises(UserError, match="must be a number"):
        qa.load_tasks(p, "cot")
    with pytest.raises(FileNotFoundError) as ei:
        qa.load_tasks(tmp_path / "none.jsonl", "qa")
    assert isinstance(ei.value, MissingFileError) and "none.jsonl" in str(ei.value)
    with pytest.raises(UserError, match="task kind"):
        qa.load_tasks(p, "mcq")
    p.write_text("\n")
    with pytest.raises(UserError, match="contains no tasks"):
        qa.load_tasks(p, "qa")


def test_build_prompt(tok):
    item = {"context": "The keeper is Marta Voss.", "question": "Who is the keeper?", "answers": ["Marta Voss"]}
    text = qa.build_prompt_text(item, "qa")
    assert text == qa.QA_TEMPLATE.format(context=item["context"], question=item["question"])
    # base model: the plain text with the tokenizer's default special tokens (BOS here)
    assert qa.build_prompt_ids(tok, item, "qa", chat=False) == tok(text)["input_ids"]
    # chat model: one user turn through the template, encoded as the template renders it
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    ids = qa.build_prompt_ids(tok, item, "qa", chat=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    cot = {"question": "What is 3 + 4?", "answer": 7}
    assert qa.build_prompt_text(cot, "cot") == "What is 3 + 4?\nLet's think step by step."
    assert qa.build_prompt_ids(tok, cot, "cot", chat=False) == tok(
        qa.COT_BASE_TEMPLATE.format(question=cot["question"]))["input_ids"]


def test_chat_requires_template():
    plain = make_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no chat_template"):
        qa.build_prompt_ids(plain, {"question": "q?", "answer": 1}, "cot", chat=True)
