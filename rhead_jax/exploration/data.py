"""What the exploration page holds: the tests and heads it shows (`select_tests`, `select_heads`) and,
for each test, its prompt window, answer, captures and copy events (`page_data`; rhead_jax.exploration)."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from rhead_jax import captures, io, scoring
from rhead_jax.errors import UserError

TOP_HEADS = 16
ZERO_HEADS = 4
MAX_TESTS = 60


def _read_json(path, what: str):
    if not path.exists():
        raise UserError(f"{path} not found ({what}); give the --workdir of a finished `python -m rhead_jax.sweep`")
    text = path.read_text()
    return json.loads(text) if path.name.endswith(".json") else [json.loads(line) for line in text.splitlines()
                                                                  if line.strip()]


def select_heads(means: dict[str, float], num_layers: int, num_heads: int, heads: Sequence[str] | None = None, *,
                 top_heads: int = TOP_HEADS, zero_heads: int = ZERO_HEADS) -> tuple[list[str], str]:
    """(head keys with step-by-step captures on the page, why those). `heads`: the user's list
    (L-H keys); default the top_heads by mean score then zero_heads zero-score heads spread over
    the layers."""
    if heads:
        out = []
        for key in heads:
            try:
                l, h = scoring.parse_head(key)
            except ValueError as e:
                raise UserError(f"--heads: {e}") from None
            if not (l < num_layers and h < num_heads):
                raise UserError(f"--heads: head {key} is outside this model's {num_layers} layers x {num_heads} heads "
                                f"(layers 0-{num_layers - 1}, heads 0-{num_heads - 1})")
            if scoring.head_key((l, h)) not in out:
                out.append(scoring.head_key((l, h)))
        return out, "the heads of --heads"
    top = [k for k, m in scoring.top_heads({k: [v] for k, v in means.items()}, top_heads) if m > 0]
    zeros = [k for k in sorted(means, key=lambda k: scoring.parse_head(k)) if means[k] == 0]
    pick = [zeros[i] for i in np.linspace(0, len(zeros) - 1, min(zero_heads, len(zeros))).round().astype(int)] \
        if zeros and zero_heads else []
    why = f"the top {len(top)} by mean score and {len(pick)} zero-score heads for contrast"
    return top + [k for k in pick if k not in top], why


def select_tests(results: Sequence[dict], tests: Sequence[str] | None = None, *,
                 max_tests: int = MAX_TESTS) -> tuple[list[dict], str]:
    """(the results of the tests on the page, grid order; why those). `tests`: the user's keys;
    default all, or max_tests evenly spaced over the grid."""
    by_key = {r["key"]: r for r in results}
    if tests:
        unknown = [t for t in tests if t not in by_key]
        if unknown:
            raise UserError(f"--tests: no test {unknown[0]!r} in this sweep; its tests are "
                            f"{', '.join(list(by_key)[:6])}{', ...' if len(by_key) > 6 else ''} (results.jsonl's keys)")
        order = {k: i for i, k in enumerate(by_key)}
        return sorted({by_key[t]["key"]: by_key[t] for t in tests}.values(), key=lambda r: order[r["key"]]), \
            "the tests of --tests"
    if max_tests < 1:
        raise UserError(f"--max_tests must be 1 or more, got {max_tests}")
    if len(results) <= max_tests:
        return list(results), "every test of the sweep"
    idx = sorted(set(np.linspace(0, len(results) - 1, max_tests).round().astype(int).tolist()))
    return [results[i] for i in idx], f"{len(idx)} tests evenly spaced over the grid (--max_tests)"


def _test_data(r: dict, cap: captures.TestCapture, heads: Sequence[str], num_layers: int,
               num_heads: int) -> dict[str, Any]:
    ev = cap.copy_events()                                             # [n, L, H]
    if ev.sum(0).tolist() != r["copy_counts"]:
        raise UserError(f"the captures of test {r['key']} do not give its copy counts in results.jsonl (a workdir "
                        f"mixed from several sweeps?); run the sweep again into a new --workdir with {captures.FLAG}")
    a, b = cap.window
    text = dict(zip(cap.context_pos.tolist(), cap.context_text))
    hl = [scoring.parse_head(k) for k in heads]
    top = {k: cap.topk_index[:, l, h].tolist() for k, (l, h) in zip(heads, hl)}
    weight = {k: np.round(cap.topk_weight[:, l, h].astype(np.float64), 3).tolist() for k, (l, h) in zip(heads, hl)}
    shown = {p for k in heads for step in top[k] for p in step if 0 <= p < cap.prompt_len and not a <= p < b}
    return {
        "key": r["key"], "length": r["length"], "depth": r["depth"], "needle_index": r["needle_index"],
        "needle": r["needle"], "question": r["question"], "answer": r["answer"], "response": r["response"],
        "rouge": r["rouge1_recall"], "kept": r["kept"], "span": list(cap.span), "needle_span": list(cap.needle_span),
        "window": [a, b], "prompt_len": cap.prompt_len,
        "context": [text[p] for p in range(a, b)],
        "elsewhere": {str(p): text[p] for p in sorted(shown)},
        "generated": list(cap.token_text),
        "top": top, "weight": weight,
        "events": {k: np.nonzero(ev[:, l, h])[0].tolist() for k, (l, h) in zip(heads, hl)},
        "counts": {k: r["copy_counts"][l][h] for k, (l, h) in zip(heads, hl)},
        "scores": {k: r["scores"][l][h] for k, (l, h) in zip(heads, hl)},
        "copiers": [[scoring.head_key((int(l), int(h))) for l, h in np.argwhere(ev[n])] for n in range(len(ev))],
    }


def page_data(workdir: str, *, tests: Sequence[str] | None = None, heads: Sequence[str] | None = None,
              top_heads: int = TOP_HEADS, zero_heads: int = ZERO_HEADS, max_tests: int = MAX_TESTS) -> dict[str, Any]:
    """Everything the page shows, from a sweep's workdir (module docstring)."""
    root = io.as_path(workdir)
    if not root.is_dir():
        raise UserError(f"workdir {workdir} not found; give the --workdir of `python -m rhead_jax.sweep`")
    caps = captures.read_workdir(str(workdir))
    head_scores = _read_json(root / "head_scores.json", "the sweep's head scores")
    results = _read_json(root / "results.jsonl", "the sweep's per-test results")
    summary = _read_json(root / "summary.json", "the sweep's summary")
    missing = [r["key"] for r in results if r["key"] not in caps]
    if missing:
        raise UserError(f"test {missing[0]} of results.jsonl has no captures; run the sweep again with "
                        f"{captures.FLAG} and the same --workdir")
    num_layers, num_heads = np.asarray(results[0]["copy_counts"]).shape if results else (0, 0)
    means = scoring.head_means(head_scores)
    chosen_heads, heads_why = select_heads(means, num_layers, num_heads, heads, top_heads=top_heads,
                                           zero_heads=zero_heads)
    chosen_tests, tests_why = select_tests(results, tests, max_tests=max_tests)
    k = next(iter(caps.values())).topk_index.shape[-1]
    grid = [[round(means.get(f"{l}-{h}", 0.0), 4) for h in range(num_heads)] for l in range(num_layers)]
    return {
        "model": summary.get("model", ""), "workdir": root.name,
        "layers": int(num_layers), "heads": int(num_heads), "top_k": int(k), "grid": grid,
        "kept_tests": int(summary.get("tests_kept", sum(r["kept"] for r in results))),
        "threshold": scoring.RETRIEVAL_THRESHOLD,
        "chosen_heads": chosen_heads, "heads_why": heads_why, "tests_why": tests_why,
        "all_tests": len(results),
        "left_out_tests": [r["key"] for r in results if r["key"] not in {c["key"] for c in chosen_tests}],
        "tests": [_test_data(r, caps[r["key"]], chosen_heads, num_layers, num_heads) for r in chosen_tests],
    }
