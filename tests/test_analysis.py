"""rhead_jax.analysis: loading, buckets, file summaries, pairs, dynamic activation, `analyze` outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rhead_jax import analysis
from rhead_jax.analysis import compare, dynamic, headscores, run
from rhead_jax.errors import UserError
from tests.head_score_data import MEANS, file_from_means, write_json, write_results

PUBLISHED = Path(__file__).resolve().parents[2] / "shared/reference/head_scores"


# ------------------------------------------------------------------------------------------------- buckets
def test_buckets_known_answer():
    hs = file_from_means(MEANS)
    s = headscores.file_summary(hs, top_k=3)
    # =0: 4 heads, (0,0.1]: 0.05 and exactly 0.1, (0.1,0.5]: 0.3 and exactly 0.5, >0.5: 0.9 and 1.2
    assert s["buckets"] == {"=0": 40.0, "(0,0.1]": 20.0, "(0.1,0.5]": 20.0, ">0.5": 20.0}
    assert (s["layers"], s["heads"], s["tests"]) == (2, 5, 2)
    assert s["retrieval_heads"] == 4
    assert s["top"] == [["1-3", 1.2], ["1-2", 0.9], ["1-1", 0.5]]


def test_bucket_edges():
    assert [headscores.bucket_of(m) for m in (0.0, 1e-12, 0.1, 0.1 + 1e-12, 0.5, 0.5 + 1e-12)] == \
        ["=0", "(0,0.1]", "(0,0.1]", "(0.1,0.5]", "(0.1,0.5]", ">0.5"]


def test_summary_json_shape(tmp_path):
    a = write_json(tmp_path / "model_a.json", file_from_means(MEANS))
    out = tmp_path / "out"
    analysis.analyze([a], out, top_k=4, report=False)
    text = (out / "summary.json").read_text()
    assert text.startswith('{\n "model_a.json"') and text.endswith("}\n")  # indent 1, final newline
    summary = json.loads(text)
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
    assert not (out / "report.html").exists()
    assert {p.name for p in out.iterdir()} == {"summary.json", "pairs.json", "provenance.json", "model_a_pie.png",
                                               "model_a_heatmap.png", "stability.json", "model_a_intervals.png",
                                               "stability_convergence.png"}  # no temporary files left


def test_analyze_rewrites_existing_outputs(tmp_path):
    a = write_json(tmp_path / "m.json", file_from_means(MEANS))
    out = tmp_path / "out"
    analysis.analyze([a], out, top_k=2, report=False)
    analysis.analyze([a], out, top_k=3, report=False)
    assert len(json.loads((out / "summary.json").read_text())["m.json"]["top"]) == 3


# ------------------------------------------------------------------------------------------- user errors
def test_uneven_lists_rejected(tmp_path):
    path = write_json(tmp_path / "bad.json", {"0-0": [0.1, 0.2], "0-1": [0.1]})
    with pytest.raises(UserError, match="different lengths"):
        headscores.load_head_scores(path)


@pytest.mark.parametrize("content, match", [
    (None, "not found: check the path"),
    ("{not json", "is not valid JSON"),
    ("[]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"0-0": [1.0], "layer3": [0.5]}', "head key 'layer3' is not '<layer>-<head>'"),
    ('{"0-0": [1.0], "1-x": [0.5]}', "head key '1-x'"),
    ('{"0-0": 0.5}', "not a list of scores"),
])
def test_bad_head_score_file_is_a_user_error_naming_it(tmp_path, content, match):
    path = tmp_path / "scores.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as e:
        headscores.load_head_scores(path)
    assert str(path) in str(e.value)


def test_bad_results_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="not found"):
        dynamic.load_results(tmp_path / "results.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"scores": [[1]], "needle_index": 0, "length": 1, "depth": 0}\n{oops\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        dynamic.load_results(bad)
    bad.write_text('{"scores": [[1]], "length": 1}\n')
    with pytest.raises(UserError, match=r"line 1: missing field\(s\) needle_index, depth"):
        dynamic.load_results(bad)
    bad.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        dynamic.load_results(bad)


def test_analyze_checks_every_input_before_writing(tmp_path):
    a = write_json(tmp_path / "a.json", file_from_means(MEANS))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="'nope.json' is not one of the input files"):
        analysis.analyze([a], out, pairs=[("a.json", "nope.json")], report=False)
    with pytest.raises(UserError, match="results file .* not found"):
        analysis.analyze([a], out, results=str(tmp_path / "missing.jsonl"), report=False)
    with pytest.raises(UserError, match="at least one head-score JSON file"):
        analysis.analyze([], out)
    (tmp_path / "sub").mkdir()
    b = write_json(tmp_path / "sub" / "a.json", file_from_means(MEANS))
    with pytest.raises(UserError, match="share the name 'a.json'"):
        analysis.analyze([a, b], out)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- pairs
def test_spearman_average_ranks_for_ties():
    # ties get the average of the ranks they span: [10, 20, 20, 5] ranks as [2, 3.5, 3.5, 1]
    assert compare.spearman([10, 20, 20, 5], [2, 3.5, 3.5, 1]) == 1.0
    assert math.isnan(compare.spearman([0, 0, 0], [1, 2, 3]))


def test_spearman_hand_computed_with_ties():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; deviations from 2.5:
    # da = [-1.5, 0, 0, 1.5], db = [-1.5, .5, -.5, 1.5]; sum da*db = 4.5, |da|^2 = 4.5, |db|^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert math.isclose(compare.spearman([1, 2, 2, 3], [1, 3, 2, 4]), math.sqrt(0.9), rel_tol=1e-12)
    assert math.isclose(compare.spearman([1, 2, 3, 4], [10, 20, 30, 400]), 1.0)
    assert math.isclose(compare.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    assert math.isnan(compare.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(compare.spearman([1, 2, 3], [7, 7, 7]))
    with pytest.raises(ValueError, match="one length"):
        compare.spearman([1, 2], [1, 2, 3])


def test_spearman_agrees_with_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, 40).astype(float)  # many ties
        b = a + rng.integers(0, 4, 40)
        assert math.isclose(compare.spearman(a, b), stats.spearmanr(a, b).statistic, rel_tol=1e-12)
        assert compare.spearman(a, b) == compare.spearman(b, a)


def test_overlap_and_pair():
    a = file_from_means(MEANS)  # top 3: 1-3 (1.2), 1-2 (0.9), 1-1 (0.5)
    means_b = [row[:] for row in MEANS]
    means_b[1][1] = 0.0   # 1-1 drops out of B's top 3 ...
    means_b[0][4] = 2.0   # ... and 0-4 becomes B's best head
    b = file_from_means(means_b)
    n, common = compare.top_overlap(a, b, 3)
    assert (n, common) == (2, ["1-3", "1-2"])
    p = compare.compare_pair(a, b, k=3, name_a="A", name_b="B")
    assert (p["a"], p["b"], p["k"], p["overlap"]) == ("A", "B", 3, 2)
    assert math.isclose(p["overlap_frac"], 2 / 3)
    flat_a = [m for row in MEANS for m in row]
    flat_b = [m for row in means_b for m in row]
    assert math.isclose(p["spearman"], compare.spearman(flat_a, flat_b))
    # k larger than the number of heads is clipped
    assert compare.compare_pair(a, a, k=50)["k"] == 10
    assert compare.compare_pair(a, a, k=50)["overlap_frac"] == 1.0


def test_pair_of_constant_files_has_no_spearman():
    flat = file_from_means([[0.2] * 5, [0.2] * 5])
    assert compare.compare_pair(flat, file_from_means(MEANS))["spearman"] is None


def test_pair_shape_mismatch_rejected():
    a = file_from_means(MEANS)
    b = file_from_means([MEANS[0]])
    with pytest.raises(UserError, match="same heads"):
        compare.compare_pair(a, b)


def test_parse_pairs():
    assert run.parse_pairs(["a.json,b.json", ("c", "d")]) == [("a.json", "b.json"), ("c", "d")]
    with pytest.raises(UserError, match="two files"):
        run.parse_pairs(["a.json"])


# ------------------------------------------------------------------------------------------------ dynamic
def test_dynamic_classification(tmp_path):
    results = dynamic.load_results(write_results(tmp_path))
    d = dynamic.dynamic_activation(results)
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
    assert dynamic.dynamic_activation(results, always_on=0.5)["always_on"] == ["0-0", "0-1"]


# --------------------------------------------------------------------------------------------- published
def test_published_llama2_7b_80k():
    path = PUBLISHED / "llama-2-7b-80k.json"
    if not path.exists():
        pytest.skip(f"published head scores not found at {path}")
    s = headscores.file_summary(headscores.load_head_scores(path), top_k=3)
    assert s["retrieval_heads"] == 33
    assert s["top"][0][0] == "16-19"
    assert (s["layers"], s["heads"], s["tests"]) == (32, 32, 586)
    assert math.isclose(sum(s["buckets"].values()), 100.0)


def test_pairs_detected_from_names_and_overlap_matrix():
    a, b = file_from_means(MEANS), file_from_means(MEANS)
    small = {"0-0": [0.5], "0-1": [0.0]}
    data = {"Qwen1.5-14B.json": a, "Qwen1.5-14B-Chat.json": b, "Mistral-7B.json": a, "Mixtral-8x7B.json": b,
            "Other-Instruct.json": small, "Other.json": a}  # Other: different heads, not paired
    assert compare.detect_pairs(data) == [("Qwen1.5-14B.json", "Qwen1.5-14B-Chat.json"),
                                           ("Mistral-7B.json", "Mixtral-8x7B.json")]
    m = compare.overlap_matrix({"x": a, "y": b, "z": small}, k=3)
    assert m["files"] == ["x", "y", "z"] and m["matrix"][0][:2] == [3, 3] and m["matrix"][0][2] is None


def test_shared_colour_scale_and_provenance(tmp_path):
    hi = [row[:] for row in MEANS]
    hi[0][0] = 1.5
    a = write_json(tmp_path / "a.json", file_from_means(MEANS))
    b = write_json(tmp_path / "b.json", file_from_means(hi))
    res = analysis.analyze([a, b], tmp_path / "out", top_k=3, report=False)
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["colour_scale"] == {"shared": True, "max": pytest.approx(1.5)}
    assert prov["above_one"]["b.json"][0] == ["0-0", pytest.approx(1.5)]  # largest first
    assert ["0-0", pytest.approx(1.5)] not in prov["above_one"]["a.json"]
    assert [f["name"] for f in prov["files"]] == ["a.json", "b.json"] and len(prov["files"][0]["sha256"]) == 64
    assert res["provenance"]["pairs"] == "detected from the file names" and res["pairs"] == []


# ------------------------------------------------------------------------------- rankings of any detector
# 2 layers x 4 query heads, G = 2 (2 KV heads per layer): per KV head, the copy ranking's max is
# [[0.9, 0.2], [0.6, 0.05]] (ranks 4 2 3 1) and the gates [[1.0, 0.1], [0.3, 0.7]] rank 4 1 2 3:
# d = 0 1 1 -2, Spearman = 1 - 6 * 6 / (4 * 15) = 0.4; top-2 KV heads {0-0, 1-0} vs {0-0, 1-1}: 1 shared.
COPY = [[0.9, 0.1, 0.0, 0.2], [0.5, 0.6, 0.05, 0.0]]
GATES = [[1.0, 0.1], [0.3, 0.7]]


def test_topk_probability_and_expected_overlap_with_ties():
    np.testing.assert_allclose(compare.topk_probability([1, 1, 0.7, 0.7, 0.3], 3), [1, 1, 0.5, 0.5, 0])
    assert compare.topk_probability([1, 2], 0).sum() == 0 and compare.topk_probability([1, 2], 5).sum() == 2
    o = compare.expected_overlap(np.array([3, 2, 1, 0]), np.array([1, 1, 1, 0]), 2)
    assert o["overlap"] == pytest.approx(4 / 3) and o["ties"] == [0, 3] and o["chance"] == 1.0
    o = compare.expected_overlap(np.arange(10.0), np.arange(10.0)[::-1], 3)
    assert (o["overlap"], o["frac"], o["ties"], o["chance"]) == (0.0, 0.0, [0, 0], 0.9)


def _rankings():
    from rhead_jax.rankings import Ranking
    return [Ranking("copy", np.array(COPY), "query"), Ranking("duo", np.array(GATES), "kv"),
            Ranking("mass", np.array(COPY)[:, ::-1], "query"), Ranking("other", np.zeros((3, 4)), "query")]


def test_compare_rankings_known_answers():
    cmp = compare.compare_rankings(_rankings(), ks=[2, "50%"])
    assert {r["name"]: r["group_size"] for r in cmp["rankings"]} == {"copy": 2, "duo": 2, "mass": 2, "other": None}
    pairs = {(p["a"], p["b"]): p for p in cmp["pairs"]}
    kv = pairs["copy", "duo"]["levels"]["kv"]
    assert (kv["heads"], kv["group_size"]) == (4, 2) and kv["spearman"] == pytest.approx(0.4)
    assert [(o["k_spec"], o["k"], o["overlap"]) for o in kv["overlap"]] == [("2", 2, 1.0), ("50%", 2, 1.0)]
    q = pairs["copy", "duo"]["levels"]["query"]  # the gates repeated over their 2 query heads: ties in pairs
    copy_q, duo_q = np.ravel(COPY), np.repeat(GATES, 2, axis=1).ravel()
    assert q["heads"] == 8 and q["spearman"] == pytest.approx(stats.spearmanr(copy_q, duo_q).statistic)
    # top-4 (50%) query heads: copy {0-0, 1-1, 1-0, 0-3} vs the gates' {0-0, 0-1, 1-2, 1-3}: one shared
    assert q["overlap"][1]["k"] == 4 and q["overlap"][1]["overlap"] == 1.0
    mass = pairs["copy", "mass"]["levels"]
    assert set(mass) == {"query", "kv"}
    # mass = copy with each layer's heads reversed: per KV head [0.2, 0.9, 0.05, 0.6]; d = 2 -2 2 -2
    assert mass["kv"]["spearman"] == pytest.approx(-0.6)
    assert pairs["copy", "other"]["levels"] == {} and "layer counts" in pairs["copy", "other"]["note"]
    m = cmp["matrix"]["kv"]
    assert m["names"] == ["copy", "duo", "mass"] and m["spearman"][0][1] == m["spearman"][1][0] == pytest.approx(0.4)
    assert m["overlap"]["2"][0][1] == 0.5 and m["spearman"][2][2] == 1.0
    assert cmp["matrix"]["query"]["names"] == ["copy", "duo", "mass"]  # "other" has no partner of its shape


def test_compare_rankings_refuses_a_gate_file_of_no_model_present():
    from rhead_jax.rankings import Ranking
    with pytest.raises(UserError, match=r"gate file g.tsv \(2 layers x 3 KV heads\) matches none"):
        compare.compare_rankings([Ranking("copy", np.array(COPY), "query"),
                                   Ranking("g", np.zeros((2, 3)), "kv", "g.tsv")])
    with pytest.raises(UserError, match="group size 3"):
        compare.compare_rankings(_rankings()[:2], group_size=3)


def test_analyze_smollm2_shaped_gates_and_head_scores(tmp_path):
    """A fake SmolLM2 gate TSV [30 layers x 3 KV heads] next to head_scores.json [30 x 9]: G = 3 inferred."""
    from rhead_jax.rankings import write_gates_tsv
    rng = np.random.default_rng(0)
    copy = rng.random((30, 9)) ** 4
    hs = write_json(tmp_path / "head_scores.json", {f"{l}-{h}": [copy[l, h]] for l in range(30) for h in range(9)})
    gates = tmp_path / "full_attention_heads.tsv"
    write_gates_tsv(gates, copy.reshape(30, 3, 3).max(-1) / copy.max())  # the copy scores' own KV ranking
    out = tmp_path / "out"
    res = analysis.analyze([f"copy:{hs}", f"duo:{gates}"], out, overlap_k=["20", "25%"])
    cmp = json.loads((out / "rankings.json").read_text())
    assert cmp == json.loads(json.dumps(res["rankings"]))
    p = cmp["pairs"][0]
    assert (p["a"], p["b"], set(p["levels"])) == ("copy", "duo", {"query", "kv"})
    assert p["levels"]["kv"]["spearman"] == pytest.approx(1.0) and p["levels"]["kv"]["heads"] == 90
    # 25% of 90 KV heads = 22.5 -> 23
    assert [o["overlap"] for o in p["levels"]["kv"]["overlap"]] == [pytest.approx(20), pytest.approx(23)]
    assert p["levels"]["query"]["heads"] == 270 and p["levels"]["query"]["overlap"][1]["k"] == 68
    assert list(res["summary"]) == ["copy"]  # buckets are the head-score files'
    html = (out / "report.html").read_text()
    for name in ("rankings_query.png", "rankings_kv.png", "duo_gates.png", "copy_heatmap.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
        assert analysis_data_uri(out / name) in html, name
    assert "Ranking comparison" in html and "Spearman ρ" in html and "top-25%" in html and "Gate files" in html
    assert json.loads((out / "provenance.json").read_text())["labels"] == {"copy": str(hs), "duo": str(gates)}


def analysis_data_uri(path):
    from rhead_jax.report.html import data_uri
    return data_uri(path)
