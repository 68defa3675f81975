"""The ablation's page: one report per invocation with every group (the unmasked baseline, top-k,
random-k over its seeds, lists), captions, the masked heads with their scores, example answers per
failure class and a provenance block. Built from results.json's object for
rhead_jax.report.write_report(extra_sections=..., meta=..., intro=..., provenance=...)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rhead_jax.ablation.heads import MaskSpec
from rhead_jax.ablation.taxonomy import CATEGORIES, FRAGMENT
from rhead_jax.report import image_html, table
from rhead_jax.report.html import above_one_note, score_html
from rhead_jax.report.provenance import provenance_html

EXAMPLES_PER_CLASS = 2


def _e(x) -> str:
    return html.escape(str(x))


def _metric(results: dict) -> str:
    if results["task"] == "niah":
        return "mean ROUGE-1 recall of the answer x 100"
    return "mean SQuAD F1 x 100" if results["task"].startswith("qa") else "share of problems solved x 100"


def _head_list(heads, scores: dict) -> str:
    def one(h):
        key = f"{h[0]}-{h[1]}"
        return f"<span>{key}" + (f" ({score_html(scores[key])})" if key in scores else "") + "</span>"
    return " ".join(one(h) for h in heads) or "—"


def _heads_html(g: dict, scores: dict) -> str:
    hs = g["masked_heads"]
    if g["kind"] == "random":
        return "<br>".join(f"seed {s}: {_head_list(h, scores)}" for s, h in zip(g["seeds"], hs))
    return _head_list(hs, scores)


def report_meta(results: dict) -> str:
    groups = results["groups"]
    runs = sum(len(g["runs"]) for g in groups.values())
    m = results["mask"]
    return (f"Model <b>{_e(results['model'])}</b> · task <b>{_e(results['task'])}</b> · mask mode "
            f"<b>{_e(m['mode'])}</b>, phase <b>{_e(m['phase'])}</b> · {len(groups)} mask group"
            f"{'s' if len(groups) != 1 else ''}, {runs} run{'s' if runs != 1 else ''}")


def report_intro(results: dict) -> str:
    base = ("the unmasked baseline (<i>none</i>) is run once and shown next to every masked group"
            if results.get("baseline") else "no unmasked baseline in this run (--nobaseline)")
    ranks = results.get("rankings")
    top = ("<i>top:K</i> masks the K best heads of the head-score file" if not ranks else
           "<i>top:K@NAME</i> masks the K best query heads of the ranking NAME (" +
           ", ".join(f"{_e(r['name'])}: {_e(Path(r['path']).name)}" for r in ranks) + "; a KV-head ranking masks "
           "the query heads of its best KV heads, in order, until K)")
    pool = "" if not ranks else f" in the first ranking, {_e(ranks[0]['name'])},"
    return (f"Accuracy of the model on the same tests with attention heads masked; {base}. Accuracy is the "
            f"{_metric(results)}. {top}; <i>random:K</i> masks K heads drawn per seed from those scoring ≤ "
            f"{results['retrieval_threshold']}{pool} (never retrieval heads), the control. The paper's finding: "
            "masking the retrieval heads breaks needle retrieval, masking as many random heads does not.")


def _groups_section(results: dict, scores: dict) -> str:
    niah = results["task"] == "niah"
    rows = []
    for g in results["groups"].values():
        n = len(g["runs"])
        std = f"{100 * g['accuracy_std']:.1f}" if n > 1 else "— (one run)"
        seeds = f"{n} (seeds {', '.join(map(str, g['seeds']))})" if g["kind"] == "random" else str(n)
        cats = " ".join(f"{c}: {g['categories'][c]}" for c in CATEGORIES) if niah else ""
        rows.append([_e(g["spec"]), seeds, g["tests"], f"{100 * g['accuracy']:.1f}", std,
                     ", ".join(f"{k} {100 * v:.1f}" for k, v in g["metrics"].items()),
                     *([f'<div class="heads">{cats}</div>'] if niah else []),
                     f'<div class="heads">{_heads_html(g, scores)}</div>'])
    header = ["mask", "runs", "tests", "accuracy", "std over seeds", "metrics",
              *(["answers (taxonomy)"] if niah else []),
              "masked heads (mean score in the scores file)" if not results.get("rankings") else
              f"masked heads (score in ranking {results['rankings'][0]['name']})"]
    note = ('<p class="note">One row per mask group. A group with several runs (random:K, one per seed) shows '
            "the mean over its runs and the standard deviation over seeds; a group with one run has no spread "
            "to show. “tests” counts all tests of the group's runs.</p>")
    above = above_one_note({"scores file": [(h, s) for h, s in scores.items() if s > 1.0]})
    return note + table(header, rows, left=(0, 1, len(header) - 1) if not niah else (0, 1, 6, 7)) + above


def _cell_caption(results: dict, g: dict) -> str:
    grid, prompt = results["grid"], results.get("provenance", {}).get("prompt_tokens", {})
    per_cell = grid["needles"] * len(g["runs"])
    what = "one test" if per_cell == 1 else f"the mean of {per_cell} tests ({grid['needles']} needle(s) x " \
                                            f"{len(g['runs'])} run(s))"
    real = "; ".join(f"{L} → {a}" + (f"–{b}" if b != a else "") for L, (a, b) in prompt.items())
    return (f"<b>{_e(g['spec'])}</b>: accuracy {100 * g['accuracy']:.1f}. Each cell is {what} at one context "
            "length and needle depth; the number in it is the ROUGE-1 recall x 100. The x axis is the grid's "
            f"nominal context length; the prompts really hold (nominal → prompt tokens): {real or 'n/a'}.")


def _examples(results: dict) -> str:
    """Up to EXAMPLES_PER_CLASS real answers per taxonomy class; failures from masked runs first."""
    rows = []
    runs = results["runs"]
    order = sorted(runs, key=lambda lbl: runs[lbl]["spec"] == "none")  # masked runs first
    for cat in CATEGORIES:
        seen = 0
        labels = order[::-1] if cat == "correct" else order
        for lbl in labels:
            for inst in runs[lbl]["instances"]:
                if inst["category"] != cat or seen >= EXAMPLES_PER_CLASS:
                    continue
                seen += 1
                resp = inst["response"]
                resp = resp if len(resp) <= 220 else resp[:220] + "…"
                rows.append([_e(cat), _e(lbl), _e(inst["key"]), f"{inst['rouge1_recall']:.2f}",
                             f'<div class="heads">“{_e(resp)}”</div>'])
        if not seen:
            rows.append([_e(cat), "—", "—", "—", '<span class="missing">no answer of this class in this run</span>'])
    return table(["class", "run", "test", "ROUGE-1 recall", "response (as generated)"], rows, left=(0, 1, 2, 4))


def _prompt_table(results: dict) -> str:
    prompt = results.get("provenance", {}).get("prompt_tokens", {})
    rows = [[L, f"{a}" if a == b else f"{a}–{b}"] for L, (a, b) in prompt.items()]
    return table(["nominal length (grid)", "prompt tokens (real)"], rows, left=()) if rows else ""


def report_sections(results: dict, files: dict[str, Path]) -> list[tuple[str, Any]]:
    """The ablation's sections for rhead_jax.report.write_report(extra_sections=...)."""
    niah = results["task"] == "niah"
    scores = results.get("provenance", {}).get("masked_head_scores", {})
    sections: list[tuple[str, Any]] = [("Ablation: accuracy with heads masked", _groups_section(results, scores))]
    if niah:
        figs = []
        for g in results["groups"].values():
            f = files.get(f"heatmap_{MaskSpec.parse(g['spec']).slug}.png")
            if f is not None:
                figs.append(image_html(f, f"{g['spec']} accuracy grid", _cell_caption(results, g), max_w=520))
        if figs:
            sections.append(("Needle in a haystack with heads masked (Fig. 1 style)",
                             figs + [f"<div><h3>Context lengths</h3>{_prompt_table(results)}</div>"]))
        rules = ("<p class=\"note\">Failed answers (recall &lt; 1): <b>empty</b> no words; <b>incomplete</b> "
                 f"≥ half of the answer's content words present, or a verbatim {FRAGMENT}-word fragment of the "
                 "answer; <b>wrong_extraction</b> a run of "
                 f"{results['taxonomy']['extraction_ngram']} consecutive response words occurs verbatim in the "
                 "haystack; <b>hallucination</b> otherwise (rhead_jax/ablation/taxonomy.py). Below: up to "
                 f"{EXAMPLES_PER_CLASS} real answers of each class from this run, masked runs first.</p>")
        sections.append(("Failure taxonomy", rules + _examples(results)))
    if results.get("sweep_k"):
        t = results["sweep_k"]
        several = len(t["seeds"]) > 1
        names = t.get("rankings")

        def rnd(r):
            if not several:
                return f"{100 * r['random']:.1f}"
            return (f"{100 * r['random']:.1f} ± {100 * r['random_std']:.1f} "
                    f"[{100 * r['random_min']:.1f}–{100 * r['random_max']:.1f}]")

        tops = [[f"{100 * r['by_ranking'][n]:.1f}" for n in names] if names else [f"{100 * r['top']:.1f}"]
                for r in t["rows"]]
        trows = [[r["k"], *top, rnd(r)] for r, top in zip(t["rows"], tops)]
        base = t.get("baseline")
        cap = (f"Accuracy ({_metric(results)}) against the number of masked query heads k"
               + (f"; dotted: no head masked ({100 * base:.1f}), run once" if base is not None else "")
               + ". " + (f"Random: mean over {len(t['seeds'])} seeds, shaded from the lowest to the highest seed."
                         if several else "Random: one seed."))
        if names:
            cap += (" One line per ranking: its top-k query heads masked (a KV-head ranking: the query heads of "
                    "its best KV heads, in order, until k; rhead_jax.rankings).")
        header = ["k", *([f"top-k of {n}" for n in names] if names else ["top-k retrieval heads"]),
                  "k random heads" + (" (mean ± std [min–max])" if several else "")]
        title = ("Which ranking is causal: accuracy vs number of masked heads" if names
                 else "Accuracy vs number of masked heads: top-k vs random")
        sections.append((title, [image_html(files["sweep_k.png"], "top-k vs random", cap, max_w=680),
                                 table(header, trows, left=())]))
    return sections


def report_provenance(results: dict, run: dict | None = None) -> str:
    p = results.get("provenance", {})
    files = [p["scores"]] if p.get("scores") else list(p.get("rankings") or [])
    g = results.get("grid")
    items = [("model", _e(f"{p['model']['name']} ({p['model']['path']}), dtype {p['model']['dtype']}")),
             ("task", _e(results["task"])),
             ("mask", _e(f"{results['mask']['spec']}, mode {results['mask']['mode']}, phase "
                         f"{results['mask']['phase']}; seeds {results['seeds']}; random heads from those ≤ "
                         f"{results['retrieval_threshold']}")),
             ("head scores", _e(p["scores"]["path"] + f" ({p['scores']['tests']} tests per head)")
              if p.get("scores") else
              _e("; ".join(f"{r['ranking']}: {r['path']} ({r['kind']} heads, {r['shape'][0]} x {r['shape'][1]})"
                           for r in p["rankings"])) if p.get("rankings") else "none (no file needed)")]
    if g:
        items += [("needles", _e(f"{p['needles']} ({g['needles']} needles)")), ("haystack", _e(p["haystack"])),
                  ("grid", _e(f"nominal lengths {g['lengths']} x depths {g['depths']} %")),
                  ("prompt tokens", _e("; ".join(f"nominal {L}: {a}" + (f"–{b}" if b != a else "")
                                            for L, (a, b) in p["prompt_tokens"].items())))]
    items += [("max new tokens", _e(p["max_new_tokens"])), ("faithful mode", _e(p["faithful"])),
              ("batch size", _e(p["batch_size"]))]
    if p.get("masked_head_scores"):
        items.append(("masked heads' mean scores" if not p.get("masked_head_scores_ranking") else
                      f"masked heads' scores in {_e(p['masked_head_scores_ranking'])}",
                      '<div class="heads">' + _head_list([k.split("-") for k in p["masked_head_scores"]],
                                                         p["masked_head_scores"]) + "</div>"))
    return ('<p class="note">What these numbers depend on (also under "provenance" in results.json), the '
            "command and the software.</p>" + provenance_html(files, run, items))
