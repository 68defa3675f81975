"""The self-contained exploration page: `write_page` puts page_data's JSON into one HTML file with its
styles and script inline (nothing fetched; it works from file://; rhead_jax.exploration)."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from rhead_jax import io


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
