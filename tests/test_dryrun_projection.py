"""rhead_jax.dryrun.projection: the analytic FLOPs against the compiler's count of a loop-free program,
the grid's call counts, and the roofline's arithmetic."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rhead_jax.dryrun.projection import attention_pairs, matmul_flops_per_token, project
from rhead_jax.dryrun.topology import parse_topology
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import forward, init_params


def _cfg(**kw):
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096, dtype="float32")
    return ModelConfig(**{**base, **kw})


def test_analytic_flops_match_the_compilers_count_of_one_layer():
    """A 1-layer forward whose loops run once (one layer, one query and one key tile): XLA's
    cost_analysis counts what runs; the analytic matmuls + 4 H D per (query, key) pair are within
    5% of it (the rest: norms, softmax, RoPE)."""
    cfg = _cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    T = 64
    tok = jnp.zeros((1, T), jnp.int32)
    fn = jax.jit(lambda p, t: forward(p, cfg, t, jnp.arange(T)[None], attn=AttentionOptions(q_chunk=T, k_chunk=T),
                                      logits="all")[0])
    cost = fn.lower(params, tok).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    pairs = attention_pairs(T, 0, T, kernel="chunked", q_chunk=T, k_chunk=T)
    assert pairs == T * T
    analytic = T * matmul_flops_per_token(cfg, lm_head=True) + 4 * cfg.num_heads * cfg.head_dim * pairs
    assert analytic == pytest.approx(cost["flops"], rel=0.05)


def test_attention_pairs():
    # chunked: every key tile up to the query tile's last slot; splash: causal blocks + a cache prefix
    assert attention_pairs(512, 0, 4096, kernel="chunked", q_chunk=512, k_chunk=512) == 512 * 512
    assert attention_pairs(1024, 0, 4096, kernel="chunked", q_chunk=512, k_chunk=512) == 512 * 512 + 512 * 1024
    assert attention_pairs(512, 0, 4096, kernel="splash", q_chunk=512, k_chunk=512) == 512 * 512 + 512 * 512
    # a call deep in a long cache: splash reads the smallest prefix bucket (S/8, S/4, S/2, S) covering it
    S = 8192
    assert attention_pairs(512, 3000, S, kernel="splash", q_chunk=512, k_chunk=512) == 512 * 512 + 512 * 4096
    assert attention_pairs(512, 3000, S, kernel="chunked", q_chunk=512, k_chunk=512) == 512 * 3584


def test_projection_counts_the_grid_and_scales_with_the_slice():
    cfg = _cfg(num_layers=4)
    topo = parse_topology("v5p-8")
    kw = dict(lengths=(1000, 2000), depths=(0, 50, 100), needles=3, batch_size=4, max_new_tokens=10,
              prefill_chunk=512, q_chunk=512, k_chunk=512, pad_multiple=64, share_prefix=True, kernel="splash",
              peak_flops=topo.peak_flops, hbm_bandwidth=topo.hbm_bandwidth, programs=10,
              compile_seconds_per_program=2.0)
    p = project(cfg, sizes={"data": 1, "model": 1}, chips=1, params_bytes=1e6, **kw)
    assert p.grid["instances"] == 18 and p.grid["batches"] == 6          # 9 per length in batches of 4
    assert p.phases["decode"].calls == 6 * 10 and p.phases["cache set-up"].calls == 6
    assert p.phases["shared prefix"].calls == 4                         # 2000 tokens in calls of 512
    assert p.compile_seconds == 20.0
    assert p.wall_seconds == pytest.approx(p.run_seconds + 20.0)
    assert p.chip_hours == pytest.approx(p.wall_seconds / 3600)
    # twice the model axis: half of every call's FLOPs on each chip
    q = project(cfg, sizes={"data": 1, "model": 2}, chips=2, params_bytes=1e6, **kw)
    assert q.phases["prefill"].flops == pytest.approx(p.phases["prefill"].flops / 2)
    # v5e's roofline is slower than v5p's: the same calls take longer
    v5e = parse_topology("v5litepod-1")
    r = project(cfg, sizes={"data": 1, "model": 1}, chips=1, params_bytes=1e6,
                **dict(kw, peak_flops=v5e.peak_flops, hbm_bandwidth=v5e.hbm_bandwidth))
    assert r.run_seconds > p.run_seconds and r.phases["prefill"].flops == p.phases["prefill"].flops
