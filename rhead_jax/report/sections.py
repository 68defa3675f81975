"""The analysis report's own sections (colour scale, cross-model top-k overlap) and its provenance block,
built from provenance.json's object (rhead_jax.analysis.analyze)."""
from __future__ import annotations

import html

from rhead_jax.report.html import table
from rhead_jax.report.provenance import provenance_html


def _e(x) -> str:
    return html.escape(str(x))


def overlap_table(overlap: dict) -> str:
    """files x files: how many of the top-k heads two files share (— where their heads differ)."""
    names, k = overlap["files"], overlap["k"]
    rows = [[f"<b>{_e(a)}</b>", *("—" if v is None else (f"<b>{v}</b>" if i == j else str(v))
                                  for j, v in enumerate(row))]
            for i, (a, row) in enumerate(zip(names, overlap["matrix"]))]
    return table([f"top-{k} shared with →", *names], rows)


def analysis_sections(prov: dict, pairs_source: str, k: int) -> list[tuple[str, str]]:
    scale = prov["colour_scale"]
    above = {n: hs for n, hs in prov["above_one"].items() if hs}
    if scale["shared"]:
        txt = (f"Every heatmap below uses one colour scale, from 0 to <b>{scale['max']:.3f}</b> (the largest mean "
               "score over all files), so equal colours mean equal scores across models.")
    else:
        txt = "Each heatmap has its own colour scale (0 to that file's largest mean): compare colours within a file only."
    if above:
        txt += (" Heads whose mean is above 1 are hatched in the heatmaps and marked † in the tables "
                f"({sum(len(v) for v in above.values())} in {len(above)} file(s)); "
                'why a mean can exceed 1: <a href="#s-above-one">the note under the overview</a>.')
    parts = [("Colour scale", f'<p class="note">{txt}</p>')]
    if len(prov["overlap"]["files"]) > 1:
        note = (f'<p class="note">How many of each model\'s top-{k} heads (by mean score) are also in another '
                "model's top-k; the diagonal is k. Heads are compared by layer and query-head index, so only files "
                "with the same heads are compared (— otherwise). The <i>Model pairs</i> section below shows the "
                f"pairs {_e(pairs_source)} with the shared heads and the Spearman correlation of all heads.</p>")
        parts.append((f"Top-{k} overlap across models", note + overlap_table(prov["overlap"])))
    return parts


def analysis_provenance(prov: dict) -> str:
    files = list(prov["files"]) + ([prov["results"]] if prov.get("results") else [])
    items = [("pairs", _e(prov["pairs"])),
             ("colour scale", "shared, 0 to %.3f" % prov["colour_scale"]["max"] if prov["colour_scale"]["shared"]
              else "per file")]
    return ('<p class="note">The input files as read (a README.md next to a file is named: it says where the '
            "scores came from), the command and the software; all of it is in provenance.json.</p>"
            + provenance_html(files, prov["run"], items))


LEVEL_TEXT = {"query": "per query head", "kv": "per KV head"}


def _overlap_cell(o: dict) -> str:
    ov = o["overlap"]
    ov_txt = f"{ov:.0f}" if abs(ov - round(ov)) < 1e-9 else f"{ov:.1f}"
    ties = " ⁂" if any(o["ties"]) else ""
    return f"{ov_txt} / {o['k']}{ties} <small>(chance {o['chance']:.1f})</small>"


def ranking_pairs_table(cmp: dict) -> str:
    """One row per comparable pair and level: heads compared, Spearman, top-k overlap for each k."""
    rows = []
    for p in cmp["pairs"]:
        for level, lv in p["levels"].items():
            rows.append([_e(p["a"]), _e(p["b"]), _e(LEVEL_TEXT[level]), lv["heads"],
                         "?" if lv["group_size"] is None else lv["group_size"],
                         "n/a" if lv["spearman"] is None else f"{lv['spearman']:.3f}",
                         *(_overlap_cell(o) for o in lv["overlap"]), _e(p["note"])])
    skipped = [f"{_e(p['a'])} vs {_e(p['b'])} ({_e(p['note'])})" for p in cmp["pairs"] if not p["levels"]]
    header = ["ranking A", "ranking B", "level", "heads", "G", "Spearman ρ", *(f"top-{k}" for k in cmp["k"]), "note"]
    return (table(header, rows, left=(0, 1, 2, len(header) - 1))
            + (f'<p class="note">Not compared (another model\'s shape): {"; ".join(skipped)}.</p>' if skipped else ""))


def ranking_sections(out_dir, cmp: dict | None, gate_files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The comparison of every two rankings (rankings.json) and the gate files' heat maps."""
    from pathlib import Path

    from rhead_jax.report.html import image_html

    parts = []
    if cmp is not None and any(p["levels"] for p in cmp["pairs"]):
        groups = ", ".join(f"{_e(r['name'])} G={r['group_size'] if r['group_size'] else '?'}"
                           for r in cmp["rankings"])
        note = ('<p class="note">Every two rankings of one model, at the levels their shapes allow. <b>Per query '
                "head</b>: KV-head rankings (gate files) repeated over the G query heads that read each KV head. "
                "<b>Per KV head</b>: query-head rankings reduced to the <b>max</b> over the KV head's G query heads — "
                "a KV head's cache can be dropped only if none of its query heads retrieves, and that is what a "
                "per-KV gate decides. Spearman ρ: rank correlation of all heads' scores (average ranks for ties). "
                "Top-k overlap: heads in both top-k sets; where heads tie at the k-th score (⁂; gates clipped to 1 "
                "often do) it is the expected overlap with the tie broken at random. Chance = k²/N. With G = 1 "
                f"(MHA) the two levels coincide and are given once. Group sizes: {groups} "
                "(given, or inferred from a gate file and a head-score file of the same depth: H / K). "
                "All numbers are in rankings.json.</p>")
        imgs = [image_html(Path(out_dir) / f"rankings_{level}.png", f"rankings {level}",
                           f"{LEVEL_TEXT[level].capitalize()}: Spearman ρ and top-k overlap / k of every two "
                           "rankings; grey: not comparable (another model or shape).", max_w=1060)
                for level in cmp["matrix"]]
        parts.append(("Ranking comparison", note + "".join(imgs) + ranking_pairs_table(cmp)))
    if gate_files:
        figs = [image_html(Path(out_dir) / f"{stem}_gates.png", f"{name} gates",
                           f"{_e(name)}: the gate of every KV head (rows: layers), clipped to [0, 1]; high = the "
                           "head keeps its full KV cache.", max_w=520, max_h=520) for name, stem in gate_files]
        parts.append(("Gate files", figs))
    return parts
