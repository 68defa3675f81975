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
