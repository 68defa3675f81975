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
