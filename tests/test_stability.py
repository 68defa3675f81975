"""rhead_jax.stability (issue 27, ask 2): bootstrap intervals, uncertain heads, top-k frequency and the
convergence curve on synthetic files whose answer is known; stability.json and the report via analyze."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from rhead_jax import analysis, stability as st
from tests.head_score_data import write_json


def _file(S: np.ndarray) -> dict[str, list[float]]:
    """{"0-h": column h of S [T, N]}."""
    return {f"0-{h}": S[:, h].tolist() for h in range(S.shape[1])}


def test_resample_counts_draw_t_tests_with_replacement():
    W = st.resample_counts(7, 500, np.random.default_rng(3))
    assert W.shape == (500, 7) and (W.sum(1) == 7).all() and (W >= 0).all()
    assert (W == st.resample_counts(7, 500, np.random.default_rng(3))).all()      # seeded
    assert abs(W.mean() - 1.0) < 1e-12 and 0.7 < W.var() < 1.0                    # multinomial: var = 1 - 1/T


def test_interval_has_the_normal_width_and_95_percent_coverage():
    """400 heads of i.i.d. N(0.3, 0.2^2) scores over T = 400 tests: each interval is 0.3 +- 1.96 * 0.2 / 20
    wide, and about 95% of them contain 0.3."""
    rng = np.random.default_rng(0)
    T, N, mu, sigma = 400, 400, 0.3, 0.2
    S = rng.normal(mu, sigma, (T, N))
    ci = st.intervals(st.bootstrap_means(S, 2000, seed=1))
    half = (ci[:, 1] - ci[:, 0]) / 2
    expected = 1.96 * S.std(0, ddof=1) / np.sqrt(T)
    assert np.allclose(half, expected, rtol=0.12)
    coverage = ((ci[:, 0] <= mu) & (mu <= ci[:, 1])).mean()
    assert 0.91 <= coverage <= 0.98, coverage


def test_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.exponential(0.2, 150)
    ours = st.intervals(st.bootstrap_means(x[:, None], 4000, seed=2))[0]
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert ours == pytest.approx([ref.low, ref.high], abs=0.004)


def test_straddle_range_frequency_and_convergence_on_a_known_file():
    """Heads: 0.6 (x 3, sure retrieval heads), 0.1 (x 2, on the threshold: uncertain), 0.0 (x 5, never)."""
    rng = np.random.default_rng(2)
    T = 200
    means = np.array([0.6, 0.61, 0.62, 0.1, 0.1, 0, 0, 0, 0, 0])
    S = np.clip(means + rng.normal(0, 0.05, (T, 10)) * (means > 0), 0, None)
    e = st.stability(_file(S), k=3, resamples=500, draws=50)
    assert e["tests"] == T and e["k"] == 3
    assert set(e["straddle"]) == {"0-3", "0-4"}
    lo, hi = e["retrieval_heads_range"]
    assert (lo, hi) == (3, 5) and lo <= e["retrieval_heads"] <= hi
    assert set(e["top_k"]) == {"0-0", "0-1", "0-2"}
    assert all(e["top_k_frequency"][h] == 1.0 for h in ("0-0", "0-1", "0-2"))
    assert all(e["top_k_frequency"][f"0-{h}"] == 0.0 for h in range(3, 10))
    assert list(e["convergence"]) == ["5", "10", "20", "50", "100", "200"]
    assert all(v == 3.0 for v in e["convergence"].values())                     # separated: 5 tests find them
    assert e["tests_for_overlap"] == {"2": 5, "3": 5} and e["tests_for_overlap_90"] == {"2": 5}
    assert set(e["ci"]) == {f"0-{h}" for h in range(10)} and all(a <= b for a, b in e["ci"].values())
    assert e["top_k_frequency_threshold"]["k"] == e["retrieval_heads"]


def test_two_equal_heads_share_the_last_top_k_place():
    """Heads 0-0 and 0-1 score alike on average; only one fits in the top 1: each about half the time,
    and n random tests find the full data's top 1 about half the time (plus what n = T fixes)."""
    rng = np.random.default_rng(4)
    S = rng.normal(0.5, 0.1, (300, 2))
    S[:, 1] = rng.permutation(S[:, 0])   # the same values in another order: equal means
    S[0, 0] += 1e-9                      # 0-0 first on all tests
    f = st.top_k_frequency(st.bootstrap_means(S, 2000, seed=0), 1)
    assert 0.35 < f[0] < 0.65 and f.sum() == pytest.approx(1.0)
    conv = st.convergence(S, 1, draws=400)
    assert 0.35 < conv["50"] < 0.65 and conv["300"] == 1.0
    # 1 of the top 1 in half the draws: the mean reaches 0.5 early, 90% of the draws only near all tests
    assert st.tests_for(S, 1, 0.5, draws=400) <= 50 and st.tests_for(S, 1, 1, draws=400, share=0.9) >= 250


def test_stop_rule_waits_for_two_settled_rounds():
    sep = {"settled": True, "top_k": [0, 1, 2]}
    assert not st.should_stop([sep])
    assert st.should_stop([sep, dict(sep, top_k=[0, 1, 3])])          # one head moved: within the slack
    assert not st.should_stop([sep, dict(sep, top_k=[0, 4, 3])])      # two moved
    assert not st.should_stop([sep, dict(sep, settled=False)])
    rng = np.random.default_rng(5)
    means = np.r_[np.linspace(0.9, 0.5, 10), np.zeros(30)]
    S = np.clip(means + rng.normal(0, 0.05, (100, 40)), 0, None)
    assert st.stop_check(S[:9])["settled"] is False                        # fewer than STOP_MIN_TESTS
    r = st.replay(S, 10, 10, seed=0, resamples=300)
    assert r == {"seed": 0, "stopped_at": 20, "of": 100, "stopped": True, "overlap": 10}
    noisy = rng.exponential(0.3, (60, 40))                                 # no structure: never settles
    assert st.replay(noisy, 10, 10, seed=0, resamples=300)["stopped_at"] == 60


def test_analyze_writes_stability_json_and_intervals_in_the_report(tmp_path):
    rng = np.random.default_rng(6)
    means = np.array([0.8, 0.5, 0.12, 0.05, 0.0, 0.0])
    S = np.clip(means + rng.normal(0, 0.1, (60, 6)) * (means > 0), 0, None)
    f = write_json(tmp_path / "m.json", _file(S))
    out = tmp_path / "out"
    res = analysis.analyze([f], out, top_k=4)
    e = json.loads((out / "stability.json").read_text())["m.json"]
    assert e == json.loads(json.dumps(res["stability"]["m.json"]))
    assert {"tests", "k", "convergence", "straddle", "ci", "top_k_frequency"} <= set(e)
    assert e["tests"] == 60 and e["k"] == 6 and list(e["convergence"]) == ["5", "10", "20", "50", "60"]
    assert e["straddle"] == ["0-2"] and e["ci"]["0-0"][0] < 0.8 < e["ci"]["0-0"][1]
    page = (out / "report.html").read_text()
    lo, hi = e["ci"]["0-0"]
    assert "How sure are the scores" in page and "95% interval" in page and f"[{lo:.3f}, {hi:.3f}]" in page
    assert (out / "stability_convergence.png").stat().st_size > 0 and (out / "m_intervals.png").stat().st_size > 0


def test_a_file_of_empty_lists_has_no_intervals(tmp_path):
    f = write_json(tmp_path / "empty.json", {"0-0": [], "0-1": []})
    res = analysis.analyze([f], tmp_path / "out", report=True)
    assert res["stability"]["empty.json"]["tests"] == 0
    with pytest.raises(ValueError, match="no tests"):
        st.stability({"0-0": []})


def test_report_says_up_front_when_few_tests_were_kept(tmp_path):
    rows = [{"key": f"L100_D{i}_N0", "length": 100, "depth": i, "needle_index": 0, "rouge1_recall": float(i == 0),
             "kept": i == 0, "scores": [[0.5, 0.0]]} for i in range(8)]
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = write_json(tmp_path / "m.json", {"0-0": [0.5], "0-1": [0.0]})
    analysis.analyze([f], tmp_path / "out", results=str(res))
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Only 1 of 8 tests (12%) passed the ROUGE gate." in page
    assert page.index("Few tests kept") < page.index("How sure are the scores")
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps(dict(r, kept=r["depth"] < 2)) + "\n" for r in rows))   # 2 of 8: a quarter
    analysis.analyze([f], tmp_path / "out2", results=str(ok))
    assert "Few tests kept" not in (tmp_path / "out2" / "report.html").read_text()
