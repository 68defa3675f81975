"""The gated decoder: every KV head mixes its full and its streaming attention by a gate alpha.

    out[b, t, k, g] = alpha[l, k] * full[b, t, k, g] + (1 - alpha[l, k]) * streaming[b, t, k, g]

before o_proj, in every layer l (the G query heads of KV head k share its gate), as DuoAttention
trains it (arXiv 2410.10819, Sec. 3.1; `llama_duo_attention_forward_two_way` in their
duo_attn/patch/llama.py). alpha = 1 is the model itself; alpha = 0 makes the head a streaming
head (sink + recent keys only).

Both forwards are built from the decoder's own pieces (`embed`, `attention_inputs`,
`attention_output`, `final_hidden`) and scan over the stacked layers like `decoder.forward`:
  - `gated_hidden`: differentiable in the gates in O(T) memory: each layer is `jax.checkpoint`ed
    (the backward keeps one [B, T, d] input per layer and recomputes the layer) and attention is
    `gates.attention.full_and_streaming` (chunked, both outputs from shared scores);
  - `full_hidden`: the model's final hidden states (the distillation target), with the decoder's
    own chunked attention (no gradient needed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rhead_jax.gates.attention import full_and_streaming
from rhead_jax.models.attention import NO_WINDOW, AttentionOptions, chunked_attention
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.layers import attention_inputs, attention_output, embed, final_hidden
from rhead_jax.models.rope import rope_cos_sin


def layer_windows(cfg: ModelConfig):
    """[L] int32 sliding window per layer (NO_WINDOW: full causal attention)."""
    return jnp.asarray([w or NO_WINDOW for w in (cfg.sliding_window or (None,) * cfg.num_layers)], jnp.int32)


def _layers(params, cfg: ModelConfig, tokens, positions, attend, extra, *, remat: bool):
    """Scan the layers; attend(q [B,T,K,G,D], k, v [B,K,T,D], window, extra_l) -> [B,T,K,G,D]."""
    B, T = tokens.shape
    K, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    if cfg.local_rope is not None or cfg.attn_softcap is not None or cfg.attn_scale != D ** -0.5:
        raise ValueError("the gates do not implement Gemma 2/3's attention (per-kind rope, soft-cap, "
                         "query_pre_attn_scalar)")
    cos, sin = rope_cos_sin(cfg, positions)

    def layer(x, xs):
        lp, window, e = xs
        q, k, v = attention_inputs(lp, cfg, x, cos, sin)
        out = attend(q.reshape(B, T, K, G, D), k.swapaxes(1, 2), v.swapaxes(1, 2), window, e)
        return attention_output(lp, cfg, x, out), None

    if remat:
        layer = jax.checkpoint(layer)
    x, _ = lax.scan(layer, embed(params, cfg, tokens), (params["layers"], layer_windows(cfg), extra))
    return final_hidden(params, cfg, x)


def gated_hidden(params, cfg: ModelConfig, tokens, positions, gates, *, sink: int, recent: int,
                 chunk: int = 256):
    """Final hidden states [B, T, d] (after the final norm) of the model whose KV heads mix full
    and streaming attention by `gates` [L, K] (fp32).

    tokens, positions [B, T] (padding at the end of a row, position -1)."""
    scale = cfg.head_dim ** -0.5

    def attend(q, k, v, window, alpha):
        full, stream = full_and_streaming(q, k, v, positions, positions, scale=scale, sink=sink, recent=recent,
                                          window=window, chunk=chunk)
        a = alpha.astype(jnp.float32)[None, None, :, None, None]
        return a * full + (1 - a) * stream

    return _layers(params, cfg, tokens, positions, attend, jnp.asarray(gates, jnp.float32), remat=True)


def full_hidden(params, cfg: ModelConfig, tokens, positions, *, chunk: int = 256):
    """The model's own final hidden states [B, T, d], with the decoder's chunked attention."""
    B, T = tokens.shape
    scale = cfg.head_dim ** -0.5
    opts = AttentionOptions(q_chunk=chunk, k_chunk=chunk)
    pad = -T % min(chunk, T)
    k_pos = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)

    def attend(q, k, v, window, _):
        k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k, v))
        return chunked_attention(q, k, v, positions, k_pos, jnp.zeros((B,), jnp.int32), window=window,
                                 scale=scale, opts=opts)

    return _layers(params, cfg, tokens, positions, attend, jnp.zeros((cfg.num_layers,)), remat=False)
