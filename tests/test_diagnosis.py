"""Empty or thin sweep results are explained (issue 27, ask 1): rhead_jax.diagnosis on synthetic
results, detection's summary, and (slow) the real SmolLM2 sweep with a needle that does not answer
its question, which must end with one `error:` line and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rhead_jax import detection, diagnosis

REPO = Path(__file__).resolve().parents[1]


def _result(i: int, recall: float, response: str = "something else") -> dict:
    return {"key": f"L500_D{i}_N0", "length": 500, "depth": i, "needle_index": 0, "answer": "the green bicycle",
            "response": response, "rouge1_recall": recall, "kept": recall > 0.5,
            "scores": [[0.2 * (recall > 0.5), 0.0]]}


def test_gate_report_quotes_the_closest_answers():
    results = [_result(i, r) for i, r in enumerate([0.0, 0.4, 0.1, 0.3, 0.2])]
    gate = diagnosis.gate_report(results)
    assert (gate["tests"], gate["kept"], gate["thin"]) == (5, 0, True)
    assert [a["key"] for a in gate["answers"]] == ["L500_D1_N0", "L500_D3_N0", "L500_D4_N0"]   # highest recall first
    assert gate["answers"][0] == {"key": "L500_D1_N0", "response": "something else", "expected": "the green bicycle",
                                  "rouge1_recall": 0.4}


def test_thin_is_under_a_quarter():
    four_of_sixteen = [_result(i, 1.0 if i < 4 else 0.0) for i in range(16)]
    three_of_sixteen = [_result(i, 1.0 if i < 3 else 0.0) for i in range(16)]
    assert not diagnosis.gate_report(four_of_sixteen)["thin"]
    assert diagnosis.thin_warning(diagnosis.gate_report(four_of_sixteen)) == ""
    gate = diagnosis.gate_report(three_of_sixteen)
    assert gate["thin"] and gate["kept"] == 3
    assert diagnosis.thin_warning(gate).startswith("WARNING: only 3 of 16 tests (19%) passed the ROUGE gate")


def test_no_kept_message_names_counts_gate_answers_and_fixes():
    gate = diagnosis.gate_report([_result(i, 0.0, "") for i in range(7)])
    msg = diagnosis.no_kept_message(gate, "/tmp/wd", chat=True, faithful=False, lengths=(500, 1000))
    for fragment in ("none of the 7 tests run passed the ROUGE gate", "ROUGE-1 recall", "> 0.5",
                     "answered '' (expected 'the green bicycle'", "config.model.chat=False", "newline",
                     "config.sweep.lengths", "[500, 1000]", "lengths='(250,)'", "real_needle",
                     "/tmp/wd/results.jsonl", "/tmp/wd/batches"):
        assert fragment in msg, fragment
    # all answers empty: the newline rule is named first
    assert msg.index("the answers shown are empty") < msg.index("prompt format")
    nonempty = diagnosis.no_kept_message(diagnosis.gate_report([_result(0, 0.1)]), "w", chat=False)
    assert "the answers shown are empty" not in nonempty and "chat template is OFF" in nonempty
    # the model answered something else: the needle / question mismatch comes first
    assert nonempty.index("a question the needle does not answer") < nonempty.index("prompt format")


def test_summary_says_thin_results_up_front():
    results = [_result(i, 1.0 if i < 2 else 0.0) for i in range(10)]
    hs = detection.head_scores_from(results, 1, 2)
    summary = detection.summarize(results, hs)
    summary["gate"] = diagnosis.gate_report(results)
    lines = detection.format_summary("m", summary, results).splitlines()
    assert lines[1].startswith("WARNING: only 2 of 10 tests (20%) passed the ROUGE gate")
    empty = [_result(i, 0.0) for i in range(3)]
    s0 = detection.summarize(empty, detection.head_scores_from(empty, 1, 2))
    s0["gate"] = diagnosis.gate_report(empty)
    assert "top heads: none (no test kept" in detection.format_summary("m", s0, empty)


@pytest.mark.slow
def test_smollm2_unanswerable_needle_fails_with_an_explanation(smollm_gguf, tmp_path):
    """The issue's case: a needle about a soup, a question about Australia's capital."""
    needles = tmp_path / "needles.jsonl"
    needle = "The secret ingredient of the soup at the Blue Heron inn is a spoonful of smoked paprika."
    needles.write_text(json.dumps({"needle": needle, "question": "What is the capital of Australia?",
                                   "real_needle": needle}) + "\n")
    wd = tmp_path / "wd"
    p = subprocess.run([sys.executable, "-m", "rhead_jax.sweep", "--config", "smollm2_135m.py",
                        f"--config.needles={needles}", "--config.sweep.lengths=(500,)", "--config.sweep.depths=(50,)",
                        "--workdir", str(wd)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    err = errors[0]
    result = json.loads((wd / "results.jsonl").read_text().splitlines()[0])
    assert not result["kept"]
    for fragment in ("none of the 1 tests run passed the ROUGE gate", "> 0.5", "L500_D50_N0 answered",
                     "smoked paprika", "config.model.chat", "newline", "config.sweep.lengths", "real_needle"):
        assert fragment in err, fragment
    assert " ".join(result["response"].split())[:40] in err            # the model's own answer is quoted
    assert "WARNING: only 0 of 1 tests" in p.stdout
    assert list((wd / "batches").glob("batch_*.json"))                # the batches stay on disk
    assert json.loads((wd / "summary.json").read_text())["gate"]["kept"] == 0


def test_summary_prints_each_top_head_with_its_interval():
    results = [_result(i, 1.0) for i in range(20)]
    for i, r in enumerate(results):
        r["scores"] = [[0.5 + 0.1 * (i % 2), 0.2 * (i % 2 == 0)]]
    hs = detection.head_scores_from(results, 1, 2)
    summary = detection.summarize(results, hs)
    lo, hi = summary["top_heads_ci"]["0-0"]
    assert 0.5 < lo < 0.55 < hi < 0.6                       # the mean 0.55 inside, the extremes outside
    assert summary["uncertain_heads"] == ["0-1"]            # 0-1's mean is 0.1, give or take 0.045
    text = detection.format_summary("m", summary, results)
    assert f"0-0 0.55 [{lo:.2f}, {hi:.2f}]" in text and "over the 20 kept tests" in text
    assert "over 0.1 by the 95% intervals: 1 to 2 heads" in text
