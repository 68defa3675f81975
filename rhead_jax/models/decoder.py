"""The Llama-like decoder as a pure function of (params, inputs), declared as a Flax linen module.

One decoder covers Llama-2/3, Mistral (sliding window), Mixtral (sparse MoE), Yi (Llama), Qwen1.5/2
(q/k/v biases), Qwen3 (q/k RMSNorm), SmolLM2 (tied embeddings) and Gemma 1/2/3 ((1 + w) norms,
sandwich norms, GeGLU, scaled embeddings, soft-capping, local/global layers). Layers are stacked on
a leading axis and run with `lax.scan`, so compile time does not grow with depth.

This module declares the parameters (`Decoder`, `init_params`) and runs them (`forward`); the KV
cache and the captures are rhead_jax.models.cache's, the pieces of a layer models.layers', and the
layer scan over a windowed cache models.windowed's.

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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rhead_jax.models.attention import (NO_WINDOW, AttentionOptions, MassTargets, chunked_attention, dense_attention,
                                        mass_from_probs, prefill_attention, visible)
from rhead_jax.models.cache import CaptureSpec, Captures, KVCache, init_cache, write_rows
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.layers import (attention_inputs, attention_output, embed, layer_kinds, layer_rope, norm,
                                     output_logits, rope_tables, unembedding_rows)
from rhead_jax.models.windowed import windowed_layers

Params = Any
MASK_MODES = ("zero", "uniform", "mean_query", "mean_output")
MEAN_MODES = ("mean_query", "mean_output")   # head_mask [L, H, 1 + D]: the value, then the head's mean


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
        x, new_cache, caps = windowed_layers(c, cache, x, xs, layer_in, attend, layer_out, as_positions,
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
