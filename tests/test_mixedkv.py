"""rhead_jax.mixedkv: which heads stay full, the evaluation on the engine, its command, and the mixed
cache on a mesh of 8 simulated devices (equal to one device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import config as config_lib
from rhead_jax.errors import UserError
from rhead_jax.mixedkv import full_heads, num_full, parse_choices, plan_runs, top_full, with_overrides
from rhead_jax.needle.haystack import SAN_FRANCISCO_NEEDLES_PATH
from rhead_jax.rankings import write_gates_tsv
from tests.helpers.config_files import write_config
from tests.helpers.tiny_smol import make_tiny_smol
from tests.test_cli import assert_user_error, run_cli

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- head choice
def test_fraction_rounding():
    assert [num_full(f, 90) for f in (0.1, 0.25, 0.5, 1.0)] == [9, 23, 45, 90]   # ceil: at least the fraction
    assert num_full(0.001, 90) == 1 and num_full(0.3, 10) == 3                   # 0.3 x 10 is 3.0000000000000004
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        num_full(0.0, 90)


def test_top_full_breaks_ties_by_layer_then_head():
    s = np.array([[0.5, 0.9], [0.9, 0.5], [0.1, 0.9]])
    np.testing.assert_array_equal(top_full(s, 2), [[False, True], [True, False], [False, False]])
    np.testing.assert_array_equal(top_full(s, 3), [[False, True], [True, False], [False, True]])
    np.testing.assert_array_equal(top_full(np.zeros((2, 2)), 3), [[True, True], [True, False]])
    np.testing.assert_array_equal(top_full(np.array([[np.nan, 0.0]]), 1), [[False, True]])


def test_copy_scores_are_max_aggregated_to_kv_heads(tmp_path):
    # 2 layers x 4 query heads, 2 per KV head: one strong query head makes its KV head full
    scores = {"0-0": [0.0], "0-1": [0.9], "0-2": [0.3], "0-3": [0.3], "1-0": [0.2], "1-1": [0.2],
              "1-2": [0.0], "1-3": [0.5]}
    (tmp_path / "s.json").write_text(json.dumps(scores))
    [c] = parse_choices([f"copy:{tmp_path / 's.json'}"])
    assert (c.name, c.kind, c.source) == ("copy", "ranking", str(tmp_path / "s.json"))
    np.testing.assert_array_equal(full_heads(c, 2, 2, 2, fraction=0.5), [[True, False], [False, True]])
    # a mean would rank KV head (0, 1) (0.3) over (1, 1) (0.25); the max keeps (1, 1) (0.5) first
    np.testing.assert_array_equal(full_heads(c, 2, 2, 2, fraction=0.25), [[True, False], [False, False]])
    with pytest.raises(UserError, match="2 layers x 4 query heads"):
        full_heads(c, 3, 2, 2, fraction=0.5)


def test_gate_tsv_random_none_all(tmp_path):
    write_gates_tsv(tmp_path / "g.tsv", [[0.2, 1.3], [-0.1, 0.7]])
    choices = parse_choices([f"gates:{tmp_path / 'g.tsv'}", "random", "none", "all"])
    gates, rnd, none, all_ = choices
    np.testing.assert_array_equal(full_heads(gates, 2, 2, 4, fraction=0.5), [[False, True], [False, True]])
    a, b = (full_heads(rnd, 6, 4, 2, fraction=0.25, seed=s) for s in (0, 1))
    assert a.sum() == b.sum() == 6 and (a != b).any()
    np.testing.assert_array_equal(a, full_heads(rnd, 6, 4, 2, fraction=0.25, seed=0))  # reproducible
    assert not full_heads(none, 6, 4, 2).any() and full_heads(all_, 6, 4, 2).all()
    runs = plan_runs(choices, [0.25, 0.5], [0, 1], num_layers=2, num_kv_heads=2, group_size=4)
    assert [r.label for r in runs] == ["gates-f0.25", "gates-f0.5", "random-f0.25-s0", "random-f0.25-s1",
                                       "random-f0.5-s0", "random-f0.5-s1", "none", "all"]
    assert runs[0].heads == [[0, 1]]


def test_bad_choices_and_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_choices(["copy:/nonexistent/scores.json"])
    with pytest.raises(UserError, match="given twice"):
        parse_choices(["random", "random"])
    c = config_lib.default_config()
    for key, value, msg in (("full_fraction", (0.5, 1.5), "full_fraction"), ("recent", 0, "recent"),
                            ("seeds", (1, 1), "seeds"), ("depths", (120,), "depths"), ("heads", (), "heads")):
        bad = c.copy_and_resolve_references()
        bad.mixedkv[key] = value
        with pytest.raises(UserError, match=msg):
            config_lib.validate(bad)
    c.mixedkv.lengths, c.mixedkv.depths = (2000,), (10, 90)
    g = with_overrides(c, full_fraction=[0.3], seeds=[4])
    assert (tuple(g.sweep.lengths), tuple(g.sweep.depths), tuple(g.mixedkv.full_fraction), tuple(g.mixedkv.seeds)) \
        == ((2000,), (10, 90), (0.3,), (4,))


# ----------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixedkv")
    model = make_tiny_smol(tmp / "tiny", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           max_position_embeddings=512)
    return write_config(tmp / "tiny_config.py", model, needles=SAN_FRANCISCO_NEEDLES_PATH, lengths=(300,),
                        depths=(50,), max_new_tokens=4)


def test_run_writes_results_and_resumes(tiny_config, tmp_path, capsys):
    from absl import flags
    from ml_collections import config_flags

    from rhead_jax.mixedkv import run_mixedkv

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(["p", f"--config={tiny_config}"])
    config = fv.config
    config.mixedkv.sink, config.mixedkv.recent = 4, 32
    wd = tmp_path / "wd"
    res = run_mixedkv(config, str(wd), heads=["random", "none", "all"], full_fraction=[0.5], seeds=[0])
    assert sorted(res["runs"]) == ["all", "none", "random-f0.5-s0"]
    assert {p.name for p in wd.iterdir()} == {"runs", "results.json", "table.md", "accuracy_vs_kv.png"}
    g = {x["choice"]: x for x in res["groups"]}
    full = res["full_kv_bytes_per_instance"]["300"]
    assert g["all"]["kv_bytes_per_instance"]["300"] == full and g["all"]["kv_fraction"] == 1.0   # measured == plain
    assert g["none"]["kv_bytes_per_instance"]["300"] < g["random"]["kv_bytes_per_instance"]["300"] < full
    assert g["random"]["full_kv_heads"] == 2 and g["none"]["full_kv_heads"] == 0
    assert "| random | 0.5 | 2/4 |" in capsys.readouterr().out
    # a second invocation recomputes nothing and writes the same numbers
    again = run_mixedkv(config, str(wd), heads=["random", "none", "all"], full_fraction=[0.5], seeds=[0])
    assert again["groups"] == res["groups"]


def test_cli_bad_input(tiny_config, tmp_path):
    wd = tmp_path / "wd"
    assert_user_error(run_cli("rhead_jax.mixedkv", "--config", tiny_config, "--workdir", wd,
                              "--heads", "copy:/nonexistent/s.json"), "/nonexistent/s.json", "not found")
    assert_user_error(run_cli("rhead_jax.mixedkv", "--config", tiny_config, "--workdir", wd,
                              "--full_fraction", "0.1,x"), "--full_fraction")
    assert_user_error(run_cli("rhead_jax.mixedkv", "--config", tiny_config, "--workdir", wd,
                              "--full_fraction", "0.5,2"), "config.mixedkv.full_fraction")
    assert_user_error(run_cli("rhead_jax.mixedkv", "--config", tiny_config, "--config.mixedkv.sink=-1"),
                      "config.mixedkv.sink")
    assert not wd.exists()


def test_a_sweep_grid_override_the_mixedkv_grid_replaces_is_refused(tmp_path):
    # smollm2_135m.py sets config.mixedkv.lengths: --config.sweep.lengths alone would be ignored
    wd = tmp_path / "wd"
    assert_user_error(run_cli("rhead_jax.mixedkv", "--config", "smollm2_135m.py", "--workdir", wd,
                              "--config.sweep.lengths=(500,)"), "--config.sweep.lengths has no effect",
                      "--config.mixedkv.lengths")
    assert not wd.exists()
    from rhead_jax.config import default_config
    from rhead_jax.mixedkv.run import check_grid_overrides

    c = default_config()
    check_grid_overrides(c, {"sweep.lengths"})         # no mixedkv grid: the sweep's is the grid
    c.mixedkv.lengths = (2000,)
    check_grid_overrides(c, {"sweep.lengths", "mixedkv.lengths"})  # both given: the mixedkv one is meant
    check_grid_overrides(c, {"sweep.depths"})           # depths are the sweep's


# ----------------------------------------------------------------------------------- meshes
def test_mixed_cache_on_8_devices_equals_one_device(tmp_path):
    model = make_tiny_smol(tmp_path / "gqa")  # 8 query heads, 2 KV heads
    meshes = ["1,1,1", "4,2,1", "1,8,1"]   # rows on 4 data shards + 2 head groups on "model"; replicated cache
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    p = subprocess.run([sys.executable, "-m", "tests.helpers.mixed_sharded_check", "--model_dir", str(model),
                        "--meshes", *meshes], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    ref = res["1,1,1"]
    assert res["4,2,1"]["groups"] == 2 and "model" in res["4,2,1"]["spec"]   # the head groups on "model"
    assert res["1,8,1"]["groups"] == 1                                         # 8 does not divide 2: replicated
    for m in meshes[1:]:
        assert res[m]["tokens"] == ref["tokens"], m
        assert res[m]["topk_index"] == ref["topk_index"], m
        np.testing.assert_allclose(np.array(res[m]["topk_weight"]), np.array(ref["topk_weight"]), atol=1e-5)
