"""rhead_jax.dryrun.memory and .planner: presets, meshes, analytic per-device bytes, plans (analytic and
compiled in-process on one CPU device), the model shapes of a sweep config. The commands' tests
(subprocesses, simulated devices) are in test_dryrun_cli.py, the slice catalog's in test_dryrun_topology.py."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from rhead_jax import dryrun, presets, sharding
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes
from rhead_jax.config import default_config
from rhead_jax.errors import UserError
from rhead_jax.runner import Runner

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))


# ----------------------------------------------------------------------------- presets


def test_every_config_stem_maps_to_a_preset_that_parses():
    stems = {p.stem for p in CONFIGS}
    assert stems == set(presets.CONFIG_PRESETS)
    for stem in stems:
        cfg = presets.preset_config(presets.CONFIG_PRESETS[stem])
        assert isinstance(cfg, ModelConfig) and cfg.dtype == "bfloat16"
        # and by the config's own model.name, as sweep --dry_run looks it up
        spec = importlib.util.spec_from_file_location(stem, REPO / "configs" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert presets.resolve_preset(module.get_config().model.name) == presets.CONFIG_PRESETS[stem]


def test_preset_shapes():
    yi = presets.preset_config("Yi-34B-200K")
    assert (yi.hidden_size, yi.num_layers, yi.num_heads, yi.num_kv_heads, yi.intermediate_size, yi.vocab_size,
            yi.max_position_embeddings, yi.rope.theta) == (7168, 60, 56, 8, 20480, 64000, 200000, 5e6)
    q = presets.preset_config("qwen15_14b_chat")
    assert (q.hidden_size, q.num_layers, q.num_heads, q.num_kv_heads, q.intermediate_size, q.vocab_size,
            q.qkv_bias, q.sliding_window) == (5120, 40, 40, 40, 13696, 152064, True, None)
    mx = presets.preset_config("Mixtral-8x7B-v0.1")
    assert (mx.num_experts, mx.num_experts_per_tok, mx.num_kv_heads, mx.sliding_window) == (8, 2, 8, None)
    assert presets.preset_config("Yi-6B-200K").num_kv_heads == 4
    assert presets.preset_config("llama-2-7b-80k").max_position_embeddings == 81920
    # parameter counts are the published ones (Yi-34B: 34.4B, Mixtral: 46.7B, Qwen1.5-14B: 14.2B)
    count = lambda c: sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(c)))  # noqa: E731
    assert abs(count(yi) / 1e9 - 34.39) < 0.05
    assert abs(count(mx) / 1e9 - 46.70) < 0.05
    assert abs(count(q) / 1e9 - 14.17) < 0.05
    with pytest.raises(KeyError, match="no preset"):
        presets.preset_config("Llama-9-1T")


# ----------------------------------------------------------------------------- analytic bytes


@pytest.mark.parametrize("name, sizes", [
    ("Yi-34B-200K", {"data": 2, "model": 8, "expert": 1}),
    ("Mixtral-8x7B-v0.1", {"data": 1, "model": 16, "expert": 2}),   # 8 KV heads on 16: k/v replicated
    ("Qwen1.5-14B", {"data": 4, "model": 8, "expert": 1}),
])
def test_analytic_params_bytes_are_total_over_shards(name, sizes):
    cfg = presets.preset_config(name)
    got = dryrun.analytic_bytes(cfg, sizes, batch=8, prefill_width=1024, cache_size=1536, max_new_tokens=50)["params"]
    want = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = "/".join(k.key for k in kp)
        shards = 1
        for ax, dim in zip(sharding.param_axes(cfg, path), leaf.shape):
            mesh_ax = sharding.RULES.get(ax) if ax else None
            if mesh_ax and dim % sizes[mesh_ax] == 0:
                shards *= sizes[mesh_ax]
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        assert nbytes % shards == 0
        want += nbytes // shards
    assert got == want
    total = sum(math.prod(x.shape) * 2 for x in jax.tree.leaves(param_shapes(cfg)))
    assert total / (sizes["model"] * sizes["expert"]) < got < total


def test_kv_cache_bytes_and_auto_mesh():
    yi = presets.preset_config("Yi-34B-200K")
    sizes = dryrun.auto_mesh(yi, 32, batch_size=8)
    assert sizes == {"data": 4, "model": 8, "expert": 1}
    a = dryrun.analytic_bytes(yi, sizes, batch=8, prefill_width=4096, cache_size=200192, max_new_tokens=50)
    kv_total = 2 * 60 * 8 * 200192 * 8 * 128 * 2            # k and v, bf16
    assert a["kv_cache"] == kv_total // 32 + (8 * 200192 + 8) * 4 // 4   # + pos, length (sharded on data)
    assert "kv_cache_out" not in a      # donated through every program: held once
    # the 1-row shared-prefix cache cannot split on data: each data shard holds it whole
    assert a["shared_prefix_cache"] == kv_total // 8 // 8 + 200192 * 4 + 4
    assert dryrun.auto_mesh(presets.preset_config("Mixtral-8x7B-v0.1"), 16, batch_size=8) == \
        {"data": 1, "model": 8, "expert": 2}
    assert dryrun.auto_mesh(presets.preset_config("Yi-6B-200K"), 8, batch_size=8) == \
        {"data": 2, "model": 4, "expert": 1}
    assert dryrun.auto_mesh(presets.preset_config("SmolLM2-135M-Instruct"), 8, batch_size=8) == \
        {"data": 8, "model": 1, "expert": 1}


def test_impossible_plan_does_not_fit():
    yi = presets.preset_config("Yi-34B-200K")
    p = dryrun.plan(yi, "v5litepod-8", context_len=200000, batch_size=8, compile=False, model_name="Yi-34B-200K")
    assert not p.fits and p.total_bytes > 16 * 2**30
    table = p.table()
    assert "fits: NO" in table and "v5litepod-8" in table and "analytic lower bound" in table
    # no v5e slice can hold it: every row keeps a full 200K cache per device; the search stops early
    tried = []
    assert dryrun.find_smallest_slice(yi, "v5e", 200000, 8, backend="cpu", on_attempt=tried.append) is None
    assert all(t.compiled is None for t in tried) and "search stopped" in tried[-1].notes[-1]
    assert tried[-1].topology.chips < 256


def test_paper_context_and_real_config_json_precedence(tmp_path):
    c = default_config()
    c.model.name = "Mistral-7B-v0.2"
    c.model.path = str(tmp_path / "absent")
    c.sweep.lengths = [1000, 31947, 34526, 50000]
    cfg, label, source = dryrun.model_config_for(c)
    assert label == "Mistral-7B-v0.2" and "preset" in source
    assert dryrun.paper_context(c, cfg) == (31947, [34526, 50000])
    d = tmp_path / "ckpt"
    d.mkdir()
    hf = presets.preset_hf_config("Mistral-7B-v0.2") | {"num_hidden_layers": 3}
    (d / "config.json").write_text(json.dumps(hf))
    c.model.path = str(d)
    cfg, _, source = dryrun.model_config_for(c)
    assert cfg.num_layers == 3 and source.endswith("config.json")


def test_model_config_for_refuses_unknown_models(tmp_path):
    c = default_config()
    c.model.name, c.model.path = "Llama-9-1T", str(tmp_path / "absent")
    with pytest.raises(UserError, match="unknown model.*config.model.name.*Yi-34B-200K"):
        dryrun.model_config_for(c, "configs/mine.py")


# ----------------------------------------------------------------------------- meshes and user errors


def test_mesh_sizes_are_sharding_mesh_shape():
    # the dry run resolves explicit sizes with the sweep's own function (rhead_jax.sharding.make_mesh's)
    assert sharding.mesh_shape({"data": -1, "model": 8}, 32) == {"data": 4, "model": 8, "expert": 1}
    assert sharding.mesh_shape({"data": 2, "model": 8, "expert": 2}, 32) == {"data": 2, "model": 8, "expert": 2}
    for bad, match in [({"data": -1, "model": -1}, "at most one mesh axis may be -1"),
                       ({"data": -1, "model": 3}, "cannot be split"), ({"data": 2}, "needs 2 devices, 8 are"),
                       ({"model": 0}, "must be >= 1")]:
        with pytest.raises(UserError, match=match):
            sharding.mesh_shape(bad, 8)
    yi = presets.preset_config("Yi-34B-200K")
    p = dryrun.plan(yi, "v5p-64", context_len=1000, batch_size=8, mesh={"data": -1, "model": 8}, compile=False)
    assert p.mesh == {"data": 4, "model": 8, "expert": 1} and p.mesh_source == "given"
    with pytest.raises(UserError, match="needs 7 devices, 32 are available"):
        dryrun.plan(yi, "v5p-64", context_len=1000, batch_size=8, mesh={"data": 7}, compile=False)


def test_plan_refuses_contexts_the_model_cannot_hold():
    mistral = presets.preset_config("Mistral-7B-v0.2")
    with pytest.raises(UserError, match=r"context 40000 is out of range.*1\.\.32718"):
        dryrun.plan(mistral, "v5p-8", context_len=40000, batch_size=8, compile=False)
    # between the sweep's limit and the model's positions: planned, with a note (the shapes round the same)
    p = dryrun.plan(mistral, "v5p-8", context_len=32768, batch_size=8, compile=False)
    assert any("the sweep refuses lengths > 32718" in n for n in p.notes)


def test_plan_defaults_are_the_config_schemas():
    s = default_config().sweep
    p = dryrun.plan(presets.preset_config("Yi-6B-200K"), "v5p-8", context_len=1000, batch_size=8, compile=False)
    assert (p.prefill_chunk, p.max_new_tokens) == (s.prefill_chunk, s.max_new_tokens)
    assert p.prompt_len == -(-1000 // s.pad_multiple) * s.pad_multiple
    assert p.cache_size % s.k_chunk == 0 and p.analytic["shared_prefix_cache"] > 0   # share_prefix on


def test_plan_compiles_the_engines_programs_in_process():
    """One CPU device: the programs `Runner.*_jit` builds for a batch (what Engine.generate calls),
    compiled on abstract arguments, the cache donated through prefill and decode."""
    cfg = ModelConfig.from_hf(presets.preset_hf_config("SmolLM2-135M-Instruct") | {"num_hidden_layers": 2},
                              dtype="bfloat16")
    p = dryrun.plan(cfg, "v5litepod-1", context_len=200, batch_size=2, max_new_tokens=8, prefill_chunk=128,
                    backend="cpu")
    assert p.compiled is not None and set(p.compiled) == {"setup", "prefill", "decode"} and p.fits
    assert p.prefill_width == 128          # the widest call of prefill_pieces(199, (128, 64, 32, 16))
    a, c = p.analytic, p.compiled
    assert all(c[n]["temp"] > 0 for n in ("prefill", "decode")) and p.temp_bytes == max(x["temp"] for x in c.values())
    # the compiled arguments and outputs are the analytic shard sizes (up to the buffers' alignment);
    # the cache is donated: its output aliases its argument, no second copy
    for name in ("prefill", "decode"):
        assert abs(c[name]["alias"] - a["kv_cache"]) < 4096, name
        assert c[name]["resident"] == a["shared_prefix_cache"] > 0
    assert abs(c["decode"]["argument"] - (a["params"] + a["kv_cache"] + 2 * 2 * 4)) < 4096
    assert abs(c["decode"]["output"] - (a["kv_cache"] + a["outputs"])) < 4096
    assert abs(c["prefill"]["argument"] - (a["params"] + a["kv_cache"] + 2 * 128 * 4 + 4)) < 4096
    # set-up from the shared prefix: its argument is the 1-row cache, its output the batch's
    assert abs(c["setup"]["argument"] - (a["shared_prefix_cache"] + 2 * 4)) < 4096
    assert abs(c["setup"]["output"] - a["kv_cache"]) < 4096 and c["setup"]["resident"] == a["params"]
    # the peak: params + cache + shared prefix + the largest program's temp (and its small buffers)
    floor = a["params"] + a["kv_cache"] + a["shared_prefix_cache"]
    assert p.total_bytes == max(dryrun.memory.program_peak(x) for x in c.values())
    assert floor + p.temp_bytes - 4096 <= p.total_bytes < floor + p.temp_bytes + a["outputs"] + 2**20 + \
        max(x["generated_code"] for x in c.values())
    table = p.table()
    assert "decode loop" in table and "prefill call" in table and "peak while it runs" in table
    plain = dryrun.plan(cfg, "v5litepod-1", context_len=200, batch_size=2, max_new_tokens=8, prefill_chunk=128,
                        backend="cpu", share_prefix=False)
    assert plain.analytic["shared_prefix_cache"] == 0 and plain.compiled["setup"]["argument"] == 0
    assert abs(plain.compiled["setup"]["output"] - a["kv_cache"]) < 4096


def test_extra_scores_show_in_the_dry_run():
    """config.sweep.extra_scores flows into the planned programs (the Runner's, with masses and their
    targets, or the logit terms and their spans): they compile, and their per-device temp and outputs are at least those without."""
    from rhead_jax.dryrun.cli import step_settings, sweep_dry_run

    cfg = ModelConfig.from_hf(presets.preset_hf_config("SmolLM2-135M-Instruct") | {"num_hidden_layers": 2},
                              dtype="bfloat16")
    c = default_config()
    c.sweep.lengths, c.sweep.batch_size, c.sweep.max_new_tokens, c.sweep.prefill_chunk = (200,), 2, 8, 128
    plans = {}
    for extra in ((), ("mass", "query"), ("logit",)):
        c.sweep.extra_scores = extra
        assert step_settings(c)["extra_scores"] == extra
        plans[extra] = sweep_dry_run(c, topology="v5litepod-1", backend="cpu", model=(cfg, "tiny", "test"))
    plain, extra = plans[()].compiled, plans[("mass", "query")].compiled
    assert plans[("mass", "query")].fits and plans[("mass", "query")].temp_bytes is not None
    for name in ("prefill", "decode"):
        assert extra[name]["temp"] >= plain[name]["temp"] > 0, name
        assert extra[name]["output"] > plain[name]["output"], name     # + the masses [L, rows, H, 1]
    logit = plans[("logit",)].compiled   # + the decode steps' logit terms [rows, N, L, H, 3]
    assert logit["prefill"] == plain["prefill"] and logit["decode"]["output"] > plain["decode"]["output"]


def test_runner_calls_use_the_programs_the_dry_run_compiles():
    """Runner's call methods go through the same `*_jit` methods (one wiring, cached per shape)."""
    from rhead_jax.models.decoder import init_params
    from rhead_jax.models.generate import GenerateSpec

    cfg = ModelConfig.from_hf(presets.preset_hf_config("SmolLM2-135M-Instruct") | {
        "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256}, dtype="float32")
    r = Runner(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    spec = GenerateSpec(max_new_tokens=2, prefill_chunk=16)
    cache = r.init_cache(2, 64)
    assert r.init_cache_jit(2, 64) is r.init_cache_jit(2, 64)
    cache = r.prefill_block(cache, 0, np.ones((1, 16), np.int32), np.arange(16, dtype=np.int32)[None], spec)
    assert ("prefill_block", 2, 64, 16, spec, False) in r._jits
    assert r.prefill_block_jit(2, 64, 16, spec) is r._jits[("prefill_block", 2, 64, 16, spec, False)]
    assert not hasattr(r, "generate_jit")


def test_grid_programs_bound_does_not_grow_with_depths():
    from rhead_jax.config import default_config, paper_grid
    from rhead_jax.dryrun.planner import grid_programs, grid_programs_line

    c = paper_grid(default_config())
    c.sweep.prefill_chunk = 4096
    g = grid_programs(c)
    assert g["lengths"] == 20 and g["depths"] == 10 and g["widths"] == [4096, 2048, 1024, 512]
    assert g["bound"] == 20 * 7 + 1 and g["batches_of_one_cell"] == 200
    c.sweep.depths = (0, 100)
    assert grid_programs(c)["bound"] == g["bound"]
    c.sweep.depths = tuple(range(0, 101, 10))
    assert "at most 141 (20 lengths" in grid_programs_line(c)


def test_mixed_kv_cache_plan():
    """A mixed KV cache's plan (rhead_jax.mixedkv): analytic bytes from its shapes, its three programs
    compiled on one CPU device with the cache donated; the memory shrinks with the full fraction."""
    cfg = ModelConfig.from_hf(presets.preset_hf_config("SmolLM2-135M-Instruct") | {"num_hidden_layers": 2},
                              dtype="bfloat16")
    kw = dict(context_len=2000, batch_size=2, max_new_tokens=8, prefill_chunk=512, backend="cpu")
    plain = dryrun.plan(cfg, "v5litepod-1", compile=False, **kw)
    p = dryrun.plan(cfg, "v5litepod-1", mixed={"full_fraction": 0.5, "sink": 16, "recent": 64}, **kw)
    m, a = p.mixed, p.analytic
    assert (m["full_heads"], m["kv_heads"], m["groups"], m["full_slots"], m["ring_slots"]) == (3, 6, 1, 3, 3)
    S, D = p.cache_size, cfg.head_dim
    assert a["kv_cache"] == 2 * 2 * (3 * S + 3 * 80) * D * 2 + 2 * (S + 80) * 4 + 2 * 4   # k, v in bf16 + positions
    assert m["full_cache_bytes"] == plain.analytic["kv_cache"] and a["kv_cache"] < 0.55 * plain.analytic["kv_cache"]
    assert a["shared_prefix_cache"] == plain.analytic["shared_prefix_cache"] + S * 4   # every position kept (+ ring_pos)
    c = p.compiled
    assert set(c) == {"setup", "prefill", "decode"} and p.fits
    for name in ("prefill", "decode"):
        assert abs(c[name]["alias"] - a["kv_cache"]) < 4096, name
    assert "mixed KV cache (50% full), batch" in p.table() and "3 of 6 KV heads full" in p.table()
