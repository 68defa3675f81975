"""The Llama-like decoder as a pure function of (params, inputs), declared as a Flax linen module.

One decoder covers Llama-2/3, Mistral (sliding window), Mixtral (sparse MoE), Yi (Llama), Qwen1.5/2
(q/k/v biases), Qwen3 (q/k RMSNorm), SmolLM2 (tied embeddings) and Gemma 1/2/3 ((1 + w) norms,
sandwich norms, GeGLU, scaled embeddings, soft-capping, local/global layers). Layers are stacked on
a leading axis and run with `lax.scan`, so compile time does not grow with depth.

Hybrid local/global models (Gemma 2: 1 local : 1 global; Gemma 3: 5 : 1). A layer's kind is DATA
in the scan: its window ([L] int32, NO_WINDOW for a global layer) and the index of its rope in
cfg.ropes ([L] int32; the rope tables of each kind are computed once per call, [R, B, T, D], and
the layer picks its own). So the scan body is one layer with ONE attention op, whatever the
pattern or depth: the op already masks by positions and takes the window as a traced scalar (the
chunked path skips the key chunks a window hides). The alternative, scanning the repeating block
(5 local + 1 global) with the kinds as the block's static structure, compiles 6 layers and a
remainder scan, and would only be needed if the kinds' caches had different shapes in one scan.

Parameter tree (L layers, d model, f MLP, H/K query/kv heads, D head dim, E experts, V vocab):

    embed            [V, d]
    layers/attn_norm [L, d]        layers/mlp_norm [L, d]
    layers/q         [L, d, H, D]  layers/q_bias [L, H, D]   (qkv_bias)
    layers/k, v      [L, d, K, D]  layers/k_bias, v_bias [L, K, D]
    layers/o         [L, H, D, d]  layers/o_bias [L, d]      (o_bias)
    layers/q_norm, k_norm [L, D]                             (qk_norm)
    layers/post_attn_norm, post_mlp_norm [L, d]              (sandwich_norms; mlp_norm is then
                                                              HF's pre_feedforward_layernorm)
    dense MLP: layers/gate, up [L, d, f], down [L, f, d]     (+ *_bias with mlp_bias)
    MoE MLP:   layers/router [L, d, E], gate, up [L, E, d, f], down [L, E, f, d]
    final_norm [d]
    lm_head    [d, V]                                        (absent with tied embeddings)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models.attention import (MASS_TARGETS, NO_WINDOW, AttentionOptions, MassTargets, chunked_attention,
                                        dense_attention, mass_from_probs, prefill_attention, visible)
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.rope import apply_rope, rope_cos_sin

Params = Any
MASK_MODES = ("zero", "uniform", "mean_query", "mean_output")
MEAN_MODES = ("mean_query", "mean_output")   # head_mask [L, H, 1 + D]: the value, then the head's mean


# ----------------------------------------------------------------------------- capture & cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureSpec:
    """What attention to capture (opt-in; nothing by default).

    top_k: for the NEWEST query of each row (the last token of the call), per layer and query
      head, the top-k cache slots by attention weight and those weights, computed over all keys.
    full_probs: the full probabilities [L, B, H, T, S] for every query (short sequences only).
    masses: attention-mass targets (models.attention.target_mask: "span", "previous", "duplicate",
      "induction"): per layer, row and query head, the attention each target's keys receive,
      summed over the call's queries in the target's range (`forward(targets=...)`), [L, B, H, M].
      Reduced inside the attention: memory O(T), never a T x S map.
    span_outputs: for ONE new token per row (decode steps), per layer, row and query head, what
      the logit-contribution scores need (rhead_jax.detection): the head's attention output
      o = sum_j alpha_j v_j (before o_proj) and its part from the keys in `forward(output_span=)`,
      both [L, B, H, D] fp32, the attention mass on those keys [L, B, H], and the numbers of
      visible keys and of visible keys in the span [L, B, 2]. O(S) per head, no second pass.
    head_sums: per layer, row and query head, the sums over the call's real tokens of the head's
      query as q_proj gives it (bias included; before q-norm and RoPE) and of its attention output
      (before o_proj), [L, B, H, D] fp32 each: the calibration of the mean ablations.
    """

    top_k: int = 0
    full_probs: bool = False
    masses: tuple[str, ...] = ()
    span_outputs: bool = False
    head_sums: bool = False

    def __post_init__(self):
        unknown = [m for m in self.masses if m not in MASS_TARGETS]
        if unknown:
            raise ValueError(f"unknown mass target(s) {unknown}; known: {MASS_TARGETS}")

    @property
    def enabled(self) -> bool:
        return self.top_k > 0 or self.full_probs or bool(self.masses) or self.span_outputs or self.head_sums


@flax.struct.dataclass
class Captures:
    """Captured attention. topk_*: [L, B, H, k] (slot indices / fp32 weights); probs: [L, B, H, T, S];
    mass: [L, B, H, M] fp32 (CaptureSpec.masses, in its order); head_out / span_out [L, B, H, D],
    span_mass [L, B, H] fp32 and key_counts [L, B, 2] int32 (visible keys, visible keys in the
    span) of CaptureSpec.span_outputs; q_sum / out_sum [L, B, H, D] fp32 of CaptureSpec.head_sums."""

    topk_index: jax.Array | None = None
    topk_weight: jax.Array | None = None
    probs: jax.Array | None = None
    mass: jax.Array | None = None
    head_out: jax.Array | None = None
    span_out: jax.Array | None = None
    span_mass: jax.Array | None = None
    key_counts: jax.Array | None = None
    q_sum: jax.Array | None = None
    out_sum: jax.Array | None = None


@flax.struct.dataclass
class KVCache:
    """Static-shape KV cache: the plain one (every layer keeps every position) or, with rings, the
    windowed one (a local layer keeps only its window of positions).

    k, v: [Lf, B, K, S, D] (the layout attention reads without copies): the layers that keep every
      position (Lf = L for a plain cache; the global layers of a windowed one). pos: [B, S] int32
      position held in each slot (-1: empty/padding); slot = position.
    length: [B] int32, the next slot each row writes to (= the row's next position).
    ring_k, ring_v: [Ll, B, K, W, D] or None: a windowed cache's local layers (cfg.windows not
      None), in layer order; position p lives in ring slot p % W. W >= every local window, so a
      ring holds all a local query can see; its memory is W, not S. ring_pos [B, W]: position per
      ring slot (-1: empty).

    The interface the decoder reads (forward's layer body), the same for both kinds:
      write a block: the call's keys go to slots length + t (full layers) / p % W (rings, only the
        last W positions of the call);
      what attention reads: full layers read their S slots with `pos`; a local layer reads its
        ring rolled into position order followed by the call's own keys, with their positions
        (`ring_view`), so the chunked path's "slots advance with positions" holds;
      slots back to positions (capture): a windowed cache's captured top-k are positions (key
        position of the attended slot); a plain cache's are slots, which equal positions.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    ring_k: jax.Array | None = None
    ring_v: jax.Array | None = None
    ring_pos: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.k.shape[3]

    @property
    def windowed(self) -> bool:
        return self.ring_k is not None

    @property
    def ring_size(self) -> int:
        return self.ring_k.shape[3]


def local_layers(cfg: ModelConfig) -> tuple[int, ...]:
    """Indices of the layers with a window (local layers)."""
    return tuple(i for i, w in enumerate(cfg.windows) if w is not None)


def ring_size_for(cfg: ModelConfig, size: int) -> int | None:
    """Ring slots of a windowed cache of `size` positions: the largest window, or None (a plain
    cache) when the model has no local layer or its window is not smaller than `size`."""
    wins = [w for w in cfg.windows if w is not None]
    return max(wins) if wins and max(wins) < size else None


def init_cache(cfg: ModelConfig, batch: int, size: int, *, dtype=None, ring: int | None = None) -> KVCache:
    """A zeroed cache of `size` slots. ring: None, a plain cache; W, a windowed one whose local
    layers keep rings of W slots (W >= every window; W = size keeps every position in order, as
    the shared prefix's one row must so each row can cut its own window from it)."""
    dtype = dtype or jnp.dtype(cfg.dtype)
    local = local_layers(cfg) if ring is not None else ()
    if ring is not None and (not local or ring < max(w for w in cfg.windows if w is not None)):
        raise ValueError(f"a ring of {ring} slots needs local layers whose windows fit in it")
    shape = (cfg.num_layers - len(local), batch, cfg.num_kv_heads, size, cfg.head_dim)
    cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    pos=jnp.full((batch, size), -1, jnp.int32), length=jnp.zeros((batch,), jnp.int32))
    if ring is None:
        return cache
    rshape = (len(local), batch, cfg.num_kv_heads, ring, cfg.head_dim)
    return cache.replace(ring_k=jnp.zeros(rshape, dtype), ring_v=jnp.zeros(rshape, dtype),
                         ring_pos=jnp.full((batch, ring), -1, jnp.int32))


def ring_view(ring_pos, length, new_pos):
    """What a local layer reads: its ring rolled into position order, then the call's keys.

    ring_pos [B, W], length [B] (before the call), new_pos [B, T] -> (order [B, W]: the ring slot
    at each rolled index; key positions [B, W + T])."""
    W = ring_pos.shape[1]
    order = (length[:, None] + jnp.arange(W)[None]) % W
    return order, jnp.concatenate([jnp.take_along_axis(ring_pos, order, axis=1), new_pos], axis=1)


def ring_slots(new_pos, W: int):
    """[B, T] ring slot of each new token, W (dropped) for padding and for tokens that a later
    token of the same call overwrites (only the call's last W positions are written)."""
    end = jnp.max(new_pos, axis=1, keepdims=True) + 1
    keep = (new_pos >= 0) & (new_pos >= end - W)
    return jnp.where(keep, new_pos % W, W)


def write_rows(buf, new, i, slots, mode: str = "tpu", row=None):
    """buf [L, B, K, S, D] with new [B, T, K, D] written at buf[i, b, :, slots[b] + t, :]; tokens
    that would land past the last slot are dropped (as a scatter with mode="drop" drops them).

    Written so that XLA:TPU updates the cache in place (numbers: tests and the dry run, Yi-34B at
    50K on v5p-8, 2 KV heads per chip). The scatter of [K, D] windows across the slot axis made it
    copy what it writes into when a device holds 2+ KV heads; a one-slot dynamic_update_slice in the
    decode loop made it re-lay the cache out as [L, B, S, K, D] for the loop and copy it back; and a
    dynamic_update_slice per row at a static row index of a batch sharded on "data" made the SPMD
    partitioner gather the rows (temp growing with the data axis). So:
      T == 1 (decode): an elementwise select of each row's slot over layer i (no layout change; it
        reads and writes layer i's cache once per step, as much as the attention reads);
      B == 1, T > 1 (a prefill call of a row block on one data shard; the shared prefix): one
        `lax.dynamic_update_slice` of a contiguous run of T slots; a run that would pass the end is
        written at S - T instead, its tokens shifted into place and the slots before slots[0]
        rewritten with what they held;
      otherwise (a row block over 2+ data shards, one row per device): the scatter, partitioned
        row-wise (what it may copy is that device's row of the block).
    Bit-identical to the scatter (tests/test_models.py::test_write_rows_is_the_dropping_scatter).
    mode "scatter" uses the scatter for everything: XLA:CPU updates it in place, and a decode step
    is 20% faster than with the select (SmolLM2, batch 3, 2048 slots: 108 vs 135 ms).
    row: None, or (scatter only) the buffer row of new's first row (forward's `row`).
    """
    B, T = new.shape[:2]
    S = buf.shape[3]
    new = new.astype(buf.dtype).swapaxes(1, 2)                   # [B, K, T, D]
    rows = jnp.arange(B)[:, None] if row is None else jnp.arange(B)[:, None] + row

    def scatter():  # [i, b, :, slot, :] <- [B, T, K, D] (advanced indices first, as numpy orders them)
        at = slots[:, None] + jnp.arange(T)[None]
        return buf.at[i, rows, :, at].set(new.swapaxes(1, 2), mode="drop")

    if row is not None and mode != "scatter":
        raise ValueError(f"write_rows(row=...) writes by scatter, not {mode!r}")

    if mode == "scatter" or T > S:  # CPU / GPU; or more tokens than slots (tiny caches)
        return scatter()
    if T == 1:  # a decode step: select the slot (elementwise; keeps the cache's layout on TPU)
        hit = (jnp.arange(S)[None, :] == slots[:, None])[:, None, :, None]      # [B, 1, S, 1]
        layer = lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)
        return lax.dynamic_update_index_in_dim(buf, jnp.where(hit, new, layer), i, 0)
    if B == 1:  # one row (a prefill call of one row block on one data shard, the shared prefix)
        slot = slots[0]
        start = jnp.minimum(slot, S - T)
        shift = slot - start                                     # > 0 only for a run past the end
        old = lax.dynamic_slice(buf, (i, 0, 0, start, 0), (1, 1) + new.shape[1:])[0, 0]
        run = jnp.where(jnp.arange(T)[None, :, None] >= shift, jnp.roll(new[0], shift, axis=1), old)
        return lax.dynamic_update_slice(buf, run[None, None], (i, 0, 0, start, 0))
    return scatter()


# ----------------------------------------------------------------------------- params


class Decoder(nn.Module):
    """Declares the parameter tree; `__call__` is `forward` on those params."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, cache, **kw):
        c = self.cfg
        L, d, f, H, K, D, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                               c.num_kv_heads, c.head_dim, c.vocab_size)
        dt = jnp.dtype(c.dtype)
        w, ones, zeros = nn.initializers.normal(0.02), nn.initializers.ones, nn.initializers.zeros
        layers = {"attn_norm": ((L, d), ones), "mlp_norm": ((L, d), ones),
                  "q": ((L, d, H, D), w), "k": ((L, d, K, D), w), "v": ((L, d, K, D), w),
                  "o": ((L, H, D, d), w)}
        if c.qkv_bias:
            layers |= {"q_bias": ((L, H, D), zeros), "k_bias": ((L, K, D), zeros),
                       "v_bias": ((L, K, D), zeros)}
        if c.o_bias:
            layers["o_bias"] = ((L, d), zeros)
        if c.qk_norm:
            layers |= {"q_norm": ((L, D), ones), "k_norm": ((L, D), ones)}
        if c.sandwich_norms:
            layers |= {"post_attn_norm": ((L, d), ones), "post_mlp_norm": ((L, d), ones)}
        if c.is_moe:
            E = c.num_experts
            layers |= {"router": ((L, d, E), w), "gate": ((L, E, d, f), w), "up": ((L, E, d, f), w),
                       "down": ((L, E, f, d), w)}
        else:
            layers |= {"gate": ((L, d, f), w), "up": ((L, d, f), w), "down": ((L, f, d), w)}
            if c.mlp_bias:
                layers |= {"gate_bias": ((L, f), zeros), "up_bias": ((L, f), zeros),
                           "down_bias": ((L, d), zeros)}
        params = {"embed": self.param("embed", w, (V, d), dt),
                  "layers": {n: self.param(f"layers_{n}", init, shape, dt)
                             for n, (shape, init) in layers.items()},
                  "final_norm": self.param("final_norm", ones, (d,), dt)}
        if not c.tie_word_embeddings:
            params["lm_head"] = self.param("lm_head", w, (d, V), dt)
        return forward(params, c, tokens, positions, cache, **kw)


def _nest(flat: dict) -> dict:
    """Flax's flat names ('layers_q') -> the nested tree documented above."""
    out: dict = {"layers": {}}
    for name, value in flat.items():
        if name.startswith("layers_"):
            out["layers"][name[len("layers_"):]] = value
        else:
            out[name] = value
    return out


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random params (tests, dry runs). Real weights come from rhead_jax.checkpoints."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Decoder(cfg).init(rng, tokens, tokens, None, logits="none")
    return _nest(variables["params"])


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter template as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------- forward


def _windowed_layers(c: ModelConfig, cache: KVCache, x, xs, layer_in, attend, layer_out, as_positions, positions,
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


def rms_norm(x, weight, eps, plus_one: bool = False):
    """transformers' RMSNorm: normalize in fp32, cast back, then scale. plus_one (Gemma): scale by
    (1 + weight) in fp32, then cast."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def norm(x, weight, cfg: ModelConfig):
    """The model's RMSNorm of x [..., n] with weight [n]."""
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_plus_one)


def _act(cfg: ModelConfig, g):
    if cfg.activation == "silu":
        return jax.nn.silu(g)
    return jax.nn.gelu(g, approximate=cfg.activation == "gelu_tanh")


def softcap(x, cap):
    """cap * tanh(x / cap) (no-op for cap None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _mlp(lp, h, cfg: ModelConfig):
    if not cfg.is_moe:
        g = jnp.einsum("btd,df->btf", h, lp["gate"])
        u = jnp.einsum("btd,df->btf", h, lp["up"])
        if cfg.mlp_bias:
            g, u = g + lp["gate_bias"], u + lp["up_bias"]
        y = jnp.einsum("btf,fd->btd", _act(cfg, g) * u, lp["down"])
        return y + lp["down_bias"] if cfg.mlp_bias else y
    # Sparse MoE, transformers' Mixtral routing: softmax over all experts in fp32, keep the top-k,
    # renormalize (= softmax over the selected logits). Experts are evaluated densely and combined
    # with zero weight for unselected ones: exact, and shardable along the expert axis.
    logits = jnp.einsum("btd,de->bte", h, lp["router"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_i = lax.top_k(probs, cfg.num_experts_per_tok)
    top_w = top_w / top_w.sum(-1, keepdims=True)
    weights = jnp.sum(jax.nn.one_hot(top_i, cfg.num_experts, dtype=jnp.float32) * top_w[..., None], axis=-2)
    g = jnp.einsum("btd,edf->btef", h, lp["gate"])
    u = jnp.einsum("btd,edf->btef", h, lp["up"])
    y = jnp.einsum("btef,efd->bted", _act(cfg, g) * u, lp["down"])
    return jnp.einsum("bted,bte->btd", y.astype(jnp.float32), weights).astype(h.dtype)


def embed(params: Params, cfg: ModelConfig, tokens):
    """Token embeddings [B, T, d] in the model's dtype (Gemma: times sqrt(d), the factor first cast
    to the compute dtype as transformers does)."""
    dt = jnp.dtype(cfg.dtype)
    x = params["embed"][tokens].astype(dt)
    if cfg.embed_scale:
        x = x * jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(dt)
    return x


def layer_kinds(cfg: ModelConfig):
    """Per-layer data of the scan: (windows [L] int32, NO_WINDOW for global layers; rope index
    [L] int32 into cfg.ropes)."""
    return (jnp.asarray([w or NO_WINDOW for w in cfg.windows], jnp.int32),
            jnp.asarray(cfg.rope_kinds, jnp.int32))


def rope_tables(cfg: ModelConfig, positions):
    """cos, sin [R, B, T, D] for each of cfg.ropes (R = 1 or 2) at positions [B, T]."""
    tabs = [rope_cos_sin(cfg, positions, rope=r) for r in cfg.ropes]
    return jnp.stack([t[0] for t in tabs]), jnp.stack([t[1] for t in tabs])


def layer_rope(tables, kind):
    """One layer's cos, sin [B, T, D] from rope_tables' [R, B, T, D] and its rope index."""
    cos, sin = tables
    if cos.shape[0] == 1:   # one rope: no select in the program (the dense models' graph unchanged)
        return cos[0], sin[0]
    return lax.dynamic_index_in_dim(cos, kind, 0, False), lax.dynamic_index_in_dim(sin, kind, 0, False)


def attention_inputs(lp, cfg: ModelConfig, x, cos, sin, q_mean=None):
    """One layer's (q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]) from its input x [B, T, d], with
    RoPE applied (lp: that layer's slice of params["layers"]). q_mean: (m [H], mean [H, D]) or None:
    the "mean_query" mask, q_proj's output q <- m q + (1 - m) mean before q-norm and RoPE."""
    c = cfg
    h = norm(x, lp["attn_norm"], c)
    q = jnp.einsum("btd,dhk->bthk", h, lp["q"])
    k = jnp.einsum("btd,dnk->btnk", h, lp["k"])
    v = jnp.einsum("btd,dnk->btnk", h, lp["v"])
    if c.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if q_mean is not None:
        m, mean = q_mean
        q = (q * m[:, None] + (1 - m[:, None]) * mean).astype(q.dtype)
    if c.qk_norm:
        q, k = norm(q, lp["q_norm"], c), norm(k, lp["k_norm"], c)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_output(lp, cfg: ModelConfig, x, out):
    """The rest of the layer after attention: x + o_proj(out), then the MLP block.
    out: attention output [B, T, K, G, D] (query head h = k * G + g)."""
    c = cfg
    K, G, D = c.num_kv_heads, c.group_size, c.head_dim
    B, T = out.shape[:2]
    # both operands as matrices (reshapes, not transposes): a decode step otherwise had XLA:CPU copy
    # the o_proj weight into the attention output's layout at every layer and step
    o = jnp.einsum("btj,jm->btm", out.astype(jnp.dtype(c.dtype)).reshape(B, T, K * G * D),
                   lp["o"].reshape(K * G * D, -1))
    if c.o_bias:
        o = o + lp["o_bias"]
    if c.sandwich_norms:
        x = x + norm(o, lp["post_attn_norm"], c)
        return x + norm(_mlp(lp, norm(x, lp["mlp_norm"], c), c), lp["post_mlp_norm"], c)
    x = x + o
    return x + _mlp(lp, norm(x, lp["mlp_norm"], c), c)


def final_hidden(params: Params, cfg: ModelConfig, x):
    """The final RMSNorm of the last layer's output (what the LM head reads)."""
    return norm(x, params["final_norm"], cfg)


def output_logits(params: Params, cfg: ModelConfig, x):
    """fp32 logits [..., V] from the last layer's output x [..., d]."""
    x = final_hidden(params, cfg, x)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return softcap(jnp.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32), cfg.final_softcap)


def unembedding_rows(params: Params, cfg: ModelConfig, tokens):
    """u [..., d] fp32: the unembedding row of each token id (the LM head's column; the embedding
    row with tied embeddings). The final norm (and Gemma's final logit soft-cap) is NOT applied."""
    rows = params["embed"][tokens] if cfg.tie_word_embeddings else jnp.take(params["lm_head"], tokens, axis=1).T
    return rows.astype(jnp.float32)


def head_logit_contributions(params: Params, cfg: ModelConfig, caps: Captures, tokens):
    """Per layer, row and query head, LOCOS's logit-contribution terms of one decode step whose
    generated token is tokens [B] (CaptureSpec.span_outputs captured): [L, B, H, 3] fp32 =

      logit    phi_span - phi_other * n_span / n_other   (LOCOS's score of the step)
      dla      phi_span + phi_other                       (no spatial contrast: direct logit attribution)
      spatial  a_span - a_other * n_span / n_other        (no OV term: alpha in place of phi)

    with phi_j = alpha_j * u[y] . (W_O[l, h] v_j) summed over the span's visible keys (phi_span) or
    the other visible keys (phi_other), a the same sums of alpha, n the key counts, u = the raw
    unembedding row of y (`unembedding_rows`) and W_O[l, h] = params["layers"]["o"][l, h] [D, d]. So
    with g = W_O[l, h] u: phi_span + phi_other = o . g and phi_span = o_span . g."""
    u = unembedding_rows(params, cfg, tokens)                                       # [B, d]
    g = jnp.einsum("lhdm,bm->lbhd", params["layers"]["o"].astype(jnp.float32), u,
                   precision=lax.Precision.HIGHEST)
    phi_all = jnp.sum(caps.head_out * g, -1)
    phi_span = jnp.sum(caps.span_out * g, -1)
    n_all, n_span = caps.key_counts[..., 0], caps.key_counts[..., 1]
    ratio = (n_span / jnp.maximum(n_all - n_span, 1)).astype(jnp.float32)[..., None]   # [L, B, 1]
    logit = phi_span - (phi_all - phi_span) * ratio
    spatial = caps.span_mass - (1.0 - caps.span_mass) * ratio
    return jnp.stack([logit, phi_all, spatial], axis=-1)


LOGIT_TERMS = ("logit", "dla", "spatial")   # the last axis of head_logit_contributions


def check_head_mask(cfg: ModelConfig, head_mask, mask_mode: str | None = None) -> None:
    expected = (cfg.num_layers, cfg.num_heads)
    mean = (cfg.num_layers, cfg.num_heads, 1 + cfg.head_dim)
    shapes = {"zero": [expected], "uniform": [expected]}.get(mask_mode, [mean] if mask_mode else [expected, mean])
    if head_mask is not None and tuple(head_mask.shape) not in shapes:
        raise ValueError(
            f"head_mask has shape {tuple(head_mask.shape)}, expected [num_layers, num_query_heads] = "
            f"{list(expected)} (one value per QUERY head, also under GQA), or for the mean modes "
            f"{MEAN_MODES} [num_layers, num_query_heads, 1 + head_dim] = {list(mean)} (the value, then the mean)")


def _span_outputs(p, v, k_pos, q_pos, window, span, H):
    """CaptureSpec.span_outputs of one query per row: p [B, K, G, 1, S] fp32, v [B, K, S, D]."""
    B = p.shape[0]
    vis = visible(q_pos, k_pos, window)[:, 0]                                         # [B, S]
    in_span = vis & (k_pos >= span[:, :1]) & (k_pos < span[:, 1:])
    p = p[:, :, :, 0]
    vf = v.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    head_out = jnp.einsum("bkgs,bksd->bkgd", p, vf, precision=hi)
    span_out = jnp.einsum("bkgs,bs,bksd->bkgd", p, in_span.astype(jnp.float32), vf, precision=hi)
    span_mass = jnp.einsum("bkgs,bs->bkg", p, in_span.astype(jnp.float32), precision=hi)
    counts = jnp.stack([vis.sum(-1), in_span.sum(-1)], -1).astype(jnp.int32)
    return {"head_out": head_out.reshape(B, H, -1), "span_out": span_out.reshape(B, H, -1),
            "span_mass": span_mass.reshape(B, H), "key_counts": counts}


def _head_sums(lp, cfg: ModelConfig, x, out, valid, q_mean):
    """CaptureSpec.head_sums: q_proj's query (before q-norm and RoPE) and the attention output
    out [B, T, K, G, D] (before o_proj), summed over the real tokens (valid [B, T])."""
    B, T = valid.shape
    h = norm(x, lp["attn_norm"], cfg)
    q = jnp.einsum("btd,dhk->bthk", h, lp["q"], preferred_element_type=jnp.float32)
    if cfg.qkv_bias:
        q = q + lp["q_bias"]
    if q_mean is not None:
        q = q * q_mean[0][:, None] + (1 - q_mean[0][:, None]) * q_mean[1]
    w = valid.astype(jnp.float32)
    return {"q_sum": jnp.einsum("bthk,bt->bhk", q, w),
            "out_sum": jnp.einsum("bthk,bt->bhk", out.reshape(B, T, cfg.num_heads, -1).astype(jnp.float32), w)}


def forward(params: Params, cfg: ModelConfig, tokens, positions, cache: KVCache | None = None, *,
            head_mask=None, mask_mode: str = "zero", capture: CaptureSpec = CaptureSpec(),
            logits: str = "all", attn: AttentionOptions = AttentionOptions(),
            targets: MassTargets | None = None, output_span=None, row=None):
    """Run the decoder on new tokens, appending them to the cache.

    Args:
      tokens, positions: [B, T] int. Padding goes at the END of a row, with position -1.
      cache: KVCache; row b writes its tokens at slots cache.length[b] + t (a windowed cache's
        local layers: ring slots p % W). None: a fresh plain cache just large enough for `tokens`
        (a plain forward pass). A windowed cache's captured top-k are key positions; it does not
        capture full_probs.
      head_mask: [L, H] float or None. mask_mode "zero": head h's attention output is multiplied
        by the value (0 removes it); "uniform": its pre-softmax scores are multiplied by the value
        (0 = attends uniformly over visible keys, the original paper's ablation). The mean modes
        take [L, H, 1 + D], the value m then the head's mean over calibration tokens:
        "mean_query": its query as q_proj gives it <- m q + (1 - m) mean, before q-norm and RoPE
        (LOCOS's mean ablation); "mean_output": its attention output (before o_proj)
        <- m out + (1 - m) mean. See CaptureSpec.head_sums for the means.
      capture: what attention to return (see CaptureSpec).
      targets: the per-row arguments of capture.masses (models.attention.MassTargets; queries
        [B, M, 2] in the order of capture.masses); required with masses.
      output_span: [B, 2] int positions [start, end) of capture.span_outputs' keys (T must be 1).
      logits: "all" -> [B, T, V]; "last" -> [B, V] at each row's last real token; "none".
      row: None (the cache has B rows), or an int32 scalar: the call's rows are the cache's rows
        row ... row + B - 1 (a row block of a batch cache, updated in place without copying the
        block's cache out and back: models.generate.prefill_block_impl); a plain cache written by
        scatter (attn.cache_writes) only.

    Returns:
      (logits fp32 or None, new KVCache, Captures)
    """
    B, T = tokens.shape
    c = cfg
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    check_head_mask(c, head_mask, mask_mode)
    masses = capture.masses
    if masses and (targets is None or targets.queries.shape[1] != len(masses)):
        raise ValueError(f"capture.masses={masses} needs targets with queries [B, {len(masses)}, 2]")
    if capture.span_outputs and (T != 1 or output_span is None):
        raise ValueError("capture.span_outputs needs one new token per row (a decode step) and output_span [B, 2]")
    if cache is None:
        size = -(-T // min(attn.k_chunk, T)) * min(attn.k_chunk, T)
        cache = init_cache(c, B, size)
    K, G, D = c.num_kv_heads, c.group_size, c.head_dim
    scale = c.attn_scale
    if row is not None and (cache.windowed or attn.cache_writes != "scatter"):
        raise ValueError("forward(row=...) needs a plain cache written by scatter (AttentionOptions.cache_writes)")
    block = (lambda x: x) if row is None else (lambda x: lax.dynamic_slice_in_dim(x, row, B, 0))  # noqa: E731
    slots = block(cache.length)
    valid = positions >= 0
    n_valid = valid.sum(-1).astype(jnp.int32)
    new_pos = block(cache.pos).at[jnp.arange(B)[:, None], slots[:, None] + jnp.arange(T)[None]].set(
        jnp.where(valid, positions, -1).astype(jnp.int32), mode="drop")
    ropes = rope_tables(c, positions)
    windows, rope_kind = layer_kinds(c)
    windows_static = tuple(sorted({w or NO_WINDOW for w in c.windows}))  # the kernels' static masks
    mean_mode = mask_mode in MEAN_MODES and head_mask is not None
    hm = (jnp.ones((c.num_layers, c.num_heads), jnp.float32) if head_mask is None
          else jnp.asarray(head_mask, jnp.float32))
    want_last_row = capture.top_k > 0 and not capture.full_probs
    last_idx = jnp.maximum(n_valid - 1, 0)

    def attend(q, kc, vc, k_pos, q_slot0, window, score_scale, kv_new=None):
        """One layer's attention over keys kc, vc [B, K, S, D] at positions k_pos [B, S]: (out, cap).
        kv_new: the call's own keys and values [B, T, K, D] in a plain cache (the kernels read them)."""
        cap = {}
        if T == 1 or capture.full_probs:
            out, p = dense_attention(q, kc, vc, positions, k_pos, window=window, scale=scale,
                                     score_scale=score_scale, softcap=c.attn_softcap, cache_left=attn.decode_scores == "cache_left")
            if capture.full_probs:
                cap["probs"] = p.reshape(B, c.num_heads, T, -1)
            if masses:
                cap["mass"] = mass_from_probs(p, positions, k_pos, masses, targets).reshape(B, c.num_heads, -1)
            if capture.span_outputs:
                cap.update(_span_outputs(p, vc, k_pos, positions, window, output_span, c.num_heads))
            last_p = jnp.take_along_axis(p, last_idx[:, None, None, None, None], axis=3)[:, :, :, 0]
        else:
            if kv_new is None:  # a windowed cache's ring: the chunked path
                out = chunked_attention(q, kc, vc, positions, k_pos, q_slot0, window=window, scale=scale,
                                        score_scale=score_scale, softcap=c.attn_softcap, opts=attn, masses=masses,
                                        targets=targets)
            else:  # a plain cache: opts.prefill's kernel where the call has a kernel form
                out = prefill_attention(q, *kv_new, kc, vc, positions, k_pos, q_slot0, window=window,
                                        windows=windows_static, scale=scale, score_scale=score_scale,
                                        softcap=c.attn_softcap, opts=attn, masses=masses, targets=targets)
            if masses:
                out, mass = out
                cap["mass"] = mass.reshape(B, c.num_heads, -1)
            last_p = None
            if want_last_row:  # the newest query's row over all keys: O(S), never T x S
                q_last = jnp.take_along_axis(q, last_idx[:, None, None, None, None], axis=1)
                pos_last = jnp.take_along_axis(positions, last_idx[:, None], axis=1)
                _, p1 = dense_attention(q_last, kc, vc, pos_last, k_pos, window=window, scale=scale,
                                        score_scale=score_scale, softcap=c.attn_softcap)
                last_p = p1[:, :, :, 0]
        if capture.top_k > 0:
            w_top, i_top = lax.top_k(last_p.reshape(B, c.num_heads, -1), capture.top_k)
            cap["topk_index"], cap["topk_weight"] = i_top.astype(jnp.int32), w_top
        return out, cap

    def as_positions(cap, k_pos):
        """A windowed cache's capture: attended slots -> their key positions."""
        if capture.top_k > 0:
            cap = dict(cap, topk_index=jnp.take_along_axis(k_pos[:, None], cap["topk_index"], axis=2))
        return cap

    def layer_in(lp, x, kind, hm_l):
        """One layer's q [B, T, K, G, D], k, v [B, T, K, D] and its head-mask pieces: both caches'
        layer scans start here (mean_query replaces the masked heads' queries inside)."""
        head_mean = None
        if mean_mode:
            hm_l, head_mean = hm_l[:, 0], hm_l[:, 1:]                      # [H], [H, D]
        q_mean = (hm_l, head_mean) if mean_mode and mask_mode == "mean_query" else None
        q, k, v = attention_inputs(lp, c, x, *layer_rope(ropes, kind), q_mean)
        hm_kg = hm_l.reshape(K, G)
        score_scale = hm_kg if mask_mode == "uniform" else None
        return q.reshape(B, T, K, G, D), k, v, score_scale, (hm_l, hm_kg, head_mean, q_mean)

    def layer_out(lp, x, out, cap, masks):
        """The layer's residual stream after its attention output out [B, T, K, G, D], with the
        head mask applied (zero / mean_output) and head_sums captured: both caches end here."""
        hm_l, hm_kg, head_mean, q_mean = masks
        if capture.head_sums:
            cap.update(_head_sums(lp, c, x, out, valid, q_mean))
        if mean_mode and mask_mode == "mean_output":
            m = hm_kg[:, :, None]
            out = (out * m + (1 - m) * head_mean.reshape(K, G, D)).astype(out.dtype)
        if mask_mode == "zero":
            out = out * hm_kg[:, :, None].astype(out.dtype)
            if capture.span_outputs:   # what the masked head writes
                hm_h = hm_l[None, :, None]
                cap["head_out"], cap["span_out"] = cap["head_out"] * hm_h, cap["span_out"] * hm_h
        return attention_output(lp, c, x, out), cap

    def layer(carry, xs):
        x, k_all, v_all = carry
        lp, window, kind, hm_l, i = xs
        q, k, v, score_scale, masks = layer_in(lp, x, kind, hm_l)
        # write just the new rows into the carried cache (in place inside loops)
        k_all = write_rows(k_all, k, i, slots, attn.cache_writes, row)
        v_all = write_rows(v_all, v, i, slots, attn.cache_writes, row)
        out, cap = attend(q, block(k_all[i]), block(v_all[i]), new_pos, slots, window, score_scale, kv_new=(k, v))
        x, cap = layer_out(lp, x, out, cap, masks)
        return (x, k_all, v_all), cap

    x = embed(params, c, tokens)
    xs = (params["layers"], windows, rope_kind, hm, jnp.arange(c.num_layers))
    if not cache.windowed:
        (x, k_all, v_all), caps = lax.scan(layer, (x, cache.k, cache.v), xs)
        if row is None:
            new_cache = KVCache(k=k_all, v=v_all, pos=new_pos, length=cache.length + n_valid)
        else:
            new_cache = KVCache(k=k_all, v=v_all, pos=lax.dynamic_update_slice_in_dim(cache.pos, new_pos, row, 0),
                                length=lax.dynamic_update_slice_in_dim(cache.length, slots + n_valid, row, 0))
    else:
        x, new_cache, caps = _windowed_layers(c, cache, x, xs, layer_in, attend, layer_out, as_positions,
                                              positions, new_pos, n_valid, attn, capture)
    captures = Captures(topk_index=caps.get("topk_index"), topk_weight=caps.get("topk_weight"),
                        probs=caps.get("probs"), mass=caps.get("mass"), head_out=caps.get("head_out"),
                        span_out=caps.get("span_out"), span_mass=caps.get("span_mass"),
                        key_counts=caps.get("key_counts"), q_sum=caps.get("q_sum"), out_sum=caps.get("out_sum"))

    if logits == "none":
        return None, new_cache, captures
    if logits == "last":
        x = jnp.take_along_axis(x, last_idx[:, None, None], axis=1)[:, 0]
    elif logits != "all":
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    return output_logits(params, c, x), new_cache, captures
