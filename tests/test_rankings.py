"""rhead_jax.rankings: the two file kinds, the KV <-> query levels, group sizes, the heads an ablation masks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rhead_jax import rankings as rk
from rhead_jax.errors import UserError

# 1 layer, 6 query heads, 2 KV heads (G = 3): query heads 0-2 read KV head 0, 3-5 KV head 1
Q = rk.Ranking("q", np.array([[0.1, 0.9, 0.0, 0.3, 0.3, 0.2]]), "query")
KV = rk.Ranking("kv", np.array([[0.2, 1.0]]), "kv")


def test_levels_max_and_repeat():
    np.testing.assert_array_equal(Q.per_kv(3), [[0.9, 0.3]])  # max over each KV head's query heads
    np.testing.assert_array_equal(KV.per_query(3), [[0.2, 0.2, 0.2, 1.0, 1.0, 1.0]])
    assert Q.per_query(3) is Q.scores and KV.per_kv(3) is KV.scores
    with pytest.raises(UserError, match="not a multiple of the group size 4"):
        Q.per_kv(4)


def test_top_query_heads_of_query_and_kv_rankings():
    assert Q.top_query_heads(3) == [(0, 1), (0, 3), (0, 4)]  # tie 0.3/0.3: head order
    assert Q.ties_at_cut(3) == 0 and Q.ties_at_cut(2) == 2  # k=2 cuts between 3 and 4, both 0.3
    # KV heads best first, their query heads in order, until k query heads: the last KV head in part
    assert KV.top_query_heads(2, 3) == [(0, 3), (0, 4)]
    assert KV.top_query_heads(4, 3) == [(0, 3), (0, 4), (0, 5), (0, 0)]
    assert KV.ties_at_cut(2, 3) == 3 and KV.ties_at_cut(3, 3) == 0
    two_layers = rk.Ranking("g", np.array([[0.5, 0.5], [0.5, 0.9]]), "kv")
    assert two_layers.top_query_heads(3, 2) == [(1, 2), (1, 3), (0, 0)]  # ties: layer, then KV head


def test_group_sizes_inferred_given_and_refused():
    smol_q = rk.Ranking("copy", np.zeros((30, 9)), "query")
    smol_kv = rk.Ranking("duo", np.zeros((30, 3)), "kv")
    other = rk.Ranking("other", np.zeros((32, 32)), "query")
    assert rk.group_sizes([smol_q, smol_kv, other]) == {"copy": 3, "duo": 3, "other": None}
    assert rk.group_sizes([smol_q, other], group_size=1) == {"copy": 1, "other": 1}
    with pytest.raises(UserError, match="not a multiple of the group size 2"):
        rk.group_sizes([smol_q], group_size=2)
    with pytest.raises(UserError, match=r"group sizes \[3, 9\]"):
        rk.group_sizes([smol_q, smol_kv, rk.Ranking("one", np.zeros((30, 1)), "kv")])


def test_comparable_levels():
    a, b = Q, rk.Ranking("q2", Q.scores[:, ::-1], "query")
    assert rk.comparable(a, KV, 3, 3)[0] == {"query": 3, "kv": 3}
    assert rk.comparable(a, b, 3, 3)[0] == {"query": 3, "kv": 3}
    assert rk.comparable(a, b, None, None) == ({"query": None}, "group size unknown: per query head only")
    assert rk.comparable(a, b, 1, 1)[0] == {"query": 1}  # MHA: one level
    assert rk.comparable(KV, KV, 3, 3)[0] == {"kv": 3}
    levels, why = rk.comparable(a, KV, 2, 2)
    assert levels == {} and "6 query heads vs 2 KV heads" in why
    mha_kv = rk.Ranking("g", np.zeros((1, 6)), "kv")
    assert rk.comparable(a, mha_kv, 1, 1) == ({"kv": 1}, "MHA: per query head = per KV head")
    assert rk.comparable(a, rk.Ranking("x", np.zeros((2, 6)), "query"), 3, 3)[0] == {}


def test_files_specs_and_errors(tmp_path):
    js = tmp_path / "head_scores.json"
    js.write_text(json.dumps({"0-0": [0.5, 0.5], "0-1": [0.0, 1.0], "1-0": [], "1-1": [0.2, 0.0]}))
    r = rk.parse_ranking_spec(f"copy:{js}")
    assert (r.name, r.kind, r.path) == ("copy", "query", str(js))
    np.testing.assert_allclose(r.scores, [[0.5, 0.5], [0.0, 0.1]])
    assert rk.parse_ranking_spec(str(js)).name == "head_scores"
    tsv = tmp_path / "full_attention_heads.tsv"
    rk.write_gates_tsv(tsv, [[1.5, -0.1], [0.25, 0.75]])
    np.testing.assert_array_equal(rk.read_ranking(tsv).scores, [[1.0, 0.0], [0.25, 0.75]])  # clipped
    assert rk.split_spec("gs://bucket/a.json") == (None, "gs://bucket/a.json")
    assert rk.split_spec("mass:w/head_scores_mass.json") == ("mass", "w/head_scores_mass.json")
    bad = tmp_path / "bad.tsv"
    for text, match in [("1\t2\n3\n", "all of one length"), ("1\tx\n", "not a tab-separated float matrix"),
                        ("", "one row of KV-head gates"), ("nan\t1\n", "NaN")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=match):
            rk.read_ranking(bad)
    with pytest.raises(UserError, match="not found"):
        rk.read_ranking(tmp_path / "missing.tsv")
    with pytest.raises(UserError, match="is a directory"):
        rk.read_ranking(tmp_path)
    (tmp_path / "notes.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a head-score JSON"):
        rk.read_ranking(tmp_path / "notes.json")
    with pytest.raises(UserError, match="from a different model"):
        rk.check_ranking_shape(r, 2, 3, 1)


def test_resolve_k():
    assert [rk.resolve_k(k, 256) for k in ("20", 20, "25%", "50%", "100%", "1000")] == [20, 20, 64, 128, 256, 256]
    for bad in ("0", "x", "0%", "150%", "-3"):
        with pytest.raises(UserError, match="integer >= 1 or a percentage"):
            rk.resolve_k(bad, 10)


def _locos_file(path, scores: dict) -> None:
    """A head file as LOCOS writes it (aryopg/locos, detectors/logit_contrib.py's result_envelope)."""
    path.write_text(json.dumps({
        "meta": {"method": "logit_contribution", "dataset": "nolima", "num_trials_passed": 2, "model": "m"},
        "scores": scores, "trial_ids": ["t0", "t1"],
        "confidence_intervals": {k: [min(v), max(v)] for k, v in scores.items()}}, indent=2))


def test_released_locos_and_qrhead_files(tmp_path):
    """LOCOS's envelope reads as its "scores"; a QRHead head set ranks its heads best first."""
    from rhead_jax.analysis import headscores
    from rhead_jax.ablation.heads import load_scores

    scores = {"0-0": [0.5, -0.1], "0-1": [2.0, 1.0], "1-0": [-1.0, -3.0], "1-1": [0.0, 0.2]}
    _locos_file(tmp_path / "m_logit_contrib_nolima.json", scores)
    r = rk.read_ranking(tmp_path / "m_logit_contrib_nolima.json", "locos")
    np.testing.assert_allclose(r.scores, [[0.2, 1.5], [-2.0, 0.1]])
    assert r.top_query_heads(2) == [(0, 1), (0, 0)]
    assert headscores.load_head_scores(tmp_path / "m_logit_contrib_nolima.json") == scores
    assert load_scores(tmp_path / "m_logit_contrib_nolima.json") == scores
    (tmp_path / "qr.yaml").write_text('# Default configuration\n\nattn_head_set: "1-1,0-1,1-0" # top3\n'
                                      'model_base_class: "M"\nmodel_name_or_path: "org/M"\n')
    q = rk.read_ranking(tmp_path / "qr.yaml")
    assert q.name == "qr" and q.top_query_heads(3) == [(1, 1), (0, 1), (1, 0)]
    np.testing.assert_allclose(q.scores, [[0, 2 / 3], [1 / 3, 1]])
    assert rk.pad_head_scores(rk.read_qrhead_head_set(tmp_path / "qr.yaml"), 2, 3)["1-2"] == [0.0]
    for text, fragment in [("attn_head_set: 3\n", "expected `attn_head_set"), ("attn_head_set: \"1-1,x\"\n", "not '<layer>-<head>'"),
                           ("attn_head_set: \"1-1,1-1\"\n", "twice"), ("a: [\n", "not valid YAML")]:
        (tmp_path / "bad.yml").write_text(text)
        with pytest.raises(UserError, match=fragment):
            rk.read_ranking(tmp_path / "bad.yml")


def test_analyze_compares_released_files_with_ours(tmp_path):
    """analyze reads a LOCOS file and a QRHead head set (padded with 0 to the others' shape) beside ours."""
    from rhead_jax import analysis

    ours = {f"{l}-{h}": [float(l * 3 + h)] for l in range(2) for h in range(3)}
    (tmp_path / "head_scores.json").write_text(json.dumps(ours))
    _locos_file(tmp_path / "locos.json", {k: [v[0], v[0]] for k, v in ours.items()})
    (tmp_path / "qr.yaml").write_text('attn_head_set: "1-2,1-1"\n')
    res = analysis.analyze([f"ours:{tmp_path / 'head_scores.json'}", f"locos:{tmp_path / 'locos.json'}",
                            f"qr:{tmp_path / 'qr.yaml'}"], tmp_path / "out", report=False, overlap_k=["2"])
    assert res["data"]["qr"] == {**{k: [0.0] for k in ours}, "1-2": [1.0], "1-1": [0.5]}
    pairs = {(p["a"], p["b"]): p["levels"]["query"] for p in res["rankings"]["pairs"]}
    assert pairs[("ours", "locos")]["spearman"] == 1.0
    assert pairs[("ours", "qr")]["overlap"][0]["overlap"] == 2
