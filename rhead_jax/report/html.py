"""A self-contained HTML report of a retrieval-head analysis (rhead_jax.analysis and other tools).

`write_report(out_dir, summary, pairs, dynamic, extra_sections=None)` writes `out_dir/report.html`:
one file, images embedded as base64 data URIs, inline CSS, no scripts and nothing fetched from elsewhere.

  summary          summary.json's object: {"<file name>": {"buckets", "layers", "heads", "tests",
                   "retrieval_heads", "top"[, "stem"][, "by_kind": a hybrid model's retrieval heads per
                   layer kind, rhead_jax.report.kinds]}}; each file's `<stem>_heatmap.png` and
                   `<stem>_pie.png` are taken from out_dir when present (stem: the entry's, else the name's).
  pairs            pairs.json's list of {"a", "b", "k", "overlap", "overlap_frac", "spearman"[, "common"]}.
  dynamic          dynamic.json's object or None; `dynamic_activation.png` is taken from out_dir.
  extra_sections   [(title, content), ...] appended at the end. content is an image path (Path, or a str
                   ending in .png/.jpg/.jpeg/.gif/.svg), an HTML fragment (any other str), or a list of those
                   (shown side by side), so other tools (e.g. ablations) can add figures and tables.
  sections         [(title, content), ...] like extra_sections, placed right after the overview (the
                   analysis puts its colour scale and cross-model overlap there).
  meta             the HTML of the line under the title (default: the date and the number of files).
  intro            the HTML of the introductory note (default: what a retrieval score is).
  provenance       an HTML fragment: where the inputs came from, shown as the last section.

Scores above 1 (possible: a head can copy an answer token more than once per test) are printed with
three decimals and a dagger that links to the explanation (`ABOVE_ONE`).

`table(header, rows, left=(0,))` is the one HTML table of every report (extra sections use it too).
"""
from __future__ import annotations

import base64
import datetime
import html
import os
from pathlib import Path
from typing import Iterable, Sequence

from rhead_jax.scoring import BUCKETS as BUCKET_ORDER
from rhead_jax.report.plots import BUCKET_COLORS

BUCKET_TEXT = {
    "=0": "never copies (mean = 0)",
    "(0,0.1]": "rarely copies (0 < mean ≤ 0.1)",
    "(0.1,0.5]": "retrieval head (0.1 < mean ≤ 0.5)",
    ">0.5": "strong retrieval head (mean > 0.5)",
}
ABOVE_ONE = ("A head's score in one test is the number of decode steps at which it copies a token of the "
             "answer span, divided by the span's length: a head that copies a token twice (a repeated answer "
             "word, a repeated answer) scores above 1 in that test, so a mean above 1 is possible and "
             "is not an error.")
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".svg": "image/svg+xml"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; overflow-wrap: anywhere; }
@media (max-width: 600px) { main { padding: 14px 12px 32px; } }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e4e6ea; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #444; }
p.meta { color: #666; font-size: 13px; margin: 0 0 14px; }
p.note { color: #444; font-size: 14px; max-width: 900px; }
nav { font-size: 13px; background: #f3f5f8; padding: 8px 12px; border-radius: 6px; margin: 12px 0;
      display: flex; flex-wrap: wrap; gap: 2px 14px; }
nav a { color: #2b5d9b; text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; display: block; max-width: 100%;
        overflow-x: auto; }
th, td { border: 1px solid #dde1e6; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.l, th.l { text-align: left; }
td { white-space: nowrap; }
.heads span { white-space: nowrap; margin-right: 0.6em; }
tr:nth-child(even) td { background: #fafbfc; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row > div { flex: 0 1 auto; min-width: 0; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e6ea; }
figcaption { font-size: 12px; color: #666; max-width: 520px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border: 1px solid #999;
          vertical-align: baseline; }
.tag { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; color: #fff; }
.tag.on { background: #e6550d; } .tag.ctx { background: #3182bd; }
.missing { color: #a33; font-style: italic; }
.wrap { white-space: normal; max-width: 860px; overflow-wrap: anywhere; text-align: left; }
.heads { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
         max-width: 520px; white-space: normal; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _e(x)


def score_html(x: float, digits: int = 3) -> str:
    """A mean score; above 1 it gets a dagger linking to the explanation (#s-above-one)."""
    if x is not None and x > 1.0:
        return f'{x:.3f}<a href="#s-above-one" title="above 1: see the note">†</a>'
    return _fmt(float(x), digits) if x is not None else "n/a"


def above_one_note(entries: dict) -> str:
    """The explanation of scores above 1 (the anchor #s-above-one), listing them; '' when there are none."""
    items = [f"{_e(name)}: " + ", ".join(f"{_e(h)} ({s:.3f})" for h, s in heads)
             for name, heads in entries.items() if heads]
    if not items:
        return ""
    return (f'<p class="note" id="s-above-one"><b>† Mean scores above 1.</b> {_e(ABOVE_ONE)} Here: '
            + "; ".join(items) + ".</p>")


def _anchor(text: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in str(text))


def data_uri(path: str | os.PathLike) -> str:
    path = Path(path)
    mime = IMAGE_SUFFIXES.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def png_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, None for anything else."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def image_html(path: str | os.PathLike, alt: str, caption: str | None = None,
               max_w: int | None = None, max_h: int | None = None) -> str:
    """An <img> with the file embedded; shown at its natural size, shrunk to fit max_w x max_h pixels."""
    path = Path(path)
    if not path.is_file():
        return f'<p class="missing">image not found: {_e(path.name)}</p>'
    style = ""
    size = png_size(path)
    if size and (max_w or max_h):
        w, h = size
        scale = min(1.0, (max_w or w) / w, (max_h or h) / h)
        style = f' style="width:{round(w * scale)}px"'
    cap = f'<figcaption>{caption}</figcaption>' if caption else ""
    return f'<figure><img src="{data_uri(path)}" alt="{_e(alt)}"{style}>{cap}</figure>'


def _is_image_ref(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and "<" not in x and "\n" not in x and Path(x).suffix.lower() in IMAGE_SUFFIXES


def _content_html(content) -> str:
    if isinstance(content, (list, tuple)):
        return '<div class="row">' + "".join(f"<div>{_content_html(c)}</div>" for c in content) + "</div>"
    if _is_image_ref(content):
        return image_html(content, alt=Path(content).stem, max_w=1060)
    return str(content)


def table(header: Sequence[str], rows: Iterable[Sequence], left: Sequence[int] = (0,)) -> str:
    """An HTML table: header cells are escaped, row cells are HTML fragments inserted as they are
    (escape text yourself); the columns in `left` are left-aligned, the others right-aligned (CSS)."""
    def cell(tag: str, i: int, content) -> str:
        return f'<{tag} class="l">{content}</{tag}>' if i in left else f"<{tag}>{content}</{tag}>"

    th = "".join(cell("th", i, _e(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------ sections
def _overview(summary: dict) -> str:
    rows = []
    for name, e in summary.items():
        b = e["buckets"]
        n = e["layers"] * e["heads"]
        top3 = ", ".join(f"{_e(h)} ({score_html(s, 2)})" for h, s in e["top"][:3])
        rows.append([f'<a href="#{_anchor(name)}">{_e(name)}</a>', f"{e['layers']}×{e['heads']}", e["tests"],
                     *(f"{b[k]:.1f}" for k in BUCKET_ORDER),
                     f"{e['retrieval_heads']} ({100 * e['retrieval_heads'] / n:.1f}%)" if n else e["retrieval_heads"],
                     top3])
    header = ["file", "layers×heads", "tests", *(f"% {k}" for k in BUCKET_ORDER), "retrieval heads", "top 3 heads"]
    return table(header, rows, left=(0, 8))


def _file_section(out_dir: Path, name: str, e: dict) -> str:
    stem = e.get("stem") or Path(name).stem
    n = e["layers"] * e["heads"]
    b = e["buckets"]
    bucket_rows = [[f'<span class="swatch" style="background:{BUCKET_COLORS[k]}"></span>{_e(k)}',
                    _e(BUCKET_TEXT[k]), f"{b[k]:.1f}%", f"{round(b[k] * n / 100)}"] for k in BUCKET_ORDER]
    ci, freq = e.get("ci"), e.get("top_k_frequency")   # rhead_jax.stability (the analysis report)
    top_rows = [[i + 1, _e(h), *map(str, h.split("-")), score_html(s)]
                + ([f"[{ci[h][0]:.3f}, {ci[h][1]:.3f}]", f"{freq.get(h, 0.0):.0%}"] if ci else [])
                for i, (h, s) in enumerate(e["top"])]
    top_header = ["rank", "head", "layer", "head index", "mean score"] + (
        ["95% interval", f"in top {e.get('stability_k', 10)}"] if ci else [])
    scale = e.get("scale_max")
    scale_txt = (f" The colour scale, 0 to {scale:.3f}, is shared by every file of this report, so equal colours "
                 "mean equal scores." if scale is not None else "")
    by_kind = e.get("by_kind")   # a hybrid model's local / global layers (rhead_jax.report.kinds)
    kinds_txt = (" The strip left of the rows marks each layer's kind: G global (full attention, framed rows), "
                 "L local (a sliding window)." if by_kind else "")
    heat = image_html(out_dir / f"{stem}_heatmap.png", f"{name} heatmap",
                      "Mean retrieval score of every head (rows: layers from 0 at the top; columns: heads). "
                      f"Outlined cells are the top heads listed below; hatched cells score above 1.{scale_txt}"
                      f"{kinds_txt}", max_w=600, max_h=520)
    kind_html = ""
    if by_kind:
        rows = [[_e(kind), _e(", ".join(map(str, k["layers"]))), k["heads"], k["retrieval_heads"], f"{k['mean']:.3f}",
                 '<div class="heads">' + " ".join(f"<span>{_e(h)} ({score_html(s, 2)})</span>" for h, s in k["top"])
                 + "</div>"] for kind, k in by_kind.items()]
        kind_html = ("<h3>Retrieval heads by layer kind</h3>"
                     + table(["kind", "layers", "heads", "retrieval heads (mean > 0.1)", "mean score",
                              "its retrieval heads"], rows, left=(0, 1, 5)))
    pie = image_html(out_dir / f"{stem}_pie.png", f"{name} pie",
                     "Share of all heads in each score bucket (paper Fig. 3).", max_w=440)
    return f"""
<section id="{_anchor(name)}">
<h2>{_e(name)}</h2>
<p class="meta">{e['layers']} layers × {e['heads']} heads = {n} heads · {e['tests']} tests per head ·
<b>{e['retrieval_heads']}</b> retrieval heads (mean score &gt; 0.1)</p>
<div class="row"><div>{heat}</div><div>{pie}</div></div>
{kind_html}
<div class="row">
<div><h3>Heads per score bucket</h3>
{table(["bucket", "meaning", "share", "heads"], bucket_rows, left=(0, 1))}</div>
<div><h3>Top {len(e['top'])} heads by mean retrieval score</h3>
{table(top_header, top_rows, left=())}</div>
</div>
</section>"""


def _pairs_section(pairs: Sequence[dict]) -> str:
    rows = []
    for p in pairs:
        common = " ".join(f"<span>{_e(h)}</span>" for h in p.get("common", []))
        rows.append([_e(p["a"]), _e(p["b"]), p["k"], f"{p['overlap']} / {p['k']}", f"{100 * p['overlap_frac']:.0f}%",
                     _fmt(p["spearman"]), f'<div class="heads">{common}</div>'])
    return f"""
<section id="s-pairs">
<h2>Model pairs: are retrieval heads intrinsic?</h2>
<p class="note">The paper finds that a model's retrieval heads survive continued pre-training, chat fine-tuning
and up-cycling to a mixture of experts. For each pair: how many of the top-k heads (by mean score) the two files
share, and the Spearman rank correlation of the mean scores of all heads (1 = the same ordering).</p>
{table(["file A", "file B", "k", "top-k overlap", "overlap", "Spearman ρ", "shared top heads"], rows, left=(0, 1, 6))}
</section>"""


def _rate_cells(d: dict) -> str:
    return " ".join(f"<span>{_e(k)}: {v:.0%}</span>" for k, v in d.items())


def _dynamic_section(out_dir: Path, dyn: dict) -> str:
    thr = dyn.get("always_on_threshold", 0.9)
    head_rows = []
    for d in dyn.get("retrieval", []):
        tag = '<span class="tag on">always-on</span>' if d["class"] == "always-on" \
            else '<span class="tag ctx">context-specific</span>'
        head_rows.append([_e(d["head"]), f"{d['mean']:.3f}", f"{d['activation']:.0%}", tag,
                          f'<div class="heads">{_rate_cells(d.get("by_needle", {}))}</div>',
                          f'<div class="heads">{_rate_cells(d.get("by_length", {}))}</div>'])

    def group_table(key: str, label: str) -> str:
        rows = [[_e(k), g["tests"], g["kept"], f"{g['mean_active_heads']:.1f}",
                 f"{g['mean_active_retrieval_heads']:.1f}", g["retrieval_heads_active_ever"]]
                for k, g in dyn.get(key, {}).items()]
        return table([label, "tests", "kept", "active heads / test", "active retrieval heads / test",
                       "retrieval heads active at least once"], rows)

    src = f" from <code>{_e(dyn['source'])}</code>" if dyn.get("source") else ""
    return f"""
<section id="s-dynamic">
<h2>Dynamic activation</h2>
<p class="note">Per-test scores{src}: {dyn['kept']} of {dyn['tests']} tests passed the ROUGE gate and are used.
A head is <i>active</i> in a test when its score there is above 0. Of the {len(dyn.get('retrieval', []))}
retrieval heads (mean &gt; {dyn.get('threshold', 0.1)}), <b>{len(dyn.get('always_on', []))}</b> are
<span class="tag on">always-on</span> (active in at least {thr:.0%} of the kept tests) and
<b>{len(dyn.get('context_specific', []))}</b> are <span class="tag ctx">context-specific</span>.</p>
{image_html(out_dir / "dynamic_activation.png", "dynamic activation",
            "Top: activation rate of each head that was active at least once, sorted; dashed line: the always-on "
            "threshold. Bottom: activation rate of each retrieval head per context length.", max_w=1060)}
<h3>Retrieval heads</h3>
{table(["head", "mean score", "active in", "class", "by needle", "by context length"], head_rows, left=(0, 3, 4, 5))}
<div class="row">
<div><h3>By needle</h3>{group_table("by_needle", "needle")}</div>
<div><h3>By context length</h3>{group_table("by_length", "length")}</div>
<div><h3>By depth (%)</h3>{group_table("by_depth", "depth")}</div>
</div>
</section>"""


INTRO = """A head's <b>retrieval score</b> is how often, while the model answers a needle-in-a-haystack
question, the head's strongest attention points at the needle token that is being copied (Wu et al. 2024,
“Retrieval Head Mechanistically Explains Long-Context Factuality”), averaged over tests. Heads with a mean
score above 0.1 are <b>retrieval heads</b>; the paper finds they are few (under 5% of heads) and sparse."""


def _section(title: str, content) -> str:
    return f'<section id="{_anchor("x-" + str(title))}"><h2>{_e(title)}</h2>{_content_html(content)}</section>'


def write_report(out_dir: str | os.PathLike, summary: dict, pairs: Sequence[dict] | None = None,
                 dynamic: dict | None = None, extra_sections: Sequence[tuple] | None = None,
                 title: str = "Retrieval-head analysis", *, sections: Sequence[tuple] | None = None,
                 meta: str | None = None, intro: str | None = None, provenance: str | None = None) -> Path:
    """Write out_dir/report.html and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = list(pairs or [])
    extra_sections = list(extra_sections or [])
    sections = list(sections or [])
    if meta is None:
        meta = f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        if summary:
            meta += f" · {len(summary)} head-score file{'s' if len(summary) != 1 else ''}"

    nav = ['<a href="#s-overview">Overview</a>'] if summary else []  # the section exists only then
    nav += [f'<a href="#{_anchor("x-" + str(t))}">{_e(t)}</a>' for t, _ in sections]
    nav += [f'<a href="#{_anchor(n)}">{_e(n)}</a>' for n in summary]
    if pairs:
        nav.append('<a href="#s-pairs">Model pairs</a>')
    if dynamic:
        nav.append('<a href="#s-dynamic">Dynamic activation</a>')
    nav += [f'<a href="#{_anchor("x-" + str(t))}">{_e(t)}</a>' for t, _ in extra_sections]
    if provenance:
        nav.append('<a href="#s-provenance">Provenance</a>')

    parts = [f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{_e(title)}</h1>
<p class="meta">{meta}</p>
<nav>{''.join(nav)}</nav>
<p class="note">{INTRO if intro is None else intro}</p>
"""]
    if summary:
        note = above_one_note({n: e.get("above_one", [(h, s) for h, s in e["top"] if s > 1.0])
                               for n, e in summary.items()})
        parts.append(f'<section id="s-overview"><h2>Overview</h2>{_overview(summary)}{note}</section>')
    parts += [_section(t, c) for t, c in sections]
    for name, e in summary.items():
        parts.append(_file_section(out, name, e))
    if pairs:
        parts.append(_pairs_section(pairs))
    if dynamic:
        parts.append(_dynamic_section(out, dynamic))
    parts += [_section(t, c) for t, c in extra_sections]
    if provenance:
        parts.append(f'<section id="s-provenance"><h2>Provenance</h2>{provenance}</section>')
    parts.append("</main></body></html>\n")
    path = out / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
