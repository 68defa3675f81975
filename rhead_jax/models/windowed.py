"""`decoder.forward`'s layer scan over a windowed cache (Gemma 2/3: local layers keep rings of W
slots; models.cache.KVCache). The layer body is forward's own (layer_in, attend, layer_out), passed in."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.cache import CaptureSpec, KVCache, ring_slots, ring_view, write_rows
from rhead_jax.models.config import ModelConfig


def windowed_layers(c: ModelConfig, cache: KVCache, x, xs, layer_in, attend, layer_out, as_positions, positions,
                    new_pos, n_valid, attn: AttentionOptions, capture: CaptureSpec):
    """`forward`'s layer scan over a windowed cache (KVCache with rings): the same layer body
    (`forward`'s layer_in, attend and layer_out, so every head mask and capture works alike), the
    layer's kind as data. A global layer writes and reads its full slots (stack index j); a local
    one reads its ring j rolled into position order followed by the call's keys (`ring_view`),
    then writes the call's last W keys into the ring. With both kinds, `lax.cond` on the kind
    picks which cache the ONE attention (`attend`) reads: the two read shapes differ (S vs W + T).
    Returns (x, new cache, captures with top-k as positions)."""
    if capture.full_probs:
        raise ValueError("full_probs capture needs a plain cache (init_cache without ring)")
    B, T = positions.shape
    S, W = cache.size, cache.ring_size
    local = [w is not None for w in c.windows]
    has_global = not all(local)
    is_local = jnp.asarray(local)
    index = jnp.asarray([sum(local[:i]) if local[i] else i - sum(local[:i]) for i in range(c.num_layers)], jnp.int32)
    slots = cache.length
    pos = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
    order, ring_kpos = ring_view(cache.ring_pos, cache.length, pos)
    n_keys = W + T
    if T > 1:  # the chunked path tiles the keys: pad them to a multiple of the key chunk
        ck = min(attn.k_chunk, n_keys)
        n_keys = -(-n_keys // ck) * ck
        ring_kpos = jnp.pad(ring_kpos, ((0, 0), (0, n_keys - W - T)), constant_values=-1)
    ring_at = ring_slots(pos, W)
    new_ring_pos = cache.ring_pos.at[jnp.arange(B)[:, None], ring_at].set(pos, mode="drop")
    rows = jnp.arange(B)[:, None]

    def layer(carry, xs_l):
        x, k_all, v_all, rk, rv = carry
        lp, window, kind, hm_l, i = xs_l
        loc, j = is_local[i], index[i]
        q, k, v, score_scale, masks = layer_in(lp, x, kind, hm_l)
        if has_global:  # a local layer writes nowhere here (slots past the end are dropped)
            at = jnp.where(loc, S, slots)
            k_all = write_rows(k_all, k, jnp.where(loc, 0, j), at, attn.cache_writes)
            v_all = write_rows(v_all, v, jnp.where(loc, 0, j), at, attn.cache_writes)

        def local_attention(ops):
            q, k, v, rk, rv, k_all, v_all = ops
            jl = jnp.where(loc, j, 0)

            def keys(ring, new):    # [B, K, W, D] rolled, then the call's [B, K, T, D], padded
                rolled = jnp.take_along_axis(ring[jl], order[:, None, :, None], axis=2)
                out = jnp.concatenate([rolled, new.swapaxes(1, 2).astype(ring.dtype)], axis=2)
                return jnp.pad(out, ((0, 0), (0, 0), (0, n_keys - W - T), (0, 0)))

            out, cap = attend(q, keys(rk, k), keys(rv, v), ring_kpos, jnp.full((B,), W, jnp.int32), window,
                              score_scale)
            return out, as_positions(cap, ring_kpos)

        def global_attention(ops):
            q, k, v, rk, rv, k_all, v_all = ops
            out, cap = attend(q, k_all[j], v_all[j], new_pos, slots, window, score_scale)
            return out, as_positions(cap, new_pos)

        ops = (q, k, v, rk, rv, k_all, v_all)
        out, cap = lax.cond(loc, local_attention, global_attention, ops) if has_global else local_attention(ops)
        at = jnp.where(loc, ring_at, W)     # the call's last W keys into the ring, after it was read
        rk = rk.at[jnp.where(loc, j, 0), rows, :, at].set(k.astype(rk.dtype), mode="drop")
        rv = rv.at[jnp.where(loc, j, 0), rows, :, at].set(v.astype(rv.dtype), mode="drop")
        x, cap = layer_out(lp, x, out, cap, masks)
        return (x, k_all, v_all, rk, rv), cap

    (x, k_all, v_all, rk, rv), caps = lax.scan(layer, (x, cache.k, cache.v, cache.ring_k, cache.ring_v), xs)
    new = KVCache(k=k_all, v=v_all, pos=new_pos, length=cache.length + n_valid, ring_k=rk, ring_v=rv,
                  ring_pos=new_ring_pos)
    return x, new, caps
