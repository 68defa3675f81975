"""The model over a mixed KV cache (rhead_jax.models.mixed_cache: every (layer, KV head) FULL or
STREAMING, its layout, head tables and rows): `forward_mixed`, `prefill_mixed`, `decode_mixed` and
`generate_mixed`, as DuoAttention deploys retrieval and streaming heads.

Attention (streaming heads): a query at p sees key positions kp <= p with p - kp < recent or
kp < sink, and, for a sliding-window model, also p - kp < window (the window binds the sink too).
A call of T tokens attends densely over (the ring before the call + the call's own keys): memory
and work O(T x (W + T)), so prefill_mixed feeds streaming heads RING_CHUNK (128) tokens per call;
then the ring keeps the last `W - sink` positions (and the first `sink`). A ring of every position
(W = S: the shared prefix's one row, from which `rows_from_prefix` cuts each row's ring at its own
length; or a cache shorter than sink + recent) attends over its sink slots and a slice of the
recent + T latest instead. Full heads attend over their slots with the dense (T == 1) or chunked
path of models.attention.

Captured top-k (decode steps) are POSITIONS of keys (full slots and ring slots mapped back through
full_pos / ring_pos), so `scoring.copy_counts` reads them as prompt indices like the full cache's slots.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from rhead_jax.models.attention import NEG_INF, NO_WINDOW, AttentionOptions, chunked_attention, dense_attention, \
    visible
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.generate import Generation, GenerateSpec, decode_loop, prefill_loop
from rhead_jax.models.layers import attention_inputs, attention_output, embed, output_logits
from rhead_jax.models.mixed_cache import HeadTables, MixedCache, MixedLayout, head_layout, init_mixed_cache, ring_slot
from rhead_jax.models.rope import rope_cos_sin


# ----------------------------------------------------------------------------- forward


# Heads and slots are picked per group. Two forms, same values: plain advanced indexing with the
# group index an iota (XLA:CPU keeps these gathers and scatters in place; the vmapped forms copied
# the whole cache at every write: 3.3 s vs 5 ms per SmolLM2 decode step's cache traffic), and vmap
# over the groups (gathers / scatters with batching dims, which the SPMD partitioner splits along a
# group axis sharded on "model"): `batched`, used for 2+ groups with AttentionOptions.cache_writes "tpu".


def _heads(x, idx, batched=False):
    """x [B, T, M, Kg, ...], idx [M, n] -> [B, T, M, n, ...] (group-local heads picked per group)."""
    if batched:
        return jax.vmap(lambda xm, im: jnp.take(xm, im, axis=2), in_axes=(2, 0), out_axes=2)(x, idx)
    return x[:, :, jnp.arange(idx.shape[0])[:, None], idx]


def _read(buf, slot, batched=False):
    """buf [B, M, N, S, D], slot [M, n] -> [B, M, n, S, D] (padding slots read the last one)."""
    slot = jnp.minimum(slot, buf.shape[2] - 1)
    if batched:
        return jax.vmap(lambda bm, sm: jnp.take(bm, sm, axis=1), in_axes=(1, 0), out_axes=1)(buf, slot)
    return buf[:, jnp.arange(slot.shape[0])[:, None], slot]


def _write(buf, new, slot, at, batched=False):
    """buf [B, M, N, S, D] with new [B, T, M, n, D] written at [b, m, slot[m, j], at[b, t]];
    out-of-range slots (padding) or positions are dropped."""
    B, M = at.shape[0], slot.shape[0]
    new = new.astype(buf.dtype)
    if batched:
        def one(bm, nm, sm):  # [B, N, S, D], [B, T, n, D], [n]
            return bm.at[jnp.arange(B)[:, None, None], sm[None, None, :], at[:, :, None]].set(nm, mode="drop")

        return jax.vmap(one, in_axes=(1, 2, 0), out_axes=1)(buf, new, slot)
    idx = (jnp.arange(B)[:, None, None, None], jnp.arange(M)[None, None, :, None], slot[None, None],
           at[:, :, None, None])
    return buf.at[idx].set(new, mode="drop")


def _window(buf, start, length: int):
    """buf [B, M, N, W, D] -> [B, M, N, length, D]: slots start[b] .. start[b] + length - 1 of row b."""
    return jax.vmap(lambda bb, s: lax.dynamic_slice_in_dim(bb, s, length, axis=2))(buf, start)


def streaming_visible(q_pos, k_pos, *, sink: int, recent: int, window):
    """[B, Tq, Sk]: what a streaming head sees (sink + recent, within the model's window)."""
    return visible(q_pos, k_pos, recent, sink) & visible(q_pos, k_pos, window)


def _ring_attention(q, k, v, vis, scale):
    """q [B, T, M, n, G, D], k/v [B, M, n, S, D], vis [B, T, S] -> (out [B, T, M, n, G, D], probs fp32)."""
    s = jnp.einsum("btmngd,bmnsd->bmngts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(vis[:, None, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bmngts,bmnsd->btmngd", p.astype(v.dtype), v), p


def forward_mixed(params, cfg: ModelConfig, layout: MixedLayout, tables: HeadTables, tokens, positions,
                  cache: MixedCache, *, top_k: int = 0, logits: str = "all",
                  attn: AttentionOptions = AttentionOptions()):
    """`decoder.forward` over a mixed cache (no head masks): appends tokens [B, T] (padding at row
    ends, position -1) and returns (logits or None, new cache, (topk_index, topk_weight) or None).

    top_k > 0 (decode steps, T == 1): per layer and query head, the k most attended keys' POSITIONS
    and weights, [L, B, H, k]. logits: "all" [B, T, V], "last" [B, V], "none"."""
    c, lay = cfg, layout
    B, T = tokens.shape
    K, G, D, M = c.num_kv_heads, c.group_size, c.head_dim, lay.groups
    Kg, F, R = lay.kv_per_group, lay.full_slots, lay.ring_slots
    if top_k and T != 1:
        raise ValueError("forward_mixed captures attention in decode steps (T == 1) only")
    if c.local_rope is not None or c.attn_softcap is not None or c.attn_scale != c.head_dim ** -0.5:
        raise ValueError("the mixed KV cache does not implement Gemma 2/3's attention (per-kind rope, "
                         "soft-cap, query_pre_attn_scalar); use the plain or windowed cache")
    scale = D ** -0.5
    slots = cache.length
    valid = positions >= 0
    n_valid = valid.sum(-1).astype(jnp.int32)
    pos = jnp.where(valid, positions, -1).astype(jnp.int32)
    at = slots[:, None] + jnp.arange(T)[None]                              # full slots = positions
    full_pos = cache.full_pos.at[jnp.arange(B)[:, None], at].set(pos, mode="drop")
    W = cache.ring_size
    end = jnp.max(jnp.where(valid, pos + 1, 0), axis=1)                  # one past each row's last
    keep = valid & ((pos < lay.sink) | (pos >= end[:, None] - max(W - lay.sink, 1)))
    ring_at = jnp.where(keep, ring_slot(pos, lay.sink, W), W)            # [B, T]; W: not kept
    ring_pos = cache.ring_pos.at[jnp.arange(B)[:, None], ring_at].set(pos, mode="drop")
    ring_keys_pos = jnp.concatenate([cache.ring_pos, pos], axis=1)       # [B, W + T]: before + this call
    # a ring of every position (W == S: the shared prefix's reference, tiny caches): attention reads
    # the sink slots and a slice of recent + T slots (those slots < sink masked: no key twice)
    history = W >= cache.size
    if history:
        win_len = min(lay.recent + T, W)
        first = jnp.min(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max), axis=1)
        win_start = jnp.clip(first - lay.recent + 1, 0, W - win_len)     # [B]
        win_pos = _window(ring_pos[:, None, None, :, None], win_start, win_len)[:, 0, 0, :, 0]
        hist_pos = jnp.concatenate([ring_pos[:, :lay.sink], jnp.where(win_pos < lay.sink, -1, win_pos)], axis=1)
    cos, sin = rope_cos_sin(c, positions)
    windows = jnp.asarray([w or NO_WINDOW for w in (c.sliding_window or (None,) * c.num_layers)], jnp.int32)
    last = jnp.maximum(n_valid - 1, 0)
    bt = M > 1 and attn.cache_writes == "tpu"
    heads = partial(_heads, batched=bt)
    read = partial(_read, batched=bt)
    write = partial(_write, batched=bt)

    def layer(carry, xs):
        x, fk, fv, rk, rv = carry
        lp, window, tb = xs
        q, k, v = attention_inputs(lp, c, x, cos, sin)
        q = q.reshape(B, T, M, Kg, G, D)
        k, v = k.reshape(B, T, M, Kg, D), v.reshape(B, T, M, Kg, D)
        outs, tops = [], []
        if F:
            Fl = lay.full_per_layer
            fk = write(fk, heads(k, tb.full_head), tb.full_slot, at)
            fv = write(fv, heads(v, tb.full_head), tb.full_slot, at)
            kc = read(fk, tb.full_slot).reshape(B, M * Fl, -1, D)
            vc = read(fv, tb.full_slot).reshape(B, M * Fl, -1, D)
            qf = heads(q, tb.full_head).reshape(B, T, M * Fl, G, D)
            if T == 1:
                o, p = dense_attention(qf, kc, vc, positions, full_pos, window=window, scale=scale,
                                       cache_left=attn.decode_scores == "cache_left")
                if top_k:
                    w_top, i_top = lax.top_k(p[:, :, :, 0].reshape(B, M, Fl, G, -1), top_k)
                    tops.append((jnp.take_along_axis(full_pos[:, None, None, None], i_top, axis=-1), w_top))
            else:
                o = chunked_attention(qf, kc, vc, positions, full_pos, slots, window=window, scale=scale, opts=attn)
            outs.append(o.reshape(B, T, M, Fl, G, D))
        if R:
            kn, vn = heads(k, tb.ring_head), heads(v, tb.ring_head)      # [B, T, M, Rl, D]
            if history:   # every position kept (slot = position): the sink slots + a window slice
                rk, rv = write(rk, kn, tb.ring_slot, ring_at), write(rv, vn, tb.ring_slot, ring_at)
                keys, vals = ((lambda h: jnp.concatenate([h[:, :, :, :lay.sink], _window(h, win_start, win_len)],
                                                         axis=3))(read(buf, tb.ring_slot)) for buf in (rk, rv))
                kpos = hist_pos
            else:         # the ring before this call + the call's own keys
                keys = jnp.concatenate([read(rk, tb.ring_slot), jnp.moveaxis(kn, 1, 3).astype(rk.dtype)], axis=3)
                vals = jnp.concatenate([read(rv, tb.ring_slot), jnp.moveaxis(vn, 1, 3).astype(rv.dtype)], axis=3)
                kpos = ring_keys_pos
            vis = streaming_visible(positions, kpos, sink=lay.sink, recent=lay.recent, window=window)
            o, p = _ring_attention(heads(q, tb.ring_head), keys, vals, vis, scale)
            if top_k:
                w_top, i_top = lax.top_k(p[..., 0, :], top_k)              # [B, M, Rl, G, k]
                tops.append((jnp.take_along_axis(kpos[:, None, None, None], i_top, axis=-1), w_top))
            if not history:
                rk, rv = write(rk, kn, tb.ring_slot, ring_at), write(rv, vn, tb.ring_slot, ring_at)
            outs.append(o)
        pick = tb.pick[None, None, :, :, None, None]                        # [1, 1, M, Kg, 1, 1]
        out = jnp.take_along_axis(jnp.concatenate(outs, axis=3), pick, axis=3).reshape(B, T, K, G, D)
        cap = {}
        if top_k:
            pk = tb.pick[None, :, :, None, None]
            cap = {name: jnp.take_along_axis(jnp.concatenate([t[i] for t in tops], axis=2), pk, axis=2)
                   .reshape(B, K * G, top_k) for i, name in enumerate(("index", "weight"))}
        return (attention_output(lp, c, x, out), fk, fv, rk, rv), cap

    x = embed(params, c, tokens)
    xs = (params["layers"], windows, tables)
    (x, fk, fv, rk, rv), caps = lax.scan(layer, (x, cache.full_k, cache.full_v, cache.ring_k, cache.ring_v), xs)
    new = MixedCache(full_k=fk, full_v=fv, full_pos=full_pos, ring_k=rk, ring_v=rv, ring_pos=ring_pos,
                     length=cache.length + n_valid)
    captured = (caps["index"].astype(jnp.int32), caps["weight"]) if top_k else None
    if logits == "none":
        return None, new, captured
    if logits == "last":
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif logits != "all":
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    return output_logits(params, c, x), new, captured


# ----------------------------------------------------------------------------- prefill, decode


RING_CHUNK = 128   # prefill tokens per forward call when there are streaming heads (see prefill_mixed)


def prefill_mixed(params, cfg: ModelConfig, layout: MixedLayout, tables: HeadTables, tokens, positions,
                  cache: MixedCache, *, chunk: int, attn=AttentionOptions(),
                  ring_chunk: int = RING_CHUNK) -> MixedCache:
    """Append tokens [B, T] (padding at row ends, position -1) to the cache, `chunk` at a time, or
    `ring_chunk` at a time when there are streaming heads: their attention over (sink + recent +
    the call's tokens) is dense, so a call of T tokens computes T x (W + T) scores of which each
    query uses sink + recent; 128 made a SmolLM2 prefill call of 1,024 tokens at 6K 1.5x faster."""
    chunk = min(chunk, tokens.shape[1], ring_chunk if layout.ring_slots else tokens.shape[1])

    def call(cache, tok, pos):
        return forward_mixed(params, cfg, layout, tables, tok, pos, cache, logits="none", attn=attn)[1]

    return prefill_loop(call, tokens, positions, cache, chunk)


def decode_mixed(params, tables: HeadTables, first, prompt_lens, cache: MixedCache, *, cfg: ModelConfig,
                 layout: MixedLayout, spec: GenerateSpec) -> tuple[Generation, MixedCache]:
    """models.generate's decode loop (`decode_loop`) over a mixed cache (no head masks, no masses):
    the cache holds every prompt token but the last, `first` [B] is that token. Captured
    topk_index are key positions (= prompt indices for keys of the prompt)."""
    k = spec.top_k
    spec = dataclasses.replace(spec, decode_masses=(), decode_outputs=())   # a mixed cache captures no masses

    def step(tok, pos, cache):
        logits, cache, caps = forward_mixed(params, cfg, layout, tables, tok, pos, cache, top_k=k, attn=spec.attn)
        return (logits, cache) + (caps if k else (None, None)) + (None, None)

    return decode_loop(step, first, prompt_lens, cache, spec=spec, num_layers=cfg.num_layers, num_heads=cfg.num_heads)


@partial(jax.jit, static_argnames=("cfg", "layout", "spec", "prefill_width"))
def generate_mixed(params, tables: HeadTables, prompts, prompt_lens, cache: MixedCache, *, cfg: ModelConfig,
                   layout: MixedLayout, spec: GenerateSpec, prefill_width: int) -> tuple[Generation, MixedCache]:
    """models.generate.generate over a mixed cache: prefill every prompt token but the last (from
    cache.length on), then the greedy decode loop."""
    P = prompts.shape[1]
    start = cache.length
    t = jnp.arange(prefill_width)
    rest = jnp.take_along_axis(prompts, jnp.clip(start[:, None] + t, 0, P - 1), axis=1)
    rest_pos = jnp.where(t[None] < (prompt_lens - 1 - start)[:, None], start[:, None] + t, -1)
    cache = prefill_mixed(params, cfg, layout, tables, rest, rest_pos, cache, chunk=spec.prefill_chunk,
                          attn=spec.attn)
    first = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1)[:, 0]
    return decode_mixed(params, tables, first, prompt_lens, cache, cfg=cfg, layout=layout, spec=spec)


def greedy_generate_mixed(params, cfg: ModelConfig, full, prompts, *, sink: int, recent: int,
                          spec: GenerateSpec = GenerateSpec()) -> tuple[Generation, MixedCache]:
    """Convenience wrapper (tests, notebooks): pad prompts, allocate a mixed cache for the heads
    `full` [L, K] marks, generate. Returns the generation and the final cache."""
    from rhead_jax.models.generate import cache_size_for, pad_prompts

    arr, lens = pad_prompts(prompts)
    layout, tables = head_layout(full, sink=sink, recent=recent)
    cache = init_mixed_cache(cfg, layout, len(prompts), cache_size_for(arr.shape[1], spec))
    return generate_mixed(params, tables, jnp.asarray(arr), jnp.asarray(lens), cache, cfg=cfg, layout=layout,
                          spec=spec, prefill_width=max(int(lens.max()) - 1, 1))
