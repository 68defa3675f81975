"""The mixed KV cache (rhead_jax.models.mixed): full heads equal today's decode, streaming heads equal
dense attention restricted to sink + recent positions, the memory really shrinks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models import mixed
from rhead_jax.models.attention import NO_WINDOW, AttentionOptions
from rhead_jax.models.cache import init_cache
from rhead_jax.models.generate import GenerateSpec, cache_size_for, greedy_generate, pad_prompts
from rhead_jax.models.layers import attention_inputs, attention_output, embed, output_logits
from rhead_jax.models.rope import rope_cos_sin

SMALL = AttentionOptions(q_chunk=8, k_chunk=8)
SPEC = GenerateSpec(max_new_tokens=6, top_k=2, prefill_chunk=8, attn=SMALL)


def _prompts(*lengths):
    return [list(np.random.RandomState(n).randint(0, 97, n)) for n in lengths]


def _mix(cfg, seed=0):
    """A head set with full and streaming heads in every layer when K > 1."""
    full = np.random.RandomState(seed).rand(cfg.num_layers, cfg.num_kv_heads) < 0.5
    full[:, 0], full[:, -1] = True, False
    return full


@pytest.mark.parametrize("family", ["yi", "mistral_window"])
def test_every_head_full_equals_todays_decode(family, tiny_model_dir):
    cfg, params = load_params(tiny_model_dir(family))
    prompts = _prompts(41, 30)
    ref = greedy_generate(params, cfg, prompts, spec=SPEC)
    full = np.ones((cfg.num_layers, cfg.num_kv_heads), bool)
    gen, _ = mixed.greedy_generate_mixed(params, cfg, full, prompts, sink=4, recent=8, spec=SPEC)
    np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(gen.topk_index), np.asarray(ref.topk_index))  # positions = slots
    np.testing.assert_allclose(np.asarray(gen.topk_weight), np.asarray(ref.topk_weight), atol=1e-5)


def test_sink_plus_recent_covering_the_context_equals_full(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("yi"))
    prompts = _prompts(41, 30)
    ref = greedy_generate(params, cfg, prompts, spec=SPEC)
    for full in (np.zeros((cfg.num_layers, cfg.num_kv_heads), bool), _mix(cfg)):
        gen, cache = mixed.greedy_generate_mixed(params, cfg, full, prompts, sink=4, recent=60, spec=SPEC)
        np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(gen.topk_index), np.asarray(ref.topk_index))
        np.testing.assert_allclose(np.asarray(gen.topk_weight), np.asarray(ref.topk_weight), atol=1e-5)


def _reference_logits(params, cfg, tokens, full, sink, recent):
    """Every position's logits of one dense pass where streaming heads see only positions < sink and
    the `recent` latest (and the model's window): written independently of models.mixed."""
    B, T = tokens.shape
    K, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_cos_sin(cfg, pos)
    qp, kp = np.arange(T)[:, None], np.arange(T)[None]
    x = embed(params, cfg, jnp.asarray(tokens))
    for l in range(cfg.num_layers):
        lp = jax.tree.map(lambda a: a[l], params["layers"])
        window = (cfg.sliding_window[l] if cfg.sliding_window else None) or NO_WINDOW
        q, k, v = attention_inputs(lp, cfg, x, cos, sin)
        q = q.reshape(B, T, K, G, D)
        outs = []
        for h in range(K):
            vis = (kp <= qp) & (qp - kp < window)
            if not full[l, h]:
                vis &= (qp - kp < recent) | (kp < sink)
            s = jnp.einsum("btgd,bsd->bgts", q[:, :, h], k[:, :, h]) * D ** -0.5
            p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
            outs.append(jnp.einsum("bgts,bsd->btgd", p, v[:, :, h]))
        x = attention_output(lp, cfg, x, jnp.stack(outs, axis=2))
    return np.asarray(output_logits(params, cfg, x))


@pytest.mark.parametrize("family", ["llama2", "mistral_window"])   # 4 KV heads (MHA); 2 with a window of 5
def test_streaming_heads_equal_dense_attention_over_sink_and_recent(family, tiny_model_dir):
    """Prefill calls of 4 (ring wraps inside and across calls), then decode steps, against one dense
    pass with the sink + recent mask; mistral_window's window of 5 also limits the sink (recent 3)."""
    cfg, params = load_params(tiny_model_dir(family))
    sink, recent, T, T0 = 2, 3, 30, 18
    full = _mix(cfg, 1)
    tok = np.random.RandomState(3).randint(0, 97, (2, T))
    ref = _reference_logits(params, cfg, tok, full, sink, recent)
    layout, tables = mixed.head_layout(full, sink=sink, recent=recent)
    cache = mixed.init_mixed_cache(cfg, layout, 2, 32)
    assert cache.ring_size == sink + recent
    step = jax.jit(mixed.forward_mixed, static_argnames=("cfg", "layout", "attn"))
    got = []
    for a, b in [(t, min(t + 4, T0)) for t in range(0, T0, 4)] + [(t, t + 1) for t in range(T0, T)]:
        pos = jnp.broadcast_to(jnp.arange(a, b), (2, b - a))
        lg, cache, _ = step(params, cfg, layout, tables, jnp.asarray(tok[:, a:b]), pos, cache, attn=SMALL)
        got.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(got, 1), ref, atol=2e-4 * max(1, np.abs(ref).max()), rtol=0)


def test_groups_layout_equals_one_group(tiny_model_dir):
    """The layout a 2-way model axis gets (two head groups) computes what one group does, with either
    form of the per-group gathers and scatters (plain indexing; batched, as on TPUs)."""
    import dataclasses

    cfg, params = load_params(tiny_model_dir("llama2"))            # 4 KV heads
    full = _mix(cfg, 2)
    prompts = _prompts(33, 25)
    outs = []
    for groups, writes in ((1, "scatter"), (2, "scatter"), (2, "tpu")):
        spec = dataclasses.replace(SPEC, attn=dataclasses.replace(SMALL, cache_writes=writes))
        layout, tables = mixed.head_layout(full, groups=groups, sink=2, recent=6)
        arr, lens = pad_prompts(prompts)
        cache = mixed.init_mixed_cache(cfg, layout, 2, cache_size_for(arr.shape[1], spec))
        gen, _ = mixed.generate_mixed(params, tables, jnp.asarray(arr), jnp.asarray(lens), cache, cfg=cfg,
                                      layout=layout, spec=spec, prefill_width=32)
        outs.append(gen)
    for g in outs[1:]:
        np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(outs[0].tokens))
        np.testing.assert_array_equal(np.asarray(g.topk_index), np.asarray(outs[0].topk_index))


def test_rows_from_a_shared_prefix_equal_their_own_prefill(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("yi"))
    full = _mix(cfg)
    sink, recent = 2, 6
    layout, tables = mixed.head_layout(full, sink=sink, recent=recent)
    ref_tok = _prompts(40)[0]
    prompts = [ref_tok[:30] + _prompts(11)[0], ref_tok[:17] + _prompts(14)[0]]
    starts = np.array([30, 17], np.int32)
    arr, lens = pad_prompts(prompts)
    S = cache_size_for(arr.shape[1], SPEC)
    prefix = mixed.init_mixed_cache(cfg, layout, 1, S, ring=S)
    prefix = mixed.prefill_mixed(params, cfg, layout, tables, jnp.asarray([ref_tok[:30]]),
                                 jnp.arange(30)[None], prefix, chunk=8, attn=SMALL)
    rows = mixed.rows_from_prefix(prefix, jnp.asarray(starts), S, sink=sink, ring=layout.ring_capacity(S))
    run = lambda cache, width: mixed.generate_mixed(params, tables, jnp.asarray(arr), jnp.asarray(lens), cache,  # noqa
                                                    cfg=cfg, layout=layout, spec=SPEC, prefill_width=width)[0]
    shared = run(rows, 24)
    own = run(mixed.init_mixed_cache(cfg, layout, 2, S), 40)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(own.tokens))
    np.testing.assert_array_equal(np.asarray(shared.topk_index), np.asarray(own.topk_index))
    np.testing.assert_allclose(np.asarray(shared.topk_weight), np.asarray(own.topk_weight), atol=1e-5)


def test_cache_bytes_really_shrink(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("yi"))                # 3 layers x 2 KV heads
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    full = np.zeros((L, K), bool)
    full[1, 0] = True                                               # 1 full head, 5 streaming
    layout, _ = mixed.head_layout(full, sink=4, recent=12)
    B, S = 3, 512
    c = mixed.init_mixed_cache(cfg, layout, B, S)
    assert c.full_k.shape == (B, 1, 1, S, D) and c.ring_k.shape == (B, 1, 5, 16, D)
    dense = mixed.cache_nbytes(init_cache(cfg, B, S))
    assert dense == 2 * L * K * B * S * D * 4 + B * S * 4 + B * 4
    assert mixed.cache_nbytes(c) == 2 * B * (1 * S + 5 * 16) * D * 4 + B * (S + 16) * 4 + B * 4
    assert mixed.cache_nbytes(c) < 0.21 * dense   # 1 of 6 heads full + rings
    # a ring never has more slots than the cache has positions
    assert mixed.init_mixed_cache(cfg, layout, B, 8).ring_k.shape[3] == 8
    # group layout: each group's slot axis holds its own heads (the largest group's count)
    full[:, 1] = True
    layout2, tables2 = mixed.head_layout(full, groups=2, sink=4, recent=12)
    assert (layout2.full_slots, layout2.ring_slots) == (3, 2)
    np.testing.assert_array_equal(np.asarray(tables2.pick)[:, 0], [[1], [0], [1]])  # group 0: full only in layer 1


def test_ring_slots():
    p = jnp.arange(20)
    np.testing.assert_array_equal(mixed.ring_slot(p, 3, 8), [0, 1, 2] + [3, 4, 5, 6, 7] * 3 + [3, 4])
    np.testing.assert_array_equal(mixed.ring_slot(p[:5], 3, 5), [0, 1, 2, 3, 4])
