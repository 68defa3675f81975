"""rhead_jax.ablation.heads: mask specs, random pools, head masks and head-score files."""
from __future__ import annotations

import numpy as np
import pytest

from rhead_jax import ablation
from rhead_jax.ablation import MaskSpec, build_head_mask, parse_mask_spec
from tests.helpers.ablation_scores import H, L, RETRIEVAL, SCORES


def test_parse_mask_spec():
    assert parse_mask_spec("none") == [] and parse_mask_spec("top:0", SCORES) == []
    assert parse_mask_spec("top:2", SCORES) == [(0, 0), (0, 3)]  # best first
    assert parse_mask_spec("list:16-19,11-15") == [(16, 19), (11, 15)]
    assert MaskSpec.parse(" random:3 ") == MaskSpec("random", 3)
    assert MaskSpec.parse("list:1-2,0-3").text == "list:1-2,0-3"
    for bad, msg in [("bottom:3", "unknown mask spec"), ("top:x", "integer"), ("top:-1", ">= 0"),
                     ("list:1-2,3", "malformed head"), ("list:1-2,1-2", "more than once"), ("", "unknown mask")]:
        with pytest.raises(ValueError, match=msg):
            MaskSpec.parse(bad)
    with pytest.raises(ValueError, match="needs a head-score file"):
        parse_mask_spec("top:2")
    with pytest.raises(ValueError, match="only 8 heads"):
        parse_mask_spec("top:9", SCORES)
    with pytest.raises(ValueError, match=r"only 5 heads score <= 0.1"):
        parse_mask_spec("random:6", SCORES)
    with pytest.raises(ValueError, match=r"out of range for the model's 2 layers x 4 query heads"):
        parse_mask_spec("list:0-1,2-0", num_layers=L, num_heads=H)


def test_random_heads_exclude_retrieval_heads_and_are_deterministic():
    pool = set(ablation.random_pool(SCORES))
    assert pool == {(0, 1), (0, 2), (1, 0), (1, 2), (1, 3)}  # 1-3 scores exactly 0.1: <= threshold
    draws = {}
    for seed in range(20):
        a = parse_mask_spec("random:3", SCORES, seed=seed)
        assert a == parse_mask_spec("random:3", SCORES, seed=seed)  # once per seed
        assert len(set(a)) == 3 and set(a) <= pool and not set(a) & RETRIEVAL
        assert set(parse_mask_spec("random:2", SCORES, seed=seed)) <= set(a)  # nested in k
        draws[seed] = tuple(a)
    assert len(set(draws.values())) > 1  # seeds matter


def test_build_head_mask():
    cfg = type("Cfg", (), {"num_layers": L, "num_heads": H})()
    m = build_head_mask(cfg, [(0, 1), (1, 3)])
    assert m.shape == (L, H) and m.dtype == np.float32
    assert m[0, 1] == 0 and m[1, 3] == 0 and m.sum() == L * H - 2
    assert (build_head_mask((L, H), []) == 1).all()
    with pytest.raises(ValueError, match="out of range"):
        build_head_mask(cfg, [(2, 0)])
    assert ablation.phase_masks(m, "decode")[0] is None and ablation.phase_masks(m, "all")[0] is m


def test_scores_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; run `python -m rhead_jax.sweep"):
        ablation.load_scores(tmp_path / "nope.json")
    for text, msg in [("{", "not valid JSON"), ("[]", "non-empty JSON object"), ('{"a-b": [1]}', "malformed head"),
                      ('{"0-1": 3}', "list of numbers")]:
        p = tmp_path / "s.json"
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            ablation.load_scores(p)
    with pytest.raises(ValueError, match="from a different model"):
        ablation.check_scores({"0-0": [1], "5-0": [1]}, L, H, "x.json")


# ------------------------------------------------------------------------------ several rankings
GATES = [[0.1, 0.8], [0.9, 0.0]]  # [L, K]: 2 KV heads per layer, G = 2 (query heads 0-1 | 2-3)


def _rankings(tmp_path):
    import json

    from rhead_jax.rankings import write_gates_tsv
    (tmp_path / "head_scores.json").write_text(json.dumps(SCORES))
    write_gates_tsv(tmp_path / "gates.tsv", GATES)
    return ablation.load_rankings(f"copy:{tmp_path / 'head_scores.json'},kv:{tmp_path / 'gates.tsv'},"
                                  f"copy2:{tmp_path / 'head_scores.json'}")


def test_mask_spec_with_a_ranking():
    s = MaskSpec.parse("top:5@mass")
    assert (s.kind, s.k, s.ranking, s.text, s.slug) == ("top", 5, "mass", "top:5@mass", "top5-mass")
    assert MaskSpec.parse("top:0@mass") == MaskSpec("none")
    for bad in ("random:3@mass", "top:3@", "list:0-1@x"):
        with pytest.raises(ValueError, match="only top:K takes a ranking"):
            MaskSpec.parse(bad)


def test_load_rankings(tmp_path):
    data, ranks = ablation.load_rankings(_write(tmp_path))
    assert data == SCORES and list(ranks) == [""]  # one unnamed file: the single-file behaviour
    data, ranks = _rankings(tmp_path)
    assert data is None and list(ranks) == ["copy", "kv", "copy2"] and ranks["kv"].kind == "kv"
    _, ranks = ablation.load_rankings(f"{tmp_path / 'gates.tsv'},{tmp_path / 'head_scores.json'}")
    assert list(ranks) == ["gates", "head_scores"]  # unnamed entries: the file stem
    with pytest.raises(ValueError, match="names two rankings 'copy'"):
        ablation.load_rankings(f"copy:{tmp_path / 'gates.tsv'},copy:{tmp_path / 'head_scores.json'}")
    with pytest.raises(ValueError, match="gate file .*missing.tsv not found"):
        ablation.load_rankings(f"copy:{tmp_path / 'head_scores.json'},g:{tmp_path / 'missing.tsv'}")
    with pytest.raises(ValueError, match="no head-score file given"):
        ablation.load_rankings(" , ")


def _write(tmp_path):
    import json
    p = tmp_path / "single.json"
    p.write_text(json.dumps(SCORES))
    return str(p)


def test_heads_chosen_for_each_ranking_and_k(tmp_path):
    _, ranks = _rankings(tmp_path)
    groups = ablation.plan_groups(MaskSpec.parse("top:2"), seeds=[0, 1], sweep_k=[0, 1, 3], scores=ranks,
                                  num_layers=L, num_heads=H, group_size=2)
    by = {g.spec.text: g for g in groups}
    assert list(by) == ["none", "top:2@copy", "top:1@copy", "top:1@kv", "top:1@copy2", "random:1",
                        "top:3@copy", "top:3@kv", "top:3@copy2", "random:3"]  # top:2 = the first ranking's
    heads = {t: [r.heads for r in g.runs] for t, g in by.items()}
    assert heads["top:3@copy"] == heads["top:3@copy2"] == [((0, 0), (0, 3), (1, 1))]
    # KV heads best first: 1-0 (0.9), 0-1 (0.8), 0-0, 1-1; their query heads in order until k
    assert heads["top:1@kv"] == [((1, 0),)] and heads["top:3@kv"] == [((1, 0), (1, 1), (0, 2))]
    # random heads: the first ranking's pool, as a single file's; the same whatever the other rankings
    assert heads["random:3"] == [tuple(parse_mask_spec("random:3", SCORES, seed=s)) for s in (0, 1)]
    # runs that mask the same heads share one store; labels stay per ranking
    runs = {g.spec.text: g.runs[0] for g in groups}
    assert runs["top:3@copy"].store == runs["top:3@copy2"].store != runs["top:3@kv"].store
    assert runs["top:3@copy"].label == "top3-copy" and runs["top:3@copy"].store.startswith("top3-h")
    assert runs["random:1"].store == runs["random:1"].label == "random1-seed0"
    with pytest.raises(ValueError, match="no ranking named 'mass'; --scores gives copy, kv, copy2"):
        ablation.plan_groups(MaskSpec.parse("top:2@mass"), seeds=[0], scores=ranks, num_layers=L, num_heads=H)
    with pytest.raises(ValueError, match="no ranking named 'copy'; --scores gives one unnamed file"):
        parse_mask_spec("top:2@copy", SCORES)
    with pytest.raises(ValueError, match="ranking kv has only 8 query heads"):
        ablation.plan_groups(MaskSpec("top", 9, ranking="kv"), seeds=[0], scores=ranks, num_layers=L,
                             num_heads=H, group_size=2)


def test_sweep_k_table_of_several_rankings():
    def g(acc, runs=None):
        return {"accuracy": acc, "accuracy_std": 0.0, "accuracy_by_run": runs or {"x": acc}}

    groups = {"none": g(1.0), "top:5@copy": g(0.2), "top:5@kv": g(0.6),
              "random:5": {**g(0.9, {"random5-seed0": 0.8, "random5-seed1": 1.0}), "accuracy_std": 0.1}}
    t = ablation.sweep_k_table([0, 5], groups, [0, 1], ["copy", "kv"])
    assert t["rankings"] == ["copy", "kv"] and t["by_ranking"] == {"copy": [1.0, 0.2], "kv": [1.0, 0.6]}
    assert t["top"] == [1.0, 0.2] and t["baseline"] == 1.0
    assert (t["random_min"], t["random_max"]) == ([1.0, 0.8], [1.0, 1.0])
    from rhead_jax.ablation.results import sweep_k_csv, sweep_k_markdown
    assert sweep_k_csv(t).splitlines()[0] == ("k,top_copy_accuracy,top_kv_accuracy,random_accuracy_mean,"
                                              "random_accuracy_std,random_seed0,random_seed1,random_min,random_max")
    md = sweep_k_markdown(t)
    assert "| k | copy | kv | random |" in md and "| 5 | 20.0 | 60.0 | 90.0 ± 10.0 [80.0–100.0] |" in md
    assert "no head masked: 100.0" in md


def test_rankings_masking_the_same_heads_in_another_order_share_a_run():
    from rhead_jax.ablation.run import _run_json
    from rhead_jax.config import default_config

    task = type("Task", (), {"tag": "niah", "pinned": lambda self: {}})()
    a = ablation.Run(MaskSpec("top", 2, ranking="copy"), None, ((0, 3), (0, 0)))
    b = ablation.Run(MaskSpec("top", 2, ranking="mass"), None, ((0, 0), (0, 3)))
    assert a.label != b.label and a.store == b.store
    assert _run_json(default_config(), task, a) == _run_json(default_config(), task, b)


def test_each_rankings_accuracy_carries_a_bootstrap_interval_over_its_tests():
    from rhead_jax.ablation.heads import Group, MaskSpec, Run
    from rhead_jax.ablation.results import accuracy_interval, group_summary, sweep_k_markdown

    scores = [0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.25]
    lo, hi = accuracy_interval(scores)
    assert lo < np.mean(scores) < hi and 0.0 <= lo and hi <= 1.0
    assert accuracy_interval([0.5] * 9) == [0.5, 0.5] and accuracy_interval([]) is None
    assert accuracy_interval(scores[:3]) != accuracy_interval(scores)     # fewer tests, another interval
    spec = MaskSpec.parse("top:5@copy")
    run = Run(spec=spec, seed=None, heads=((0, 0),))
    group = Group(spec=spec, runs=(run,))
    summary = {run.label: {"accuracy": float(np.mean(scores)), "tests": 9, "metrics": {}}}
    records = {run.label: [{"score": s} for s in scores]}
    out = group_summary(group, summary, records)
    assert out["accuracy_interval"] == [lo, hi]
    groups = {"none": {"accuracy": 1.0, "accuracy_std": 0.0, "accuracy_by_run": {"none": 1.0}},
              "top:5@copy": out,
              "random:5": {"accuracy": 0.9, "accuracy_std": 0.0, "accuracy_by_run": {"random5-seed0": 0.9}}}
    t = ablation.sweep_k_table([5], groups, [0], ["copy"])
    assert t["rows"][0]["by_ranking_interval"] == {"copy": [lo, hi]}
    md = sweep_k_markdown(t)
    assert f"| 5 | {100 * np.mean(scores):.1f} [{100 * lo:.1f}–{100 * hi:.1f}] | 90.0" in md
    assert "95% bootstrap interval over its tests" in md
