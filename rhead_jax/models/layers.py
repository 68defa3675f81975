"""The pieces of one decoder layer, shared by `decoder.forward`, the mixed cache (models.mixed) and
the gated model (rhead_jax.gates): norms, the MLP (dense or MoE), the embedding, rope tables per
layer kind, attention's input and output projections, the final norm, logits and unembedding rows.
Parameter names and shapes: rhead_jax.models.decoder's docstring.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models.attention import NO_WINDOW
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.rope import apply_rope, rope_cos_sin

Params = Any


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
