"""The Llama-like decoder as a pure function of (params, inputs), declared as a Flax linen module.

One decoder covers Llama-2/3, Mistral (sliding window), Mixtral (sparse MoE), Yi (Llama), Qwen1.5/2
(q/k/v biases), Qwen3 (q/k RMSNorm) and SmolLM2 (tied embeddings). Layers are stacked on a leading
axis and run with `lax.scan`, so compile time does not grow with depth.

Parameter tree (L layers, d model, f MLP, H/K query/kv heads, D head dim, E experts, V vocab):

    embed            [V, d]
    layers/attn_norm [L, d]        layers/mlp_norm [L, d]
    layers/q         [L, d, H, D]  layers/q_bias [L, H, D]   (qkv_bias)
    layers/k, v      [L, d, K, D]  layers/k_bias, v_bias [L, K, D]
    layers/o         [L, H, D, d]  layers/o_bias [L, d]      (o_bias)
    layers/q_norm, k_norm [L, D]                             (qk_norm)
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
from jax import lax

from rhead_jax.models.attention import (MASS_TARGETS, NO_WINDOW, AttentionOptions, MassTargets,
                                        chunked_attention, dense_attention, mass_from_probs, visible)
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
    """Static-shape KV cache.

    k, v: [L, B, K, S, D] (the layout attention reads without copies). pos: [B, S] int32 position held in each slot (-1: empty/padding).
    length: [B] int32, the next slot each row writes to.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array

    @property
    def size(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: ModelConfig, batch: int, size: int, *, dtype=None) -> KVCache:
    dtype = dtype or jnp.dtype(cfg.dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full((batch, size), -1, jnp.int32), length=jnp.zeros((batch,), jnp.int32))


def write_rows(buf, new, i, slots, mode: str = "tpu"):
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
    """
    B, T = new.shape[:2]
    S = buf.shape[3]
    new = new.astype(buf.dtype).swapaxes(1, 2)                   # [B, K, T, D]

    def scatter():  # [i, b, :, slot, :] <- [B, T, K, D] (advanced indices first, as numpy orders them)
        at = slots[:, None] + jnp.arange(T)[None]
        return buf.at[i, jnp.arange(B)[:, None], :, at].set(new.swapaxes(1, 2), mode="drop")

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


def rms_norm(x, weight, eps):
    """transformers' RMSNorm: normalize in fp32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _mlp(lp, h, cfg: ModelConfig):
    if not cfg.is_moe:
        g = jnp.einsum("btd,df->btf", h, lp["gate"])
        u = jnp.einsum("btd,df->btf", h, lp["up"])
        if cfg.mlp_bias:
            g, u = g + lp["gate_bias"], u + lp["up_bias"]
        y = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, lp["down"])
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
    y = jnp.einsum("btef,efd->bted", jax.nn.silu(g) * u, lp["down"])
    return jnp.einsum("bted,bte->btd", y.astype(jnp.float32), weights).astype(h.dtype)


def embed(params: Params, cfg: ModelConfig, tokens):
    """Token embeddings [B, T, d] in the model's dtype."""
    return params["embed"][tokens].astype(jnp.dtype(cfg.dtype))


def attention_inputs(lp, cfg: ModelConfig, x, cos, sin, q_mean=None):
    """One layer's (q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]) from its input x [B, T, d], with
    RoPE applied (lp: that layer's slice of params["layers"]). q_mean: (m [H], mean [H, D]) or None:
    the "mean_query" mask, q_proj's output q <- m q + (1 - m) mean before q-norm and RoPE."""
    c = cfg
    h = rms_norm(x, lp["attn_norm"], c.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, lp["q"])
    k = jnp.einsum("btd,dnk->btnk", h, lp["k"])
    v = jnp.einsum("btd,dnk->btnk", h, lp["v"])
    if c.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if q_mean is not None:
        m, mean = q_mean
        q = (q * m[:, None] + (1 - m[:, None]) * mean).astype(q.dtype)
    if c.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], c.rms_norm_eps), rms_norm(k, lp["k_norm"], c.rms_norm_eps)
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
    x = x + o
    return x + _mlp(lp, rms_norm(x, lp["mlp_norm"], c.rms_norm_eps), c)


def final_hidden(params: Params, cfg: ModelConfig, x):
    """The final RMSNorm of the last layer's output (what the LM head reads)."""
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def output_logits(params: Params, cfg: ModelConfig, x):
    """fp32 logits [..., V] from the last layer's output x [..., d]."""
    x = final_hidden(params, cfg, x)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32)


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
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
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
            targets: MassTargets | None = None, output_span=None):
    """Run the decoder on new tokens, appending them to the cache.

    Args:
      tokens, positions: [B, T] int. Padding goes at the END of a row, with position -1.
      cache: KVCache; row b writes its tokens at slots cache.length[b] + t. None: a fresh cache
        just large enough for `tokens` (a plain forward pass).
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
    scale = D ** -0.5
    slots = cache.length
    valid = positions >= 0
    n_valid = valid.sum(-1).astype(jnp.int32)
    new_pos = cache.pos.at[jnp.arange(B)[:, None], slots[:, None] + jnp.arange(T)[None]].set(
        jnp.where(valid, positions, -1).astype(jnp.int32), mode="drop")
    cos, sin = rope_cos_sin(c, positions)
    windows = jnp.asarray([w or NO_WINDOW for w in (c.sliding_window or (None,) * c.num_layers)], jnp.int32)
    mean_mode = mask_mode in MEAN_MODES and head_mask is not None
    hm = (jnp.ones((c.num_layers, c.num_heads), jnp.float32) if head_mask is None
          else jnp.asarray(head_mask, jnp.float32))
    want_last_row = capture.top_k > 0 and not capture.full_probs
    last_idx = jnp.maximum(n_valid - 1, 0)

    def layer(carry, xs):
        x, k_all, v_all = carry
        lp, window, hm_l, i = xs
        if mean_mode:
            hm_l, head_mean = hm_l[:, 0], hm_l[:, 1:]                      # [H], [H, D]
        q_mean = (hm_l, head_mean) if mean_mode and mask_mode == "mean_query" else None
        q, k, v = attention_inputs(lp, c, x, cos, sin, q_mean)
        # write just the new rows into the carried cache (in place inside loops)
        k_all = write_rows(k_all, k, i, slots, attn.cache_writes)
        v_all = write_rows(v_all, v, i, slots, attn.cache_writes)
        kc, vc = k_all[i], v_all[i]
        q = q.reshape(B, T, K, G, D)
        hm_kg = hm_l.reshape(K, G)
        score_scale = hm_kg if mask_mode == "uniform" else None
        cap = {}
        if T == 1 or capture.full_probs:
            out, p = dense_attention(q, kc, vc, positions, new_pos, window=window, scale=scale,
                                     score_scale=score_scale, cache_left=attn.decode_scores == "cache_left")
            if capture.full_probs:
                cap["probs"] = p.reshape(B, c.num_heads, T, -1)
            if masses:
                cap["mass"] = mass_from_probs(p, positions, new_pos, masses, targets).reshape(B, c.num_heads, -1)
            if capture.span_outputs:
                cap.update(_span_outputs(p, vc, new_pos, positions, window, output_span, c.num_heads))
            last_p = jnp.take_along_axis(p, last_idx[:, None, None, None, None], axis=3)[:, :, :, 0]
        else:
            out = chunked_attention(q, kc, vc, positions, new_pos, slots, window=window, scale=scale,
                                    score_scale=score_scale, opts=attn, masses=masses, targets=targets)
            if masses:
                out, mass = out
                cap["mass"] = mass.reshape(B, c.num_heads, -1)
            last_p = None
            if want_last_row:  # the newest query's row over all keys: O(S), never T x S
                q_last = jnp.take_along_axis(q, last_idx[:, None, None, None, None], axis=1)
                pos_last = jnp.take_along_axis(positions, last_idx[:, None], axis=1)
                _, p1 = dense_attention(q_last, kc, vc, pos_last, new_pos, window=window, scale=scale,
                                        score_scale=score_scale)
                last_p = p1[:, :, :, 0]
        if capture.top_k > 0:
            w_top, i_top = lax.top_k(last_p.reshape(B, c.num_heads, -1), capture.top_k)
            cap["topk_index"], cap["topk_weight"] = i_top.astype(jnp.int32), w_top
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
        return (attention_output(lp, c, x, out), k_all, v_all), cap

    x = embed(params, c, tokens)
    xs = (params["layers"], windows, hm, jnp.arange(c.num_layers))
    (x, k_all, v_all), caps = lax.scan(layer, (x, cache.k, cache.v), xs)
    new_cache = KVCache(k=k_all, v=v_all, pos=new_pos, length=cache.length + n_valid)
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
