"""The report's section on how sure the scores are (stability.json, rhead_jax.stability): the convergence
curve, each file's intervals on its ranking, the heads whose call is uncertain, and a note up front when a
sweep kept few tests (rhead_jax.diagnosis)."""
from __future__ import annotations

import html
from pathlib import Path

from rhead_jax import io, stability
from rhead_jax.report import plots
from rhead_jax.report.html import image_html, table


def _e(x) -> str:
    return html.escape(str(x))


def thin_section(dynamic: dict | None) -> list[tuple[str, str]]:
    """A warning section when the --results sweep kept fewer than a quarter of its tests; else []."""
    from rhead_jax.diagnosis import THIN_SHARE

    if not dynamic or dynamic["kept"] >= THIN_SHARE * dynamic["tests"]:
        return []
    return [("Few tests kept", f'<p class="note"><b>Only {dynamic["kept"]} of {dynamic["tests"]} tests '
             f'({100 * dynamic["kept"] / max(dynamic["tests"], 1):.0f}%) passed the ROUGE gate.</b> Every score of '
             "that sweep is a mean over those tests, so its ranking is uncertain: see the intervals below. The "
             "sweep's summary.json (\"gate\") quotes the model's closest misses; the likely causes are the chat "
             "template, the newline rule of base models, a context beyond the model, or needles whose question "
             "they do not answer.</p>")]


def stability_sections(out_dir, entries: dict, stems: dict) -> list[tuple[str, str]]:
    """One section: the convergence plot and a table over files, then each file's interval plot."""
    shown = {n: e for n, e in entries.items() if e.get("tests")}
    if not shown:
        return []
    out = Path(out_dir)
    rows = []
    for name, e in shown.items():
        conv = " ".join(f"<span>{n}: {v:.1f}</span>" for n, v in e["convergence"].items())
        lo, hi = e["retrieval_heads_range"]
        need = e["tests_for_overlap"].get(str(e["k"] - 1))
        rows.append([_e(name), e["tests"], e["k"], f'<div class="heads">{conv}</div>',
                     "—" if need is None else need, f"{e['retrieval_heads']} [{lo}, {hi}]",
                     f'<div class="heads">{" ".join(f"<span>{_e(h)}</span>" for h in e["straddle"]) or "none"}</div>'])
    k = next(iter(shown.values()))["k"]
    note = (f'<p class="note">How sure each score is, by resampling the tests. <b>Interval</b>: the 95% percentile '
            f"bootstrap interval of a head's mean over its file's tests ({next(iter(shown.values()))['resamples']} "
            "resamples of the tests with replacement, seeded). <b>Uncertain heads</b>: those whose interval contains "
            "the retrieval threshold 0.1; the count of retrieval heads is then a range, from the heads whose whole "
            "interval is above 0.1 to those whose upper end is. <b>Convergence</b>: the mean overlap of the top "
            f"{k} of n tests drawn at random (without replacement) with the top {k} of all tests; <b>tests for "
            f"{k - 1}/{k}</b>: the fewest tests (in steps of 5) whose mean overlap reaches {k - 1}. All numbers are "
            "in stability.json.</p>")
    body = note + image_html(out / "stability_convergence.png", "convergence", max_w=640)
    body += table(["file", "tests", "k", f"mean top-{k} overlap of n tests (n: overlap)", f"tests for {k - 1}/{k}",
                   "retrieval heads [range]", "uncertain heads (interval contains 0.1)"], rows, left=(0, 3, 6))
    for name in shown:
        body += f"<h3>{_e(name)}</h3>" + image_html(
            out / f"{stems[name]}_intervals.png", f"{name} intervals",
            "The top heads by mean score with their 95% bootstrap intervals; orange: the interval contains the "
            "retrieval threshold (dashed).", max_w=1060)
    return [("How sure are the scores", body)]


def write_stability(data: dict, shown: dict, out: Path) -> dict:
    """stability.json (rhead_jax.stability, one entry per head-score file; {"tests": 0} for a file of
    empty lists), its plots, and the intervals of each file's top heads for the report."""
    stab = {}
    for name, hs in data.items():
        if not len(next(iter(hs.values()))):
            stab[name] = {"tests": 0, "note": "no tests: every list is empty (a sweep that kept no test)"}
            continue
        e = stab[name] = stability.stability(hs)
        shown[name].update(ci=e["ci"], top_k_frequency=e["top_k_frequency"], stability_k=e["k"])
        plots.plot_intervals(e, out / f"{shown[name]['stem']}_intervals.png",
                             f"{name}: top heads, 95% bootstrap intervals over {e['tests']} tests")
    if any(e["tests"] for e in stab.values()):
        plots.plot_convergence({n: e for n, e in stab.items() if e["tests"]}, out / "stability_convergence.png")
    io.atomic_write_json(out / "stability.json", stab, indent=1, end="\n")
    return stab
