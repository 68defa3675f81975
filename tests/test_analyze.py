"""`python -m rhead_jax.analyze`: argv rewriting, the end-to-end command, and user errors as one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rhead_jax import analyze
from tests.head_score_data import MEANS, file_from_means, write_json, write_results

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rhead_jax.analyze", *map(str, args)], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=timeout)


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, stderr's last line `error: ...` (returned), no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:"), proc.stderr
    for f in fragments:
        assert f in last, (f, last)
    return last


def test_pair_argv_forms():
    argv = ["prog", "x.json", "--pair", "a.json", "b.json", "--pair", "c.json,d.json", "--pair=e.json,f.json",
            "--out", "o"]
    assert analyze.rewrite_pair_argv(argv) == ["prog", "x.json", "--pair=a.json,b.json", "--pair=c.json,d.json",
                                               "--pair=e.json,f.json", "--out", "o"]


def test_cli_end_to_end(tmp_path):
    a = write_json(tmp_path / "base.json", file_from_means(MEANS))
    means_b = [row[:] for row in MEANS]
    means_b[0][4] = 2.0
    b = write_json(tmp_path / "chat.json", file_from_means(means_b))
    res = write_results(tmp_path)
    out = tmp_path / "out"
    proc = _run(a, b, "--out", out, "--results", res, "--pair", "base.json", "chat.json", "--top_k", "3",
                "--always_on", "0.8")
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
    # 2 pies, 2 heatmaps, dynamic, the ranking matrix, 2 interval plots, the convergence curve
    assert html.count('src="data:image/png;base64,') == 9
    for title in ("Retrieval-head analysis", "Overview", "base.json", "chat.json", "Model pairs",
                  "Dynamic activation", "Top 3 heads by mean retrieval score", "Heads per score bucket",
                  "How sure are the scores"):
        assert title in html, title
    assert "<script" not in html and "<link" not in html and "http" not in html  # self-contained


def test_cli_rejects_unknown_pair(tmp_path):
    a = write_json(tmp_path / "base.json", file_from_means(MEANS))
    _assert_user_error(_run(a, "--out", tmp_path / "o", "--pair", "base.json", "nope.json"),
                       "nope.json", "base.json")
    assert not (tmp_path / "o").exists()


def test_cli_missing_file(tmp_path):
    _assert_user_error(_run(tmp_path / "missing.json", "--out", tmp_path / "o"), "missing.json", "not found")


def test_cli_non_json_file(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text("head 12-3 looked good\n")
    _assert_user_error(_run(bad, "--out", tmp_path / "o"), "notes.json", "not valid JSON")


def test_cli_no_input_files(tmp_path):
    _assert_user_error(_run("--out", tmp_path / "o"), "at least one head-score JSON file")


@pytest.mark.parametrize("debug", [False, True])
def test_cli_malformed_head_key_and_debug(tmp_path, debug):
    bad = write_json(tmp_path / "bad.json", {"0-0": [1.0], "L0H1": [0.0]})
    proc = _run(bad, "--out", tmp_path / "o", *(["--debug"] if debug else []))
    if debug:  # --debug keeps the traceback
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
    else:
        _assert_user_error(proc, "bad.json", "'L0H1'")


def _smol_files(tmp_path, kv_heads: int = 3):
    """A SmolLM2-shaped head_scores.json [30 x 9] and a gate TSV [30 x kv_heads] (values of no meaning)."""
    import numpy as np

    from rhead_jax.rankings import write_gates_tsv
    rng = np.random.default_rng(1)
    hs = write_json(tmp_path / "head_scores.json",
                    {f"{l}-{h}": [float(rng.random()) ** 3] for l in range(30) for h in range(9)})
    tsv = tmp_path / "full_attention_heads.tsv"
    write_gates_tsv(tsv, rng.random((30, kv_heads)))
    return hs, tsv


def test_cli_rankings_of_any_detector(tmp_path):
    hs, tsv = _smol_files(tmp_path)
    out = tmp_path / "out"
    proc = _run(f"copy:{hs}", f"duo:{tsv}", f"mass:{hs}", "--out", out, "--overlap_k", "20,25%",
                "--model", "smollm2_135m")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[:4] for line in proc.stdout.splitlines() if " vs " in line]
    assert rows == [["copy", "vs", "duo", "query"], ["copy", "vs", "duo", "kv"], ["copy", "vs", "mass", "query"],
                    ["copy", "vs", "mass", "kv"], ["duo", "vs", "mass", "query"], ["duo", "vs", "mass", "kv"]]
    assert "ranking comparison" in proc.stdout and "top-25%" in proc.stdout
    cmp = json.loads((out / "rankings.json").read_text())
    assert cmp["group_size"] == 3 and [p["a"] + "-" + p["b"] for p in cmp["pairs"]] == ["copy-duo", "copy-mass",
                                                                                         "duo-mass"]
    assert cmp["pairs"][1]["levels"]["kv"]["spearman"] == 1.0
    html = (out / "report.html").read_text()
    # 2 x (heatmap, pie), the gates, 2 ranking matrices, 2 interval plots and the convergence curve
    assert "Ranking comparison" in html and html.count('src="data:image/png;base64,') == 2 * 2 + 1 + 2 + 3


@pytest.mark.parametrize("case, fragments", [
    ("malformed", ("full_attention_heads.tsv", "not a tab-separated float matrix")),
    ("shapes", ("full_attention_heads.tsv", "30 layers x 4 KV heads", "matches none")),
    ("group_size", ("head_scores.json", "group size 2")),
])
def test_cli_bad_rankings(tmp_path, case, fragments):
    hs, tsv = _smol_files(tmp_path, kv_heads=4 if case == "shapes" else 3)
    if case == "malformed":
        tsv.write_text("0.5\t0.25\t1\n0.5\tgate\t1\n")
    extra = ["--group_size", "2"] if case == "group_size" else []
    _assert_user_error(_run(hs, tsv, "--out", tmp_path / "o", *extra), *fragments)
    assert not (tmp_path / "o").exists()
