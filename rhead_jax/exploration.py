"""What each head copied, step by step: one self-contained page from a sweep with captures
(config.sweep.save_captures; rhead_jax.captures). The command is rhead_jax.explore.

    data = page_data(workdir, tests=None, heads=None)    # what goes on the page, as JSON-able data
    path = write_page(data, out_dir)                      # out_dir/explore.html

The page (inline script and styles, nothing fetched; it works from file://): a list of tests; the
prompt around the needle and the generated answer as tokens, the answer span marked; the layer x
head grid coloured by the mean retrieval score (head_scores.json); picking a head shows, for each
generated token, the position the head attended most (top 1, the top k with weights on hover), the
copy events marked; picking a generated token lists every head that copied it at that step.

The copy events are computed here, in Python, with rhead_jax.scoring's own rule
(`captures.TestCapture.copy_events` -> `scoring.copy_events`) and embedded: the page draws them, it
does not decide them, so the page and the score cannot disagree (a test checks the events against
results.jsonl's copy counts, and tests/test_explore_browser.py checks the page's against both).

Bounded size: the step-by-step captures of `heads` only (default: the `top_heads` best by mean score
plus `zero_heads` heads that never copy, for contrast) and of `tests` (default: all, at most
`max_tests`, evenly spaced over the grid); every head's copy events (sparse) are on the page for
every test shown. The page says what it left out.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
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


def write_page(data: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """out_dir/explore.html: the page of `data` (page_data's), one file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # "<" only occurs inside JSON strings: as \u003c no "</script>" or "<!--" can end the script element
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    title = f"What each head copied: {data['model']}" if data["model"] else "What each head copied"
    page = (TEMPLATE.replace("%TITLE%", html.escape(title)).replace("%CSS%", CSS).replace("%JS%", JS)
            .replace("%DATA%", payload))
    path = out / "explore.html"
    io.atomic_write_text(path, page)
    return path


CSS = """
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e4e6ea; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #444; }
p.meta, p.note { color: #555; font-size: 13px; margin: 4px 0 10px; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #dde1e6; padding: 2px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; font-weight: 600; }
td.l, th.l { text-align: left; }
#tests tbody tr { cursor: pointer; }
#tests tbody tr:hover td { background: #eef4fb; }
#tests tr.sel td { background: #dbe8f7; font-weight: 600; }
.drop { color: #a33; }
#grid { border-collapse: separate; border-spacing: 1px; font-size: 10px; }
#grid td, #grid th { border: 0; padding: 0; width: 18px; height: 14px; text-align: center; }
#grid th { background: none; color: #777; font-weight: normal; }
#grid td { cursor: pointer; outline: 1px solid #e6e6e6; }
#grid td.in { outline: 2px solid #3182bd; }
#grid td.sel { outline: 3px solid #111; }
#grid td.copier { box-shadow: inset 0 0 0 3px #d62728; }
.legend { font-size: 12px; color: #555; display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: center;
          margin: 6px 0; }
.sw { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
          white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #e4e6ea; padding: 8px;
          border-radius: 4px; background: #fcfcfd; }
.tok, .gtok { border-radius: 3px; padding: 1px 0; }
.tok.needle { background: #fff3c4; }
.tok.ans { background: #ffd37a; text-decoration: underline; text-decoration-color: #b36b00; }
.tok.hit, .gtok.hit { background: #6baed6; color: #fff; }
.tok.ans.hit { background: #2171b5; }
.gtok { cursor: pointer; border: 1px solid transparent; }
.gtok.copy { border-color: #d62728; background: #fde0dd; }
.gtok.sel { outline: 2px solid #111; }
.gap { color: #999; }
sup.st { font-size: 9px; color: #08519c; margin-left: 1px; }
#steps td.copy { color: #d62728; font-weight: 700; }
#steps tr.copy td { background: #fde0dd; }
.pill { display: inline-block; padding: 0 6px; margin: 2px 3px 2px 0; border-radius: 8px; background: #eee;
        font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; cursor: pointer; }
.pill.in { background: #c6dbef; }
.warn { color: #a33; }
.cols { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.cols > section { flex: 1 1 340px; min-width: 0; }
.cols > #s-heads { flex: 0 1 auto; max-width: 100%; }
.box { max-height: 560px; overflow: auto; }
#heads-note { max-width: 420px; }
@media (max-width: 600px) { main { padding: 12px 10px 32px; } h1 { font-size: 19px; } }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title><style>%CSS%</style></head>
<body><main>
<h1>%TITLE%</h1>
<p class="meta" id="meta"></p>
<p class="note">At each decode step a head's <b>copy event</b> is its most attended position (top 1) lying in
the needle's answer span and holding the token just generated; each event adds 1 / (span length) to the head's
score on that test (rhead_jax.scoring). Pick a test, then a head in the grid; click a generated token to see every
head that copied it.</p>
<div class="cols">
<section id="s-tests"><h2>Tests</h2><div class="scroll box"><table id="tests"></table></div></section>
<section id="s-heads"><h2>Heads</h2>
<p class="note" id="heads-note"></p><div class="legend" id="legend"></div>
<div class="scroll box"><table id="grid"></table></div></section>
</div>
<section id="s-context"><h2>Context and answer</h2>
<p class="meta" id="test-info"></p>
<h3>The prompt around the needle</h3><div class="tokens" id="context"></div>
<div id="elsewhere-box"><h3>Attended elsewhere in the prompt</h3><div class="tokens" id="elsewhere"></div></div>
<h3>Generated answer</h3><div class="tokens" id="generated"></div></section>
<section id="s-head"><h2 id="head-title">Head</h2><p class="meta" id="head-info"></p>
<div class="scroll"><table id="steps"></table></div></section>
<section id="s-token"><h2>Who copied it</h2><p class="meta" id="copiers-info">Click a generated token.</p>
<div id="copiers"></div></section>
</main>
<script type="application/json" id="data">%DATA%</script>
<script>%JS%</script>
</body></html>
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, attrs, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const show = (t) => t.replace(/\n/g, "\u21b5\n");
const maxMean = Math.max(1e-9, ...D.grid.flat());
const colour = (m) => {
  if (m <= 0) return "#f4f4f4";
  const x = Math.min(1, m / maxMean);
  return `hsl(${28 - 20 * x}, 90%, ${92 - 52 * x}%)`;
};
const S = { test: null, head: null, step: null };

function meta() {
  const nHeads = D.layers * D.heads, nIn = D.chosen_heads.length;
  const lo = D.left_out_tests;
  $("meta").textContent = `${D.workdir} \u00b7 ${D.layers} layers \u00d7 ${D.heads} heads \u00b7 top ${D.top_k} ` +
    `positions captured per head and step \u00b7 ${D.tests.length} of ${D.all_tests} tests (${D.tests_why})` +
    (lo.length ? `; left out: ${lo.length} tests (${lo.slice(0, 8).join(", ")}${lo.length > 8 ? ", \u2026" : ""})` : "") +
    ` \u00b7 step by step: ${nIn} of ${nHeads} heads (${D.heads_why})` +
    (nHeads > nIn ? `; the other ${nHeads - nIn} are in the grid with their score and in \u201cwho copied it\u201d` +
      `; python -m rhead_jax.explore --heads L-H,... adds them` : "");
  $("heads-note").textContent = `Colour: mean retrieval score over the ${D.kept_tests} kept tests (head_scores.json); ` +
    `outlined in blue: heads with their step-by-step captures on this page. Rows: layers, columns: heads.`;
  const lg = $("legend");
  for (const [lbl, m] of [["0", 0], [(maxMean / 4).toFixed(2), maxMean / 4], [(maxMean / 2).toFixed(2), maxMean / 2],
                           [maxMean.toFixed(2), maxMean]]) {
    const s = el("span"); s.append(el("span", { class: "sw", style: `background:${colour(m)}` }), lbl); lg.append(s);
  }
}

function testsTable() {
  const t = $("tests");
  const head = el("tr");
  for (const h of ["test", "length", "depth", "needle", "ROUGE-1", "kept"]) head.append(el("th", { class: h === "test" || h === "needle" ? "l" : "" }, h));
  const thead = el("thead"); thead.append(head); t.append(thead);
  const body = el("tbody");
  for (const r of D.tests) {
    const tr = el("tr", { "data-key": r.key });
    tr.append(el("td", { class: "l" }, r.key), el("td", {}, r.length), el("td", {}, r.depth + "%"),
              el("td", { class: "l", title: r.needle }, r.needle.length > 48 ? r.needle.slice(0, 47) + "\u2026" : r.needle),
              el("td", {}, r.rouge.toFixed(2)), el("td", { class: r.kept ? "" : "drop" }, r.kept ? "kept" : "dropped"));
    tr.addEventListener("click", () => pickTest(r.key));
    body.append(tr);
  }
  t.append(body);
}

function grid() {
  const g = $("grid");
  const hr = el("tr"); hr.append(el("th", {}, ""));
  for (let h = 0; h < D.heads; h++) hr.append(el("th", {}, h));
  g.append(hr);
  const chosen = new Set(D.chosen_heads);
  for (let l = 0; l < D.layers; l++) {
    const tr = el("tr"); tr.append(el("th", {}, l));
    for (let h = 0; h < D.heads; h++) {
      const key = `${l}-${h}`, m = D.grid[l][h];
      const td = el("td", { "data-head": key, title: `${key}: mean score ${m.toFixed(3)}`,
                            style: `background:${colour(m)}`, class: chosen.has(key) ? "in" : "" });
      td.addEventListener("click", () => pickHead(key));
      tr.append(td);
    }
    g.append(tr);
  }
}

const T = () => D.tests.find((t) => t.key === S.test);

function pickTest(key) {
  S.test = key; S.step = null;
  for (const tr of document.querySelectorAll("#tests tbody tr")) tr.classList.toggle("sel", tr.dataset.key === key);
  const t = T();
  $("test-info").textContent = `${t.key}: ${t.length} tokens, needle at depth ${t.depth}% \u00b7 question: ${t.question} ` +
    `\u00b7 expected: ${t.answer} \u00b7 answered: ${t.response} \u00b7 ROUGE-1 recall ${t.rouge.toFixed(2)} ` +
    `(${t.kept ? "kept" : "dropped by the ROUGE gate: its scores are not in head_scores.json"}) \u00b7 answer span: ` +
    `positions ${t.span[0]}\u2013${t.span[1] - 1} (${t.span[1] - t.span[0]} tokens)`;
  const c = $("context"); c.textContent = "";
  if (t.window[0] > 0) c.append(el("span", { class: "gap" }, `\u2026 ${t.window[0]} tokens \u2026 `));
  t.context.forEach((txt, i) => {
    const p = t.window[0] + i;
    const cls = ["tok"];
    if (p >= t.needle_span[0] && p < t.needle_span[1]) cls.push("needle");
    if (p >= t.span[0] && p < t.span[1]) cls.push("ans");
    c.append(el("span", { class: cls.join(" "), "data-pos": p, title: `position ${p}` }, show(txt)));
  });
  if (t.window[1] < t.prompt_len) c.append(el("span", { class: "gap" }, ` \u2026 ${t.prompt_len - t.window[1]} tokens \u2026`));
  const g = $("generated"); g.textContent = "";
  t.generated.forEach((txt, n) => {
    const s = el("span", { class: "gtok", "data-step": n, "data-pos": t.prompt_len + n,
                           title: `step ${n} (position ${t.prompt_len + n}): click for the heads that copied it` }, show(txt));
    s.addEventListener("click", () => pickStep(n));
    g.append(s);
  });
  render();
}

function pickHead(key) { S.head = key; render(); }
function pickStep(n) { S.step = n; render(); }

function tokenAt(t, p) {
  if (p < 0) return "";
  if (p >= t.prompt_len) return t.generated[p - t.prompt_len] ?? "";
  if (p >= t.window[0] && p < t.window[1]) return t.context[p - t.window[0]];
  return t.elsewhere[String(p)] ?? "";
}

function render() {
  const t = T();
  for (const td of document.querySelectorAll("#grid td")) td.classList.toggle("sel", td.dataset.head === S.head);
  for (const s of document.querySelectorAll(".hit")) { s.classList.remove("hit"); s.removeAttribute("data-steps"); }
  for (const s of document.querySelectorAll("sup.st")) s.remove();
  const ew = $("elsewhere"); ew.textContent = ""; $("elsewhere-box").hidden = true;
  const steps = $("steps"); steps.textContent = "";
  const info = $("head-info");
  for (const s of document.querySelectorAll(".gtok")) s.classList.toggle("sel", Number(s.dataset.step) === S.step);
  copiers(t);
  if (!S.head || !t) { $("head-title").textContent = "Head"; info.textContent = "Pick a head in the grid."; return; }
  $("head-title").textContent = `Head ${S.head}`;
  if (!(S.head in t.top)) {
    info.removeAttribute("data-events");
    info.innerHTML = "";
    info.append(el("span", { class: "warn" }, `Head ${S.head} (mean score ${D.grid[S.head.split("-")[0]][S.head.split("-")[1]].toFixed(3)}) ` +
      `is not on this page step by step: make the page with --heads ${S.head} (it appears in \u201cwho copied it\u201d).`));
    return;
  }
  const top = t.top[S.head], w = t.weight[S.head], ev = new Set(t.events[S.head]);
  const spanLen = t.span[1] - t.span[0];
  info.dataset.events = ev.size; info.dataset.spanLen = spanLen; info.dataset.score = t.scores[S.head];
  info.dataset.count = t.counts[S.head];
  info.textContent = `${t.key}: ${ev.size} copy event${ev.size === 1 ? "" : "s"} \u00d7 1/${spanLen} = ` +
    `${(ev.size / spanLen).toFixed(3)}, this test's score of ${S.head} (results.jsonl: ${Number(t.scores[S.head]).toFixed(3)}); ` +
    `mean over the kept tests ${D.grid[S.head.split("-")[0]][S.head.split("-")[1]].toFixed(3)}. ` +
    `Blue tokens: where the head looked (top 1; the small numbers are the steps).`;
  const hr = el("tr");
  for (const h of ["step", "generated", "top-1 position", "token there", "weight", `top ${D.top_k} (hover)`, "copy"])
    hr.append(el("th", { class: h === "generated" || h === "token there" || h.startsWith("top ") ? "l" : "" }, h));
  steps.append(hr);
  const mark = (p, n) => {
    let s = document.querySelector(`#context .tok[data-pos="${p}"], #generated .gtok[data-pos="${p}"], #elsewhere .tok[data-pos="${p}"]`);
    if (!s && p >= 0 && p < t.prompt_len) {
      s = el("span", { class: "tok", "data-pos": p, title: `position ${p}` }, show(tokenAt(t, p)));
      if (ew.childNodes.length) ew.append(" ");
      ew.append(el("span", { class: "gap" }, `${p}:`), s);
      $("elsewhere-box").hidden = false;
    }
    if (!s) return;
    s.classList.add("hit");
    s.dataset.steps = (s.dataset.steps ? s.dataset.steps + "," : "") + n;
    s.append(el("sup", { class: "st" }, n));
  };
  top.forEach((ks, n) => {
    const p = ks[0];
    const copy = ev.has(n);
    const tr = el("tr", { "data-step": n, "data-top1": p, "data-copy": copy ? "1" : "0", class: copy ? "copy" : "" });
    const k = ks.map((q, i) => `${q} ${JSON.stringify(tokenAt(t, q))} ${w[n][i].toFixed(3)}`).join("\n");
    tr.append(el("td", {}, n), el("td", { class: "l" }, show(t.generated[n])), el("td", {}, p),
              el("td", { class: "l" }, show(tokenAt(t, p))), el("td", {}, w[n][0].toFixed(3)),
              el("td", { class: "l", title: k }, ks.slice(1).join(", ")), el("td", { class: copy ? "copy" : "" }, copy ? "\u2713" : ""));
    steps.append(tr);
    mark(p, n);
  });
  for (const s of document.querySelectorAll(".gtok")) s.classList.toggle("copy", ev.has(Number(s.dataset.step)));
}

function copiers(t) {
  const box = $("copiers"); box.textContent = "";
  for (const td of document.querySelectorAll("#grid td.copier")) td.classList.remove("copier");
  if (!t || S.step === null) { $("copiers-info").textContent = "Click a generated token."; return; }
  const heads = t.copiers[S.step] || [];
  $("copiers-info").textContent = `Step ${S.step} of ${t.key}, token ${JSON.stringify(t.generated[S.step])}: ` +
    (heads.length ? `${heads.length} head${heads.length === 1 ? "" : "s"} copied it (outlined in red in the grid)` :
     "no head copied it (no head's top-1 position held this token in the answer span)");
  box.dataset.step = S.step;
  for (const h of heads) {
    const p = el("span", { class: "pill" + (h in t.top ? " in" : ""), "data-head": h }, h);
    p.addEventListener("click", () => pickHead(h));
    box.append(p);
    const td = document.querySelector(`#grid td[data-head="${h}"]`);
    if (td) td.classList.add("copier");
  }
}

meta(); testsTable(); grid();
if (D.tests.length) {
  pickTest(D.tests[0].key);
  if (D.chosen_heads.length) {
    pickHead(D.chosen_heads[0]);
    const ev = D.tests[0].events[D.chosen_heads[0]];
    if (ev.length) pickStep(ev[0]);
  }
}
"""
