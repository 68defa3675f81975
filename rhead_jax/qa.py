"""Extractive QA and chain-of-thought math tasks, for ablations beyond the needle test (paper §4.2-4.3).

Task files are JSONL, one object per line (blank lines skipped):

  qa   {"context": str, "question": str, "answer": str | [str, ...]}   answer: a span of the context
  cot  {"question": str, "answer": number | numeric str}               a math word problem

Prompts (`build_prompt_text`): QA asks for a short span copied from the passage, one user turn for
chat models (through `rhead_jax.needle.chat.chat_prompt`, as the needle prompts); CoT appends
"Let's think step by step." (Kojima et al. 2022) to the question.

Metrics:
  qa   SQuAD-style: answers are normalized (lowercase, punctuation and the articles a/an/the
       removed, whitespace collapsed); `exact_match` = normalized strings equal; `f1` = token F1 of
       the normalized strings (two empty strings: 1; one empty: 0). With several gold answers, the
       best one counts. A task's `accuracy` is its mean F1.
  cot  the predicted number (`extract_number`: the first number after the LAST "answer is" /
       "answer:" / "####" marker, else the last number of the response) equals the gold number
       (relative tolerance 1e-6). `accuracy` = share of problems solved.
"""
from __future__ import annotations

import collections
import math
import re
import string
from pathlib import Path
from typing import Any, Sequence

from rhead_jax import jsonl
from rhead_jax.errors import MissingFileError, UserError
from rhead_jax.needle.chat import chat_prompt
from rhead_jax.needle.haystack import DATA_DIR

QA_TASKS_PATH = DATA_DIR / "qa_tasks.jsonl"
COT_TASKS_PATH = DATA_DIR / "cot_tasks.jsonl"

TASK_KINDS = ("qa", "cot")
QA_TEMPLATE = ("Answer the question with a short phrase copied from the passage.\n\n"
               "Passage: {context}\n\nQuestion: {question}\nAnswer:")
COT_CHAT_TEMPLATE = "{question}\nLet's think step by step."
COT_BASE_TEMPLATE = "Q: {question}\nA: Let's think step by step."

_FIELDS = {"qa": ("context", "question", "answer"), "cot": ("question", "answer")}


# ----------------------------------------------------------------------------------------------- loading
def _check_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        n = parse_number(value.strip())
        return n
    return None


def load_tasks(path: str | Path, kind: str) -> list[dict]:
    """Read a task file of `kind` ("qa" or "cot"); errors name the file and line.

    A missing file raises `MissingFileError` (a FileNotFoundError), anything else wrong with the
    file or `kind` a `UserError` (a ValueError).
    """
    if kind not in TASK_KINDS:
        raise UserError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"{kind} task file does not exist: {p}; give an existing JSONL file "
                               f"(one object per line with {', '.join(_FIELDS[kind])})")
    items = []
    with p.open(encoding="utf-8") as fh:
        for lineno, rec in jsonl.objects(fh, where=f"{kind} task file {p}", fields=_FIELDS[kind],
                                         fix=f"{kind} tasks need {', '.join(_FIELDS[kind])}"):
            where = f"{p}, line {lineno}"
            for f in ("context", "question"):
                if f in _FIELDS[kind] and (not isinstance(rec[f], str) or not rec[f].strip()):
                    raise UserError(f"{where}: field {f} must be a non-empty string")
            ans = rec["answer"]
            if kind == "qa":
                answers = [ans] if isinstance(ans, str) else ans
                if (not isinstance(answers, list) or not answers
                        or not all(isinstance(a, str) and a.strip() for a in answers)):
                    raise UserError(f"{where}: answer must be a non-empty string or a list of them")
                rec = {**rec, "answers": answers}
            elif _check_number(ans) is None:
                raise UserError(f"{where}: cot answer must be a number (or a numeric string), got {ans!r}")
            items.append(rec)
    if not items:
        raise UserError(f"{kind} task file {p} contains no tasks; add one JSON object per line")
    return items


# ----------------------------------------------------------------------------------------------- prompts
def build_prompt_text(item: dict, kind: str) -> str:
    """The user turn (chat models) or the whole prompt (base models) of one item."""
    if kind == "qa":
        return QA_TEMPLATE.format(context=item["context"], question=item["question"])
    return COT_CHAT_TEMPLATE.format(question=item["question"])


def build_prompt_ids(tokenizer, item: dict, kind: str, *, chat: bool) -> list[int]:
    """Prompt token ids: one user turn through the chat template (with the generation prompt), or
    the plain text with the tokenizer's default special tokens for base models."""
    if chat:
        return chat_prompt(tokenizer, build_prompt_text(item, kind))[1]
    text = (QA_TEMPLATE.format(context=item["context"], question=item["question"]) if kind == "qa"
            else COT_BASE_TEMPLATE.format(question=item["question"]))
    return list(tokenizer(text)["input_ids"])


# ----------------------------------------------------------------------------------------------- SQuAD
def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _as_list(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(max(p == normalize_answer(g) for g in _as_list(gold)))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold: str | Sequence[str]) -> float:
    return max(_f1(prediction, g) for g in _as_list(gold))


# ----------------------------------------------------------------------------------------------- numbers
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_MARKER = re.compile(r"answer\s*(?:is|:|=)|####", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    t = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_number(response: str) -> float | None:
    """The answer number of a chain-of-thought response (module docstring), or None."""
    marks = list(_MARKER.finditer(response))
    if marks:
        m = _NUMBER.search(response, marks[-1].end())
        if m:
            return parse_number(m.group())
    nums = _NUMBER.findall(response)
    return parse_number(nums[-1]) if nums else None


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------- scoring
def score_response(kind: str, response: str, item: dict) -> dict:
    """Per-item metrics: qa -> {"em", "f1"}; cot -> {"prediction", "correct"}."""
    if kind == "qa":
        return {"em": exact_match(response, item["answers"]), "f1": f1_score(response, item["answers"])}
    pred = extract_number(response)
    return {"prediction": pred, "correct": float(numbers_equal(pred, _check_number(item["answer"])))}


def item_accuracy(kind: str, scores: dict) -> float:
    """The number a task's `accuracy` averages: F1 for qa, correctness for cot."""
    return float(scores["f1"] if kind == "qa" else scores["correct"])


def aggregate(kind: str, per_item: Sequence[dict]) -> dict:
    """Mean metrics over items: qa -> {"em", "f1"}; cot -> {"accuracy"}."""
    n = max(len(per_item), 1)
    if kind == "qa":
        return {"em": sum(r["em"] for r in per_item) / n, "f1": sum(r["f1"] for r in per_item) / n}
    return {"accuracy": sum(r["correct"] for r in per_item) / n}
