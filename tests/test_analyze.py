"""rhead_jax.analyze and rhead_jax.report: buckets, pairs, dynamic activation, CLI and HTML report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import analyze, report

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = Path(__file__).resolve().parents[2] / "shared/reference/head_scores"

# 2 layers x 5 heads; each list is [2m, 0] so the mean is exactly m (halving is exact in binary floats).
MEANS = [[0.0, 0.0, 0.0, 0.05, 0.1],
         [0.3, 0.5, 0.9, 1.2, 0.0]]


def _file_from_means(means, tests: int = 2) -> dict[str, list[float]]:
    assert tests == 2
    return {f"{l}-{h}": [2 * m, 0.0] for l, row in enumerate(means) for h, m in enumerate(row)}


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _results(tmp_path: Path) -> Path:
    """Synthetic sweep, 1 layer x 4 heads: 10 kept tests (needles 0/1, lengths 100/200) + 2 dropped ones.

    head 0-0: 0.5 in every kept test -> retrieval, always-on
    head 0-1: 1.0 in the 5 needle-1 tests only -> mean 0.5, retrieval, context-specific (50%)
    head 0-2: 0.05 everywhere -> active 100% but mean 0.05: not a retrieval head
    head 0-3: 0 in kept tests, 9.0 in dropped tests (must be ignored)
    """
    rows = []
    for i in range(10):
        needle, length = i % 2, 100 if i < 5 else 200
        rows.append({"key": f"L{length}_D{i}_N{needle}", "length": length, "depth": 10 * i, "needle_index": needle,
                     "rouge1_recall": 1.0, "kept": True,
                     "scores": [[0.5, 1.0 if needle == 1 else 0.0, 0.05, 0.0]]})
    for i in range(2):
        rows.append({"key": f"L100_D0_N{i}", "length": 100, "depth": 0, "needle_index": i, "rouge1_recall": 0.0,
                     "kept": False, "scores": [[0.0, 0.0, 0.0, 9.0]]})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------- buckets
def test_buckets_known_answer():
    hs = _file_from_means(MEANS)
    s = analyze.file_summary(hs, top_k=3)
    # =0: 4 heads, (0,0.1]: 0.05 and exactly 0.1, (0.1,0.5]: 0.3 and exactly 0.5, >0.5: 0.9 and 1.2
    assert s["buckets"] == {"=0": 40.0, "(0,0.1]": 20.0, "(0.1,0.5]": 20.0, ">0.5": 20.0}
    assert (s["layers"], s["heads"], s["tests"]) == (2, 5, 2)
    assert s["retrieval_heads"] == 4
    assert s["top"] == [["1-3", 1.2], ["1-2", 0.9], ["1-1", 0.5]]


def test_bucket_edges():
    assert [analyze.bucket_of(m) for m in (0.0, 1e-12, 0.1, 0.1 + 1e-12, 0.5, 0.5 + 1e-12)] == \
        ["=0", "(0,0.1]", "(0,0.1]", "(0.1,0.5]", "(0.1,0.5]", ">0.5"]


def test_uneven_lists_rejected(tmp_path):
    path = _write(tmp_path / "bad.json", {"0-0": [0.1, 0.2], "0-1": [0.1]})
    with pytest.raises(ValueError, match="different lengths"):
        analyze.load_head_scores(path)


def test_summary_json_shape(tmp_path):
    a = _write(tmp_path / "model_a.json", _file_from_means(MEANS))
    out = tmp_path / "out"
    analyze.analyze([a], out, top_k=4, report=False)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["model_a.json"]
    entry = summary["model_a.json"]
    assert set(entry) == {"buckets", "layers", "heads", "tests", "retrieval_heads", "top"}
    assert list(entry["buckets"]) == ["=0", "(0,0.1]", "(0.1,0.5]", ">0.5"]
    assert math.isclose(sum(entry["buckets"].values()), 100.0)
    assert all(isinstance(v, float) for v in entry["buckets"].values())
    assert all(isinstance(entry[k], int) for k in ("layers", "heads", "tests", "retrieval_heads"))
    assert len(entry["top"]) == 4
    assert all(isinstance(h, str) and isinstance(v, float) for h, v in entry["top"])
    assert [v for _, v in entry["top"]] == sorted((v for _, v in entry["top"]), reverse=True)
    assert json.loads((out / "pairs.json").read_text()) == []
    assert not (out / "dynamic.json").exists()


# --------------------------------------------------------------------------------------------------- pairs
def test_rankdata_average_ties():
    np.testing.assert_array_equal(analyze.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    np.testing.assert_array_equal(analyze.rankdata([0, 0, 0]), [2, 2, 2])


def test_spearman_hand_computed_with_ties():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; deviations from 2.5:
    # da = [-1.5, 0, 0, 1.5], db = [-1.5, .5, -.5, 1.5]; sum da*db = 4.5, |da|^2 = 4.5, |db|^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert math.isclose(analyze.spearman([1, 2, 2, 3], [1, 3, 2, 4]), math.sqrt(0.9), rel_tol=1e-12)
    assert math.isclose(analyze.spearman([1, 2, 3, 4], [10, 20, 30, 400]), 1.0)
    assert math.isclose(analyze.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    assert math.isnan(analyze.spearman([1, 1, 1], [1, 2, 3]))


def test_overlap_and_pair():
    a = _file_from_means(MEANS)  # top 3: 1-3 (1.2), 1-2 (0.9), 1-1 (0.5)
    means_b = [row[:] for row in MEANS]
    means_b[1][1] = 0.0   # 1-1 drops out of B's top 3 ...
    means_b[0][4] = 2.0   # ... and 0-4 becomes B's best head
    b = _file_from_means(means_b)
    n, common = analyze.top_overlap(a, b, 3)
    assert (n, common) == (2, ["1-3", "1-2"])
    p = analyze.compare_pair(a, b, k=3, name_a="A", name_b="B")
    assert (p["a"], p["b"], p["k"], p["overlap"]) == ("A", "B", 3, 2)
    assert math.isclose(p["overlap_frac"], 2 / 3)
    flat_a = [m for row in MEANS for m in row]
    flat_b = [m for row in means_b for m in row]
    assert math.isclose(p["spearman"], analyze.spearman(flat_a, flat_b))
    # k larger than the number of heads is clipped
    assert analyze.compare_pair(a, a, k=50)["k"] == 10
    assert analyze.compare_pair(a, a, k=50)["overlap_frac"] == 1.0


def test_pair_shape_mismatch_rejected():
    a = _file_from_means(MEANS)
    b = _file_from_means([MEANS[0]])
    with pytest.raises(ValueError, match="same heads"):
        analyze.compare_pair(a, b)


def test_pair_argv_forms():
    argv = ["prog", "x.json", "--pair", "a.json", "b.json", "--pair", "c.json,d.json", "--pair=e.json,f.json",
            "--out", "o"]
    assert analyze.rewrite_pair_argv(argv) == ["prog", "x.json", "--pair=a.json,b.json", "--pair=c.json,d.json",
                                               "--pair=e.json,f.json", "--out", "o"]
    assert analyze.parse_pairs(["a.json,b.json", ("c", "d")]) == [("a.json", "b.json"), ("c", "d")]
    with pytest.raises(ValueError):
        analyze.parse_pairs(["a.json"])


# ------------------------------------------------------------------------------------------------ dynamic
def test_dynamic_classification(tmp_path):
    results = analyze.load_results(_results(tmp_path))
    d = analyze.dynamic_activation(results)
    assert (d["tests"], d["kept"], d["layers"], d["heads"]) == (12, 10, 1, 4)
    assert d["activation"] == {"0-0": 1.0, "0-1": 0.5, "0-2": 1.0, "0-3": 0.0}
    assert [h["head"] for h in d["retrieval"]] == ["0-0", "0-1"]  # 0-2 is active but weak; 0-3 only in dropped
    assert d["always_on"] == ["0-0"]
    assert d["context_specific"] == ["0-1"]
    h01 = d["retrieval"][1]
    assert h01["by_needle"] == {"0": 0.0, "1": 1.0}
    assert h01["by_length"] == {"100": 0.4, "200": 0.6}  # needle-1 tests: i = 1, 3 (len 100); 5, 7, 9 (len 200)
    assert d["by_needle"]["1"]["kept"] == 5 and d["by_needle"]["1"]["tests"] == 6
    assert d["by_needle"]["1"]["mean_active_retrieval_heads"] == 2.0
    assert d["by_needle"]["0"]["mean_active_retrieval_heads"] == 1.0
    # the always-on threshold is a parameter
    assert analyze.dynamic_activation(results, always_on=0.5)["always_on"] == ["0-0", "0-1"]


# --------------------------------------------------------------------------------------------- published
def test_published_llama2_7b_80k():
    path = PUBLISHED / "llama-2-7b-80k.json"
    if not path.exists():
        pytest.skip(f"published head scores not found at {path}")
    s = analyze.file_summary(analyze.load_head_scores(path), top_k=3)
    assert s["retrieval_heads"] == 33
    assert s["top"][0][0] == "16-19"
    assert (s["layers"], s["heads"], s["tests"]) == (32, 32, 586)
    assert math.isclose(sum(s["buckets"].values()), 100.0)


# ----------------------------------------------------------------------------------------- CLI and report
def test_cli_end_to_end(tmp_path):
    a = _write(tmp_path / "base.json", _file_from_means(MEANS))
    means_b = [row[:] for row in MEANS]
    means_b[0][4] = 2.0
    b = _write(tmp_path / "chat.json", _file_from_means(means_b))
    res = _results(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "rhead_jax.analyze", str(a), str(b), "--out", str(out),
                           "--results", str(res), "--pair", "base.json", "chat.json", "--top_k", "3",
                           "--always_on", "0.8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.json", "pairs.json", "dynamic.json", "dynamic_activation.png", "report.html",
                 "base_pie.png", "base_heatmap.png", "chat_pie.png", "chat_heatmap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "base.json" in proc.stdout and "top-3 overlap" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["base.json", "chat.json"]
    pairs = json.loads((out / "pairs.json").read_text())
    assert len(pairs) == 1 and (pairs[0]["a"], pairs[0]["b"], pairs[0]["k"]) == ("base.json", "chat.json", 3)
    assert {"a", "b", "k", "overlap", "overlap_frac", "spearman"} <= set(pairs[0])
    dyn = json.loads((out / "dynamic.json").read_text())
    assert dyn["always_on_threshold"] == 0.8 and dyn["always_on"] == ["0-0"]

    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5
    for title in ("Retrieval-head analysis", "Overview", "base.json", "chat.json", "Model pairs",
                  "Dynamic activation", "Top 3 heads by mean retrieval score", "Heads per score bucket"):
        assert title in html, title
    assert "<script" not in html and "<link" not in html and "http" not in html  # self-contained


def test_cli_rejects_unknown_pair(tmp_path):
    a = _write(tmp_path / "base.json", _file_from_means(MEANS))
    proc = subprocess.run([sys.executable, "-m", "rhead_jax.analyze", str(a), "--out", str(tmp_path / "o"),
                           "--pair", "base.json", "nope.json"],
                          cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "nope.json" in proc.stderr


def test_report_extra_sections(tmp_path):
    a = _write(tmp_path / "m.json", _file_from_means(MEANS))
    out = tmp_path / "out"
    res = analyze.analyze([a], out, top_k=3, report=False)
    png = out / "m_pie.png"
    path = report.write_report(out, res["summary"], res["pairs"], None,
                               extra_sections=[("Ablation grid", png), ("Top-k vs random", "<p>curve & notes</p>"),
                                               ("Both", [str(png), "<b>side note</b>"])])
    html = path.read_text()
    assert path == out / "report.html"
    assert html.count('src="data:image/png;base64,') == 2 + 1 + 1  # heatmap + pie, then the two extras
    for text in ("Ablation grid", "Top-k vs random", "<p>curve & notes</p>", "<b>side note</b>"):
        assert text in html
    assert "Dynamic activation" not in html and "Model pairs" not in html
