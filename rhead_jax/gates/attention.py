"""Full and streaming attention from one pass over the keys, differentiable in O(T) memory.

Shapes as in rhead_jax.models.attention: B batch, T queries, S keys, K kv heads, G query heads per
kv head, D head dim; queries [B, T, K, G, D], keys and values [B, K, S, D].

`full_and_streaming` returns two outputs that share every query-key score:
  - full: what the model's own attention computes (causal, the layer's sliding window if any);
  - streaming: the same query over its sink + recent keys only (StreamingLLM, DuoAttention):
    key position kp is visible to query position qp iff full-visible and (qp - kp < recent or
    kp < sink), i.e. `models.attention.visible(q_pos, k_pos, recent, sink)` within the full mask.

It is flash-style (online softmax, two accumulators) and built for reverse-mode autodiff:
  - the loops are `lax.scan`s with static trip counts (query chunks outside, key chunks inside),
    so they differentiate; a key chunk that no query of the chunk can see is skipped by a
    `lax.cond` (the causal upper triangle: about half of the work), and the streaming
    accumulator's update is skipped for chunks outside every sink and recent window;
  - `jax.checkpoint` on the body of each query chunk and of each key chunk: the backward pass
    recomputes a chunk's scores instead of storing them, so it never holds a T x T array, nor a
    T x chunk one per query chunk.

Peak memory of forward + backward (4-byte floats, cq = ck = chunk, H = K * G query heads):
  inputs and their cotangents        ~ 2 * (T*H*D + 2*T*K*D)       q, k, v and dq, dk, dv
  per-query-chunk residuals          ~ T * H * D                   the saved query chunks
  one query chunk's key-loop carries ~ (S/ck) * 2 * cq * H * (D+2) (m, l, acc of both softmaxes)
  one key chunk's recomputed scores  ~ a few * cq * ck * H
all linear in T (S = T in training) for a fixed chunk; dense attention holds T * T * H * 4 bytes
of probabilities (times two here: full and streaming) for the backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rhead_jax.models.attention import NEG_INF, NO_WINDOW, visible


def _pad_axis(x, axis: int, multiple: int, value=0):
    n = x.shape[axis]
    pad = -n % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _update(carry, s, vis, vc):
    """One online-softmax step: carry (m, l, acc) [B,K,G,cq] x2 and [B,K,G,cq,D], scores s
    [B,K,G,cq,ck] fp32, visibility vis [B,1,1,cq,ck], values vc [B,K,ck,D]."""
    m, l, acc = carry
    s = jnp.where(vis, s, NEG_INF)
    # the output does not depend on m (it cancels), so its gradient is zero: stop it, save the work
    m_new = lax.stop_gradient(jnp.maximum(m, s.max(-1)))
    corr = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
    l = l * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(vc.dtype), vc,
                                            preferred_element_type=jnp.float32)
    return m_new, l, acc


def _finish(carry):
    _, l, acc = carry
    return acc / jnp.where(l == 0, 1.0, l)[..., None]   # a query that saw no key stays finite (0)


def full_and_streaming(q, k, v, q_pos, k_pos, *, scale: float, sink: int, recent: int,
                       window=NO_WINDOW, chunk: int = 256):
    """(full, streaming) attention outputs, each [B, T, K, G, D] fp32.

    q [B, T, K, G, D]; k, v [B, K, S, D]; q_pos [B, T], k_pos [B, S] int positions (-1: padding);
    window: the layer's sliding window (NO_WINDOW: none; may be a traced scalar); sink, recent:
    the streaming heads' sink and recent window (static ints); chunk: query and key tile.
    """
    B, T, K, G, D = q.shape
    cq = ck = chunk
    q = _pad_axis(q, 1, cq)
    q_pos = _pad_axis(q_pos, 1, cq, -1)
    k, v = _pad_axis(k, 2, ck), _pad_axis(v, 2, ck)
    k_pos = _pad_axis(k_pos, 1, ck, -1)
    n_q, n_k = q.shape[1] // cq, k.shape[2] // ck
    q_chunks = q.reshape(B, n_q, cq, K, G, D).swapaxes(0, 1)          # [n_q, B, cq, K, G, D]
    qpos_chunks = q_pos.reshape(B, n_q, cq).swapaxes(0, 1)            # [n_q, B, cq]

    def init():
        return (jnp.full((B, K, G, cq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, cq), jnp.float32),
                jnp.zeros((B, K, G, cq, D), jnp.float32))

    @jax.checkpoint
    def one_q_chunk(k, v, qc, qpc):
        @jax.checkpoint
        def key_chunk(carry, j):
            kc = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=2)
            vc = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=2)
            kpc = lax.dynamic_slice_in_dim(k_pos, j * ck, ck, axis=1)
            vis_full = visible(qpc, kpc, window)                                   # [B, cq, ck]
            vis_stream = vis_full & visible(qpc, kpc, recent, sink)

            def compute(carry):
                full, stream = carry
                s = jnp.einsum("btkgd,bksd->bkgts", qc, kc, preferred_element_type=jnp.float32) * scale
                full = _update(full, s, vis_full[:, None, None], vc)
                stream = lax.cond(vis_stream.any(),
                                  lambda st: _update(st, s, vis_stream[:, None, None], vc),
                                  lambda st: st, stream)
                return full, stream

            return lax.cond(vis_full.any(), compute, lambda c: c, carry), None

        (full, stream), _ = lax.scan(key_chunk, (init(), init()), jnp.arange(n_k))
        return _finish(full), _finish(stream)                                     # [B, K, G, cq, D]

    def body(_, xs):
        qc, qpc = xs
        return None, one_q_chunk(k, v, qc, qpc)

    _, (full, stream) = lax.scan(body, None, (q_chunks, qpos_chunks))            # [n_q, B, K, G, cq, D]

    def back(o):
        return jnp.einsum("nbkgtd->bntkgd", o).reshape(B, n_q * cq, K, G, D)[:, :T]

    return back(full), back(stream)


def dense_full_and_streaming(q, k, v, q_pos, k_pos, *, scale: float, sink: int, recent: int,
                             window=NO_WINDOW):
    """The dense reference of `full_and_streaming` (T x S scores; tests and short sequences)."""
    s = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    vis_full = visible(q_pos, k_pos, window)
    vis_stream = vis_full & visible(q_pos, k_pos, recent, sink)

    def attend(vis):
        p = jax.nn.softmax(jnp.where(vis[:, None, None], s, NEG_INF), axis=-1)
        p = jnp.where(vis[:, None, None], p, 0.0)
        return jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    return attend(vis_full), attend(vis_stream)
