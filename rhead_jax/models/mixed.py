"""A mixed KV cache: every (layer, KV head) is FULL (keeps every position) or STREAMING (keeps the
first `sink` positions and a ring buffer of the `recent` latest), as DuoAttention deploys retrieval
and streaming heads. The memory is really saved: a streaming head's slots are sink + recent, not S.

Layout. The KV heads are split into M contiguous groups of Kg = K / M heads (M = the mesh's model
axis when it divides K, so a device holds the cache of the heads it computes; else 1). Within a
group, all full (layer, head) pairs share one slot axis, grouped by layer; so do the streaming ones:

    full_k, full_v [B, M, F, S, D]    F = full pairs per group (the largest group's), S = positions
    full_pos       [B, S]             position held by each full slot (-1: empty); slot = position
    ring_k, ring_v [B, M, R, W, D]    R = streaming pairs per group, W = sink + recent (<= S)
    ring_pos       [B, W]             position held by each ring slot (-1: empty)
    length         [B]                the next position (= full slot) of each row

Position p of a streaming head lives in ring slot p if p < sink, else sink + (p - sink) % (W - sink).

Which pair is where is DATA (`HeadTables`, int32 index tables), not program structure: layers still
run under `lax.scan` (compile time does not grow with depth) and one compiled program serves every
head choice with the same counts (all rankings at one fraction, on one device). Per layer and
group, attention reads Fl = min(Kg, F) full heads (gathered from the slot axis) and Rl = min(Kg, R)
streaming heads; a layer with fewer pads and drops the padded heads' outputs. So memory follows
the choice exactly; compute is that of the padded counts (not reduced below full attention's when
Kg is small). The alternative, static per-layer slices with the layer loop unrolled in Python,
would compute exactly the chosen heads but compile one program per head choice, each growing
with depth.

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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models.attention import NEG_INF, NO_WINDOW, AttentionOptions, chunked_attention, dense_attention, \
    visible
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.generate import Generation, GenerateSpec, decode_loop, prefill_loop
from rhead_jax.models.layers import attention_inputs, attention_output, embed, output_logits
from rhead_jax.models.rope import rope_cos_sin


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedLayout:
    """The static shape of a mixed cache (hashable: a jit static argument).

    groups (M): KV heads split into M contiguous groups of K / M heads.
    full_slots (F) / ring_slots (R): full / streaming (layer, head) pairs per group (the largest group's).
    sink, recent: what a streaming head sees (module docstring).
    """

    num_layers: int
    num_kv_heads: int
    groups: int
    full_slots: int
    ring_slots: int
    sink: int
    recent: int

    @property
    def kv_per_group(self) -> int:
        return self.num_kv_heads // self.groups

    @property
    def full_per_layer(self) -> int:
        """Fl: full heads attention reads per layer and group (padded)."""
        return min(self.kv_per_group, self.full_slots)

    @property
    def ring_per_layer(self) -> int:
        """Rl: streaming heads attention reads per layer and group (padded)."""
        return min(self.kv_per_group, self.ring_slots)

    @property
    def window(self) -> int:
        """W: ring slots of a batch cache (capped at the cache's positions by `ring_capacity`)."""
        return self.sink + self.recent

    def ring_capacity(self, size: int) -> int:
        return min(self.window, size)


@flax.struct.dataclass
class HeadTables:
    """Where each (layer, group)'s heads are, as int32 arrays (data: one program serves many choices).

    full_head / full_slot [L, M, Fl]: group-local KV head index and slot on the F axis of the layer's
      j-th full head (padding: head 0, slot F, out of range, so writes to it are dropped).
    ring_head / ring_slot [L, M, Rl]: the same for streaming heads (padding slot R).
    pick [L, M, Kg]: for each group-local head, its index in [full heads (Fl); streaming heads (Rl)].
    """

    full_head: jax.Array
    full_slot: jax.Array
    ring_head: jax.Array
    ring_slot: jax.Array
    pick: jax.Array


def head_layout(full, *, groups: int = 1, sink: int, recent: int) -> tuple[MixedLayout, HeadTables]:
    """Layout and tables of a boolean [L, K] `full` (True: full head) split into `groups` groups."""
    full = np.asarray(full, bool)
    L, K = full.shape
    if groups < 1 or K % groups:
        raise ValueError(f"groups={groups} must divide the {K} KV heads")
    if sink < 0 or recent < 1:
        raise ValueError(f"streaming heads need sink >= 0 and recent >= 1, got sink={sink}, recent={recent}")
    Kg = K // groups
    g = full.reshape(L, groups, Kg)
    F, R = int(g.sum((0, 2)).max()), int((~g).sum((0, 2)).max())
    layout = MixedLayout(num_layers=L, num_kv_heads=K, groups=groups, full_slots=F, ring_slots=R, sink=sink,
                         recent=recent)
    Fl, Rl = layout.full_per_layer, layout.ring_per_layer
    fh, fs = np.zeros((L, groups, Fl), np.int32), np.full((L, groups, Fl), F, np.int32)
    rh, rs = np.zeros((L, groups, Rl), np.int32), np.full((L, groups, Rl), R, np.int32)
    pick = np.zeros((L, groups, Kg), np.int32)
    for m in range(groups):
        nf = nr = 0
        for l in range(L):
            jf = jr = 0
            for h in range(Kg):
                if g[l, m, h]:
                    fh[l, m, jf], fs[l, m, jf], pick[l, m, h] = h, nf, jf
                    jf, nf = jf + 1, nf + 1
                else:
                    rh[l, m, jr], rs[l, m, jr], pick[l, m, h] = h, nr, Fl + jr
                    jr, nr = jr + 1, nr + 1
    tables = HeadTables(full_head=jnp.asarray(fh), full_slot=jnp.asarray(fs), ring_head=jnp.asarray(rh),
                        ring_slot=jnp.asarray(rs), pick=jnp.asarray(pick))
    return layout, tables


# ----------------------------------------------------------------------------- cache


@flax.struct.dataclass
class MixedCache:
    """See the module docstring for the shapes. Every array has the batch on axis 0."""

    full_k: jax.Array
    full_v: jax.Array
    full_pos: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    ring_pos: jax.Array
    length: jax.Array

    @property
    def size(self) -> int:
        return self.full_pos.shape[1]

    @property
    def ring_size(self) -> int:
        return self.ring_pos.shape[1]


def init_mixed_cache(cfg: ModelConfig, layout: MixedLayout, batch: int, size: int, *, ring: int | None = None,
                     dtype=None) -> MixedCache:
    """A zeroed cache of `size` positions; streaming heads get `ring` slots (default: sink + recent,
    at most `size`; `ring=size` keeps every position, as the shared prefix's reference does)."""
    dtype = dtype or jnp.dtype(cfg.dtype)
    W = layout.ring_capacity(size) if ring is None else ring
    M, D = layout.groups, cfg.head_dim
    fshape, rshape = (batch, M, layout.full_slots, size, D), (batch, M, layout.ring_slots, W, D)
    return MixedCache(full_k=jnp.zeros(fshape, dtype), full_v=jnp.zeros(fshape, dtype),
                      full_pos=jnp.full((batch, size), -1, jnp.int32), ring_k=jnp.zeros(rshape, dtype),
                      ring_v=jnp.zeros(rshape, dtype), ring_pos=jnp.full((batch, W), -1, jnp.int32),
                      length=jnp.zeros((batch,), jnp.int32))


def cache_nbytes(cache) -> int:
    """Bytes of a cache's arrays (any pytree: MixedCache, KVCache)."""
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def ring_slot(pos, sink: int, capacity: int):
    """Ring slot of position(s) `pos` in a ring of `capacity` slots."""
    rec = max(capacity - sink, 1)
    return jnp.where(pos < sink, pos, sink + (pos - sink) % rec)


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


# ----------------------------------------------------------------------------- rows (the engine's batches)


def rows_from_prefix(prefix: MixedCache, starts, size: int, *, sink: int, ring: int) -> MixedCache:
    """A [B]-row batch cache of `size` positions and `ring` ring slots from a 1-row prefix cache whose
    ring keeps every position (`init_mixed_cache(..., ring=<its size>)`, slot = position): row b
    takes positions < starts[b], i.e. its full heads' slots and, for its streaming heads, the sink
    and the latest positions its ring holds after them (exactly what prefilling them would leave)."""
    B = starts.shape[0]
    fk, fv = prefix.full_k[:, :, :, :size], prefix.full_v[:, :, :, :size]
    shape = (B,) + fk.shape[1:]
    n = starts[:, None].astype(jnp.int32)
    slot = jnp.arange(size)[None]
    w = jnp.arange(ring)[None]
    rec = max(ring - sink, 1)
    p = jnp.where(w < sink, w, w + rec * ((n - 1 - w) // rec))      # the latest position of slot w below n
    ok = w < n
    idx = jnp.where(ok, p, 0)
    take = lambda buf: jax.vmap(lambda pb: jnp.take(buf[0], pb, axis=2))(idx)  # noqa: E731  [B, M, R, ring, D]
    return MixedCache(full_k=jnp.broadcast_to(fk, shape), full_v=jnp.broadcast_to(fv, shape),
                      full_pos=jnp.where(slot < n, slot, -1).astype(jnp.int32), ring_k=take(prefix.ring_k),
                      ring_v=take(prefix.ring_v),
                      ring_pos=jnp.where(ok, p, -1).astype(jnp.int32), length=starts.astype(jnp.int32))


def take_rows(cache, j, d: int):
    """Row block j of a cache whose arrays all have the batch on axis 0 (rows j, B/d + j, ...; see
    models.generate.take_row_block)."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(_split(x, d), j, 1, keepdims=False), cache)


def put_rows(cache, block, j, d: int):
    """`cache` with row block j replaced by `block` (in place when the cache is donated)."""
    return jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(_split(x, d), y, j, 1).reshape(x.shape),
                        cache, block)


def _split(x, d: int):
    """[B, ...] -> [d, B/d, ...] (a view: the batch axis split by data shard)."""
    return x.reshape((d, x.shape[0] // d) + x.shape[1:])
