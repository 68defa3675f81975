"""One attention implementation with options: GQA over a KV cache, head masking, capture.

Shapes: B batch, T new queries, S cache slots, K kv heads, G query heads per kv head (H = K*G),
D head dim. Queries are [B, T, K, G, D]; keys and values [B, K, S, D], the layout both attention
matmuls read without transposes. Query head h is (k, g) with h = k * G + g, as transformers' `repeat_kv` orders them.

Two execution paths, one semantics:
- dense: scores [B, K, G, T, S] at once. Used for single-token decode steps (T == 1) and when
  full probabilities are requested (short sequences: tests, plots).
- chunked (flash-style, online softmax): query chunks x key chunks, memory O(T * chunk) instead
  of O(T * S), visiting only the key chunks that the causal (and sliding-window) mask can reach.

Masking is by positions: key slot s is visible to a query at position p iff
`0 <= k_pos[s] <= p` and (`p - k_pos[s] < window` or `k_pos[s] < sink`). Empty or padded slots
hold position -1. `sink` (0 by default) keeps the first positions visible past the window: a
streaming head (StreamingLLM, DuoAttention) is window = recent, sink = sink.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free
NO_WINDOW = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """Static knobs of the attention kernel.

    q_chunk / k_chunk: tile sizes of the chunked path (multiples of 8 are friendliest to TPUs).
    cache_writes: how new keys and values go into the cache (decoder.write_rows; same values either
      way): "scatter" (XLA:CPU and GPU update the cache in place) or "tpu" (forms that XLA:TPU
      updates without copying the cache). The engine picks it from its devices' platform.
    """

    q_chunk: int = 512
    k_chunk: int = 512
    cache_writes: str = "scatter"


CACHE_WRITES = ("scatter", "tpu")


def cache_writes_for(platform: str) -> str:
    """The `cache_writes` of a platform ("tpu" for TPUs, "scatter" elsewhere)."""
    return "tpu" if platform == "tpu" else "scatter"


def visible(q_pos, k_pos, window, sink=0):
    """[B, Tq, Sk] bool visibility from positions [B, Tq] and [B, Sk] (see the module docstring)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    near = qp - kp < window
    if not (isinstance(sink, int) and sink == 0):
        near = near | (kp < sink)
    return (kp >= 0) & (kp <= qp) & near


def _scores(q, k, scale, score_scale):
    """Pre-mask scores [B, K, G, Tq, Sk] in fp32 from q [B, Tq, K, G, D] and k [B, K, Sk, D];
    `score_scale` [K, G] multiplies them (uniform mask)."""
    s = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if score_scale is not None:
        s = s * score_scale[None, :, :, None, None]
    return s


def dense_attention(q, k, v, q_pos, k_pos, *, window, scale, score_scale=None, sink=0):
    """Returns (out [B, T, K, G, D] in v.dtype, probs [B, K, G, T, S] fp32)."""
    s = _scores(q, k, scale, score_scale)
    s = jnp.where(visible(q_pos, k_pos, window, sink)[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v)
    return out, p


def chunked_attention(q, k, v, q_pos, k_pos, q_slot0, *, window, scale, score_scale=None,
                      opts: AttentionOptions = AttentionOptions(), sink=0):
    """Flash-style attention. q_slot0 [B]: cache slot of each row's first query.

    Slots and positions are assumed to advance together within a row (true for every cache this
    package builds), which lets the loop skip key chunks the mask hides entirely (with a sink, the
    loop starts at the first chunk).
    """
    B, T, K, G, D = q.shape
    S = k.shape[2]
    cq, ck = min(opts.q_chunk, T), min(opts.k_chunk, S)
    if S % ck:
        raise ValueError(f"cache length {S} must be a multiple of the key chunk {ck}")
    n_q = -(-T // cq)
    pad = n_q * cq - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    q = q.reshape(B, n_q, cq, K, G, D).swapaxes(0, 1)
    q_pos = q_pos.reshape(B, n_q, cq).swapaxes(0, 1)
    slot_lo, slot_hi = jnp.min(q_slot0), jnp.max(q_slot0)

    def one_q_chunk(args):
        i, qc, qpc = args
        first = slot_lo + i * cq                      # smallest query slot in this chunk
        last = slot_hi + (i + 1) * cq                 # one past the largest
        hi = jnp.minimum((last + ck - 1) // ck, S // ck)
        lo = jnp.maximum((first - window + 1) // ck, 0) if isinstance(sink, int) and sink == 0 else 0

        def body(j, carry):
            m, l, acc = carry
            kc = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=2)
            vc = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=2)
            kpc = lax.dynamic_slice_in_dim(k_pos, j * ck, ck, axis=1)
            s = _scores(qc, kc, scale, score_scale)
            s = jnp.where(visible(qpc, kpc, window, sink)[:, None, None], s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bkgts,bksd->bkgtd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((B, K, G, cq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, cq), jnp.float32),
                jnp.zeros((B, K, G, cq, D), jnp.float32))
        _, l, acc = lax.fori_loop(lo, hi, body, init)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]   # rows that saw no key stay finite
        return jnp.einsum("bkgtd->btkgd", out).astype(v.dtype)

    out = lax.map(one_q_chunk, (jnp.arange(n_q), q, q_pos))      # [n_q, B, cq, K, G, D]
    out = out.swapaxes(0, 1).reshape(B, n_q * cq, K, G, D)
    return out[:, :T]
