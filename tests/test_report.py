"""rhead_jax.report: the HTML page (write_report, table, embedded images) and the plots."""
from __future__ import annotations

import re

import numpy as np

from rhead_jax import analysis, report, scoring
from rhead_jax.analysis import dynamic, headscores
from rhead_jax.report import plots
from tests.head_score_data import MEANS, file_from_means, write_json, write_results

PNG = b"\x89PNG\r\n\x1a\n"


def _hrefs_resolve(html: str) -> None:
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    hrefs = re.findall(r'href="#([^"]*)"', html)
    assert hrefs, "no in-page links"
    missing = [h for h in hrefs if h not in ids]
    assert not missing, missing


def test_write_report_with_image_and_extra_sections(tmp_path):
    a = write_json(tmp_path / "m.json", file_from_means(MEANS))
    out = tmp_path / "out"
    res = analysis.analyze([a], out, top_k=3, report=False)
    png = out / "m_pie.png"
    path = report.write_report(out, res["summary"], res["pairs"], None,
                               extra_sections=[("Ablation grid", png), ("Top-k vs random", "<p>curve & notes</p>"),
                                               ("Both", [str(png), "<b>side note</b>"])])
    html = path.read_text()
    assert path == out / "report.html"
    assert html.count('src="data:image/png;base64,') == 2 + 1 + 1  # heatmap + pie, then the two extras
    assert report.html.data_uri(png) in html  # the file's bytes, embedded
    for text in ("Ablation grid", "Top-k vs random", "<p>curve & notes</p>", "<b>side note</b>"):
        assert text in html
    assert "Dynamic activation" not in html and "Model pairs" not in html
    _hrefs_resolve(html)


def test_report_with_pairs_and_dynamic_links_resolve(tmp_path):
    a = write_json(tmp_path / "base 1.json", file_from_means(MEANS))
    b = write_json(tmp_path / "chat.json", file_from_means(MEANS))
    out = tmp_path / "out"
    analysis.analyze([a, b], out, results=str(write_results(tmp_path)), pairs=[("base 1.json", "chat.json")],
                     top_k=3)
    html = (out / "report.html").read_text()
    # 2 pies, 2 heatmaps, dynamic, the ranking matrix, 2 interval plots, the convergence curve
    assert html.count('src="data:image/png;base64,') == 9
    assert 'href="#s-pairs"' in html and 'href="#s-dynamic"' in html
    _hrefs_resolve(html)


def test_report_of_extra_sections_only_has_no_dangling_overview_link(tmp_path):
    # what an ablation writes: no head-score summary, only its own sections
    html = report.write_report(tmp_path, {}, extra_sections=[("Ablation", "<p>x</p>")], title="Ablation").read_text()
    assert "s-overview" not in html
    _hrefs_resolve(html)


def test_missing_image_is_named_not_fatal(tmp_path):
    html = report.write_report(tmp_path, {}, extra_sections=[("Gone", tmp_path / "gone.png")]).read_text()
    assert "image not found: gone.png" in html


def test_table():
    t = report.table(["name", "n <= 3"], [["<b>a</b>", 1], ["b", 2]])
    assert t == ('<table><thead><tr><th class="l">name</th><th>n &lt;= 3</th></tr></thead><tbody>'
                 '<tr><td class="l"><b>a</b></td><td>1</td></tr><tr><td class="l">b</td><td>2</td></tr></tbody></table>')
    # left=() is the ablation's plain table: every cell right-aligned, no class attributes
    assert report.table(["k"], [[5]], left=()) == "<table><thead><tr><th>k</th></tr></thead><tbody><tr><td>5</td></tr></tbody></table>"


def test_plots_write_pngs(tmp_path):
    hs = file_from_means(MEANS)
    entry = headscores.file_summary(hs, top_k=3)
    dyn = dynamic.dynamic_activation(dynamic.load_results(write_results(tmp_path)))
    cells = [{"length": L, "depth": d, "accuracy": (L + d) % 3 / 2} for L in (100, 200) for d in (0, 50, 100)]
    sweep = {"k": [0, 5], "top": [1.0, 0.2], "random": [1.0, 0.9], "random_std": [0.0, 0.05], "seeds": [0, 1]}
    calls = {"pie.png": lambda p: report.plot_pie(entry, "m", p),
             "heat.png": lambda p: report.plot_heatmap(headscores.mean_matrix(hs), "m", p, top=entry["top"]),
             "heat_nan.png": lambda p: plots.plot_heatmap(np.full((2, 3), np.nan), "empty", p),
             "dyn.png": lambda p: report.plot_dynamic(dyn, p),
             "fig1.png": lambda p: report.plot_fig1_heatmap(cells, p, "grid"),
             "sweep_k.png": lambda p: report.plot_sweep_k(sweep, p, "k")}
    for name, draw in calls.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert report.FIG1_COLORS == ("#F0496E", "#EBB839", "#0CD79F")
    assert list(report.BUCKET_COLORS) == list(scoring.BUCKETS)
