"""Why a sweep's results are empty or thin: the ROUGE gate's verdict, the model's own answers, and
the likely causes with the fix for each (issue 27, "empty head score jsons").

A head's retrieval score is the mean over the tests the ROUGE gate keeps (rhead_jax.needle.rouge:
ROUGE-1 recall of the expected answer in the response, x 100 > 50). A sweep whose model passes no
test has nothing to average: its head_scores.json holds empty lists. `gate_report` (into
summary.json as "gate" when fewer than a quarter of the tests are kept) and `no_kept_message`
(the `error:` line of `python -m rhead_jax.sweep`, exit status 2) say so and say why. Pure
functions of the per-test result dicts (rhead_jax.detection.score_batch) and the config.
"""
from __future__ import annotations

from typing import Sequence

from rhead_jax.needle.rouge import KEEP_THRESHOLD

THIN_SHARE = 0.25          # fewer kept tests than this share of the tests run: "thin" results
SHOWN_ANSWERS = 3          # the model's answers quoted in the report and the error line
GATE_TEXT = (f"ROUGE-1 recall of the expected answer in the model's response > {KEEP_THRESHOLD / 100:g} "
             "(rouge_score, stemmed)")


def _clip(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def gate_report(results: Sequence[dict], *, shown: int = SHOWN_ANSWERS) -> dict:
    """{"tests", "kept", "share", "thin", "gate", "answers": [{key, response, expected, rouge1_recall}]}:
    the gate's outcome, with the `shown` dropped tests that came closest (highest recall, grid order
    among equals) and what they should have said."""
    n = len(results)
    kept = sum(bool(r["kept"]) for r in results)
    dropped = sorted((r for r in results if not r["kept"]), key=lambda r: -float(r["rouge1_recall"]))
    return {"tests": n, "kept": kept, "share": kept / n if n else 0.0, "thin": kept < THIN_SHARE * n,
            "gate": GATE_TEXT,
            "answers": [{"key": r["key"], "response": r["response"], "expected": r["answer"],
                         "rouge1_recall": round(float(r["rouge1_recall"]), 4)} for r in dropped[:shown]]}


def thin_warning(gate: dict) -> str:
    """The line that opens the summary (and the report) when few tests were kept; '' otherwise."""
    if not gate["thin"]:
        return ""
    return (f"WARNING: only {gate['kept']} of {gate['tests']} tests ({100 * gate['share']:.0f}%) passed the ROUGE "
            f"gate ({GATE_TEXT}); every head score is a mean over those {gate['kept']} tests, so the ranking is "
            "uncertain (see the intervals); the model's closest misses are in summary.json's \"gate\"")


def likely_causes(gate: dict, *, chat: bool | None = None, faithful: bool | None = None,
                  lengths: Sequence[int] = (), max_positions: int | None = None) -> list[str]:
    """The likely causes of answers that miss, each with its fix; what the answers show comes first."""
    answers = gate["answers"]
    empty = sum(not a["response"].strip() for a in answers)
    fmt = ("prompt format: the chat template is " + ("ON (config.model.chat=True)" if chat else "OFF" if chat is False
                                                      else "on or off (config.model.chat)")
           + "; a base model needs --config.model.chat=False, an instruct/chat model --config.model.chat=True")
    newline = ("the base-model newline rule: a test ends at a generated newline ("
               + ("faithful=True: the first one, as in the original" if faithful else "or EOS; see rhead_jax.plan")
               + "), so a base model that starts its answer with a newline may answer nothing; use the chat "
               "template" + (", or --config.sweep.faithful=False" if faithful else "") + ", or put the answer's "
               "opening words in the question")
    smaller = max(min(lengths) // 2, 1) if lengths else 500
    context = (f"context beyond what the model handles" + (f" (lengths {list(lengths)}" + (
        f", model positions {max_positions})" if max_positions else ")") if lengths else "")
        + f": try shorter config.sweep.lengths (e.g. --config.sweep.lengths='({smaller},)') and see if the "
        "answers improve")
    needle = ("a question the needle does not answer: in config.needles each real_needle must be the part of its "
              "needle that answers its question; compare the answers above with the expected ones")
    if answers and empty == len(answers):
        return [f"the answers shown are empty: {newline}", fmt, context, needle]
    if answers and not empty:       # the model says something, but not the needle's answer
        return [needle, fmt, context, newline]
    return [fmt, newline, context, needle]


def no_kept_message(gate: dict, workdir: str, *, chat: bool | None = None, faithful: bool | None = None,
                    lengths: Sequence[int] = (), max_positions: int | None = None) -> str:
    """The `error:` text of a sweep whose model passed no test (one line once the CLI joins it)."""
    shown = "; ".join(f"{a['key']} answered {_clip(a['response'])!r} (expected {_clip(a['expected'])!r}, "
                      f"recall {a['rouge1_recall']:.2f})" for a in gate["answers"])
    causes = likely_causes(gate, chat=chat, faithful=faithful, lengths=lengths, max_positions=max_positions)
    return (f"none of the {gate['tests']} tests run passed the ROUGE gate ({GATE_TEXT}), so there is no head score "
            f"to average (head_scores.json holds empty lists). The model's closest answers: {shown}. Likely causes, "
            "each with its fix: " + " ".join(f"({i}) {c}." for i, c in enumerate(causes, 1))
            + f" Every test's answer is in {workdir}/results.jsonl; its batches stay in {workdir}/batches (a rerun "
            "with the same config resumes; a corrected config needs a new --workdir).")
