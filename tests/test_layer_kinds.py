"""Layer kinds of hybrid models in the sweep's outputs and the analysis (rhead_jax.report.kinds): the
sweep records each layer's kind, the analysis counts retrieval heads per kind and marks the heatmap;
a dense model's outputs stay as they were."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rhead_jax import analysis, analyze
from rhead_jax.report import kinds, plots
from tests.head_score_data import write_json

# 6 layers x 2 heads, Gemma 3's pattern at a period of 3: layers 2 and 5 global, the others local
KINDS6 = ["local", "local", "global", "local", "local", "global"]
MEANS6 = [[0.0, 0.05],     # local
          [0.2, 0.0],      # local: 1 retrieval head (1-0)
          [0.9, 0.1],      # global: 2-0 retrieval; 2-1 exactly 0.1 is not (> 0.1)
          [0.0, 0.0],      # local
          [0.0, 0.3],      # local: 4-1
          [0.6, 0.4]]      # global: 5-0, 5-1


def _file(means):
    """{"L-H": [2m, 0]}: mean exactly m."""
    return {f"{l}-{h}": [2 * m, 0.0] for l, row in enumerate(means) for h, m in enumerate(row)}


def _sweep_dir(tmp_path, layer_kinds=KINDS6, name="sweep"):
    d = tmp_path / name
    d.mkdir()
    path = write_json(d / "head_scores.json", _file(MEANS6))
    if layer_kinds is not None:
        write_json(d / "summary.json", {"model": "m", "tests": 2, "layer_kinds": layer_kinds})
    return path


def test_kind_summary_counts_retrieval_heads_per_kind():
    by = kinds.kind_summary(_file(MEANS6), KINDS6)
    assert list(by) == ["global", "local"]
    g, loc = by["global"], by["local"]
    assert g["layers"] == [2, 5] and g["heads"] == 4 and g["retrieval_heads"] == 3
    assert [h for h, _ in g["top"]] == ["2-0", "5-0", "5-1"]
    assert g["mean"] == pytest.approx((0.9 + 0.1 + 0.6 + 0.4) / 4)
    assert loc["layers"] == [0, 1, 3, 4] and loc["heads"] == 8 and loc["retrieval_heads"] == 2
    assert [h for h, _ in loc["top"]] == ["4-1", "1-0"]
    assert loc["mean"] == pytest.approx((0.05 + 0.2 + 0.3) / 8)
    assert "global (layers 2, 5): 3 of 4 heads > 0.1" in kinds.format_kinds(by)


def test_layer_kinds_from_windows():
    assert kinds.layer_kinds([512, 512, None]) == ["local", "local", "global"]
    assert not kinds.is_hybrid(["global"] * 4) and not kinds.is_hybrid(["local"] * 4) and not kinds.is_hybrid(None)
    assert kinds.is_hybrid(["local", "global"])


@pytest.mark.parametrize("recorded", [None, ["global"] * 6, ["local", "global"], ["local"] * 5 + ["sliding"]],
                         ids=["no-summary", "dense", "other-shape", "unknown-kind"])
def test_kind_entry_only_for_recorded_hybrid_layers(tmp_path, recorded):
    path = _sweep_dir(tmp_path, recorded)
    assert kinds.kind_entry(path, _file(MEANS6)) == {}


def test_analyze_reports_kinds_and_marks_the_heatmap(tmp_path):
    """Same scores, once next to a sweep summary with kinds and once without: the hybrid file gets
    by_kind in summary.json, a per-kind line in the table and the report, and a different heatmap; the
    other file's entry and heatmap are those of a dense model."""
    hybrid = _sweep_dir(tmp_path, KINDS6, "hybrid")
    dense = _sweep_dir(tmp_path, None, "dense")
    out = tmp_path / "out"
    res = analysis.analyze([f"hyb:{hybrid}", f"den:{dense}"], out)
    s = json.loads((out / "summary.json").read_text())
    assert s["hyb"]["layer_kinds"] == KINDS6
    assert s["hyb"]["by_kind"]["global"]["retrieval_heads"] == 3 and s["hyb"]["by_kind"]["local"]["retrieval_heads"] == 2
    assert "by_kind" not in s["den"] and "layer_kinds" not in s["den"]
    assert {k: v for k, v in s["hyb"].items() if k not in ("by_kind", "layer_kinds")} == s["den"]
    assert (out / "hyb_heatmap.png").read_bytes() != (out / "den_heatmap.png").read_bytes()
    table = analyze.format_table(res["summary"]).splitlines()
    assert sum("by layer kind: global (layers 2, 5): 3 of 4 heads" in line for line in table) == 1
    html = (out / "report.html").read_text()
    assert html.count("Retrieval heads by layer kind") == 1


def test_heatmap_of_one_kind_is_the_dense_heatmap(tmp_path):
    means = np.asarray(MEANS6)
    plots.plot_heatmap(means, "t", tmp_path / "none.png", top=[["2-0", 0.9]])
    plots.plot_heatmap(means, "t", tmp_path / "global.png", top=[["2-0", 0.9]], kinds=["global"] * 6)
    plots.plot_heatmap(means, "t", tmp_path / "hybrid.png", top=[["2-0", 0.9]], kinds=KINDS6)
    assert (tmp_path / "none.png").read_bytes() == (tmp_path / "global.png").read_bytes()
    assert (tmp_path / "none.png").read_bytes() != (tmp_path / "hybrid.png").read_bytes()


def test_sweep_records_the_layer_kinds_of_a_tiny_gemma3(tmp_path):
    """A 3-layer Gemma 3 (sliding_window_pattern 2: local, global, local; window 48): the sweep's
    summary.json names each layer's kind as config.json's layer_types do, and its windows."""
    from rhead_jax import detection
    from rhead_jax.config import default_config, validate
    from tests.helpers.tiny_smol import make_tiny_smol

    d = make_tiny_smol(tmp_path / "tiny-gemma3", gemma3=True, sharpen=False, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_hidden_layers=3)
    layer_types = json.loads((d / "config.json").read_text())["layer_types"]
    assert layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    c = default_config()
    c.model.path, c.model.name = str(d), "tiny-gemma3"
    c.sweep.lengths, c.sweep.depths, c.sweep.batch_size = (300,), (50,), 3
    c.sweep.max_new_tokens, c.sweep.prefill_chunk, c.sweep.pad_multiple = 4, 128, 32
    c.sweep.q_chunk = c.sweep.k_chunk = 64
    wd = tmp_path / "sweep"
    summary = detection.run_sweep(validate(c), str(wd))
    written = json.loads((wd / "summary.json").read_text())
    want = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    assert written["layer_kinds"] == summary["layer_kinds"] == want
    assert written["layer_windows"] == [48, None, 48]
    assert written["by_kind"]["global"]["layers"] == [1] and written["by_kind"]["local"]["layers"] == [0, 2]
    assert kinds.read_layer_kinds(wd / "head_scores.json", 3) == want
