"""Each report, opened in headless Chromium (Debian's `chromium`, installed by .ci/run): every image
loads (decoded from a data: URI), every in-page link has its anchor, nothing is fetched over http.

Skipped only where no chromium binary exists. The analysis page comes from analysis.analyze on small
head-score files (a base / -Chat pair, so the detected-pairs and overlap sections are on it); the
ablation page from rhead_jax.ablation.report's sections on a results.json-shaped object (the real
run's page is checked in tests/test_ablation_run.py)."""
from __future__ import annotations

import pytest

from rhead_jax import analysis, report
from rhead_jax.ablation import report as ablation_report
from rhead_jax.report.provenance import run_record
from tests.head_score_data import MEANS, file_from_means, write_json, write_results
from tests.helpers.browser import (assert_page_ok, check_page, chromium_binary, chromium_version, console_errors,
                                   horizontal_overflow, network_requests, open_chrome, webdriver_missing)

BROWSER = chromium_binary()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH (Debian: apt-get install "
                                                        "chromium; .ci/run installs it)")


def test_chromium_version():
    assert "Chromium" in chromium_version(BROWSER) or "Chrome" in chromium_version(BROWSER)


def _analysis_report(tmp_path):
    means_b = [row[:] for row in MEANS]
    means_b[0][1] = 1.2  # a mean above 1: flagged, explained, linked
    a = write_json(tmp_path / "Model-7B.json", file_from_means(MEANS))
    b = write_json(tmp_path / "Model-7B-Chat.json", file_from_means(means_b))
    out = tmp_path / "out"
    return out, analysis.analyze([a, b], out, results=str(write_results(tmp_path)), top_k=3)


def test_analysis_report_in_browser(tmp_path):
    out, res = _analysis_report(tmp_path)
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("Model-7B.json", "Model-7B-Chat.json")]  # from the names
    page = assert_page_ok(out / "report.html", min_images=5)
    assert {"Overview", "Colour scale", "Top-3 overlap across models", "Provenance"} <= set(page["h2"])
    assert any(h.startswith("Model pairs") for h in page["h2"])
    html = (out / "report.html").read_text()
    assert 'id="s-above-one"' in html and "1.200" in html


def _results(tmp_path):
    cells = [{"length": 500, "depth": d, "accuracy": a} for d, a in ((0, 1.0), (100, 0.5))]
    inst = [{"key": "L500_D0_N0", "category": "correct", "response": "eat a sandwich", "rouge1_recall": 1.0},
            {"key": "L500_D100_N0", "category": "hallucination", "response": "the sky <b>", "rouge1_recall": 0.0}]
    g = lambda spec, kind, k, runs, seeds, heads: {  # noqa: E731
        "spec": spec, "kind": kind, "k": k, "runs": runs, "seeds": seeds, "accuracy": 0.75, "accuracy_std": 0.0,
        "tests": 2 * len(runs), "masked_heads": heads, "metrics": {"rouge1_recall": 0.75},
        "accuracy_by_cell": cells, "categories": {"correct": 1, "incomplete": 0, "wrong_extraction": 0,
                                                  "hallucination": 1, "empty": 0}}
    groups = {"none": g("none", "none", 0, ["none"], None, []),
              "top:1": g("top:1", "top", 1, ["top1"], None, [[0, 1]]),
              "random:1": g("random:1", "random", 1, ["random1-seed0"], [0], [[[1, 2]]])}
    files = {}
    for slug in ("none", "top1", "random1"):
        files[f"heatmap_{slug}.png"] = tmp_path / f"heatmap_{slug}.png"
        report.plot_fig1_heatmap(cells, files[f"heatmap_{slug}.png"], slug)
    sweep = {"k": [0, 1], "top": [0.75, 0.5], "random": [0.75, 0.7], "random_std": [0.0, 0.0], "seeds": [0],
             "rows": [{"k": 0, "top": 0.75, "random": 0.75, "random_std": 0.0},
                      {"k": 1, "top": 0.5, "random": 0.7, "random_std": 0.0}]}
    files["sweep_k.png"] = tmp_path / "sweep_k.png"
    report.plot_sweep_k(sweep, files["sweep_k.png"])
    runs = {lbl: {"spec": spec, "instances": inst} for lbl, spec in
            (("none", "none"), ("top1", "top:1"), ("random1-seed0", "random:1"))}
    prov = {"model": {"name": "m", "path": "default", "dtype": "float32"},
            "scores": {"path": "s.json", "name": "s.json", "bytes": 10, "sha256": "0" * 64, "git_blob": "1" * 40,
                       "tests": 4},
            "masked_head_scores": {"0-1": 1.1, "1-2": 0.0}, "needles": "(bundled)", "haystack": "(bundled)",
            "max_new_tokens": 50, "faithful": False, "batch_size": 2, "prompt_tokens": {"500": [361, 363]}}
    results = {"model": "m", "task": "niah", "mask": {"spec": "top:1", "mode": "zero", "phase": "all"},
               "retrieval_threshold": 0.1, "seeds": [0], "baseline": groups["none"], "groups": groups,
               "grid": {"lengths": [500], "depths": [0, 100], "needles": 1},
               "taxonomy": {"extraction_ngram": 5}, "sweep_k": sweep, "runs": runs, "provenance": prov}
    return results, files


def test_ablation_report_in_browser(tmp_path):
    results, files = _results(tmp_path)
    path = report.write_report(tmp_path / "page", {}, extra_sections=ablation_report.report_sections(results, files),
                               title="Retrieval-head ablation: m", meta=ablation_report.report_meta(results),
                               intro=ablation_report.report_intro(results),
                               provenance=ablation_report.report_provenance(results, run_record()))
    page = assert_page_ok(path, min_images=4)
    assert "Provenance" in page["h2"] and "Failure taxonomy" in page["h2"]
    html = path.read_text()
    assert "head-score file" not in html.split("<nav>")[0]  # no "0 head-score files" header
    assert "— (one run)" in html and "361–363" in html and "eat a sandwich" in html and "the sky &lt;b&gt;" in html
    assert html.count("<figcaption>") == 4 and "no answer of this class" in html


def test_checker_catches_broken_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><a href="#nowhere">x</a><img alt="broken" src="data:image/png;base64,'
                   'AAAA"><img alt="remote" src="https://example.invalid/x.png"></body></html>')
    res = check_page(bad)
    assert res["missing_anchors"] == ["nowhere"] and "broken" in res["broken_images"]
    assert res["non_data_images"] and res["http_refs"]


@pytest.mark.skipif(webdriver_missing() is not None, reason=str(webdriver_missing()))
def test_reports_have_no_horizontal_scrollbar(tmp_path):
    """The analysis and the ablation report at a 1,400 px desktop and a 390 px phone width: nothing
    sticks out of the page (wide tables scroll inside themselves, the navigation row wraps); no
    console error, nothing requested over the network."""
    (tmp_path / "analysis").mkdir()
    out, _ = _analysis_report(tmp_path / "analysis")
    results, files = _results(tmp_path)
    ablation = report.write_report(tmp_path / "page", {}, extra_sections=ablation_report.report_sections(results, files),
                                   title="Retrieval-head ablation: m", meta=ablation_report.report_meta(results),
                                   intro=ablation_report.report_intro(results),
                                   provenance=ablation_report.report_provenance(results, run_record()))
    # a navigation row longer than a 1,400 px line (many files and sections): it must wrap
    long_nav = report.write_report(tmp_path / "nav", {}, extra_sections=[
        (f"Ranking comparison of file number {i}", "<p>x</p>") for i in range(12)])
    driver = open_chrome()
    try:
        for page in (long_nav, out / "report.html", ablation):
            for width in (1400, 390):
                res = horizontal_overflow(driver, page, width)
                assert res["scroll_width"] <= res["client_width"] and not res["widest"], (page.name, width, res)
            assert console_errors(driver) == [] and network_requests(driver) == []
    finally:
        driver.quit()
