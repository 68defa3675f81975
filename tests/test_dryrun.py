"""Dry runs: TPU slice names, presets, analytic per-device bytes, and compiled plans on simulated
CPU devices (in subprocesses started with XLA_FLAGS, as the CLIs run them)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rhead_jax import dryrun, presets, sharding
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes
from rhead_jax.config import default_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _run(args, *, devices=8, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out


def _plans(stdout: str) -> list[dict]:
    return [json.loads(line[len("JSON "):]) for line in stdout.splitlines() if line.startswith("JSON ")]


# ----------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("name, family, chips, hosts, canonical", [
    ("v4-8", "v4", 4, 1, "v4-8"), ("v4-32", "v4", 16, 4, "v4-32"),
    ("v5litepod-16", "v5e", 16, 4, "v5litepod-16"), ("v5e-8", "v5e", 8, 1, "v5litepod-8"),
    ("v5litepod-1", "v5e", 1, 1, "v5litepod-1"), ("v5p-8", "v5p", 4, 1, "v5p-8"), ("v5p-64", "v5p", 32, 8, "v5p-64"),
    ("v6e-8", "v6e", 8, 1, "v6e-8"), ("v6e-256", "v6e", 256, 64, "v6e-256"),
])
def test_parse_topology(name, family, chips, hosts, canonical):
    t = dryrun.parse_topology(name)
    assert (t.family, t.chips, t.hosts, t.name) == (family, chips, hosts, canonical)
    assert t.hbm_bytes == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}[family] * 2**30
    assert math.prod(t.grid) == chips


@pytest.mark.parametrize("bad", ["v4-33", "v5litepod-12", "v5p-6", "tpu-8", "v3-8"])
def test_parse_topology_refuses_unknown_slices(bad):
    with pytest.raises(ValueError, match=bad):
        dryrun.parse_topology(bad)


def test_family_slices_increase():
    for fam in dryrun.FAMILIES:
        chips = [t.chips for t in dryrun.family_slices(fam)]
        assert chips == sorted(chips) and len(set(chips)) == len(chips)


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
    got = dryrun.analytic_bytes(cfg, sizes, batch=8, prompt_len=1024, cache_size=1536, max_new_tokens=50)["params"]
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
    a = dryrun.analytic_bytes(yi, sizes, batch=8, prompt_len=200000, cache_size=200192, max_new_tokens=50)
    kv_total = 2 * 60 * 8 * 200192 * 8 * 128 * 2            # k and v, bf16
    assert a["kv_cache"] == kv_total // 32 + (8 * 200192 + 8) * 4 // 4   # + pos, length (sharded on data)
    assert a["kv_cache_out"] == a["kv_cache"]
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


# ----------------------------------------------------------------------------- compiled plans


def test_dry_run_on_8_simulated_devices_reports_fit_and_compiler_temp():
    out = _run(["rhead_jax.dryrun", "--preset", "Mistral-7B-v0.2", "--topology", "v5litepod-8", "--context", "4096",
                "--backend", "cpu", "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fits: yes" in out.stdout and "temp (activations, scratch)" in out.stdout
    assert "CPU-compiled memory stands in for the TPU compiler's" in out.stdout
    (p,) = _plans(out.stdout)
    assert p["chips"] == 8 and p["mesh"] == {"data": 1, "model": 8, "expert": 1} and p["fits"]
    c, a = p["compiled_gib"], p["analytic_gib"]
    assert c["temp"] > 0
    # the compiled program's per-device arguments are exactly the analytic shard sizes
    args = a["params"] + a["kv_cache"] + a["shared_prefix_cache"] + a["inputs"]
    assert abs(c["argument"] - args) * 2**30 < 1024
    assert abs(c["output"] - (a["kv_cache_out"] + a["outputs"])) * 2**30 < 1024
    assert f"{c['temp']:9.2f}" in out.stdout


def test_sweep_dry_run_sets_up_devices_itself():
    # no XLA_FLAGS: `sweep --dry_run` asks for the slice's 8 devices before jax starts
    out = _run(["rhead_jax.sweep", "--config", "smollm2_135m.py", "--dry_run", "--topology", "v5litepod-8",
                "--dry_run_backend", "cpu"], devices=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SmolLM2-135M-Instruct on v5litepod-8 (8 chips" in out.stdout
    assert "fits: yes" in out.stdout and "context 2000" in out.stdout
    assert "config.mesh does not fit v5litepod-8" in out.stdout      # the config's 1x1x1 mesh -> auto


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (TPU compiler, no TPU)")
def test_tpu_compiler_plan():
    out = _run(["rhead_jax.dryrun", "--preset", "SmolLM2-135M-Instruct", "--topology", "v5p-8", "--context", "2048",
                "--backend", "tpu", "--json"], devices=0, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (p,) = _plans(out.stdout)
    assert p["backend"] == "tpu" and p["fits"] and p["compiled_gib"]["temp"] > 0
