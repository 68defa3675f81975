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

Attention MASS (opt-in, `masses`): for named key sets ("targets", defined by positions, see
`target_mask`), the probability each query puts on the target's keys, summed over the queries of
a chosen position range: [B, K, G, M] for M targets. The dense path reads it off the
probabilities (`mass_from_probs`); the chunked path accumulates it inside its online-softmax loop
(a numerator per target, rescaled like the output, divided by the softmax denominator at the
end), so it never holds more than one (query chunk x key chunk) tile.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models import kernels

NEG_INF = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free
NO_WINDOW = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """Static knobs of the attention kernel.

    q_chunk / k_chunk: tile sizes of the chunked path (multiples of 8 are friendliest to TPUs).
    cache_writes: how new keys and values go into the cache (cache.write_rows; same values either
      way): "scatter" (XLA:CPU and GPU update the cache in place) or "tpu" (forms that XLA:TPU
      updates without copying the cache).
    decode_scores: a decode step's scores (`dense_attention`): "cache_left" (`_decode_scores`, 1.6x
      faster on XLA:CPU) or "query_left" (`_scores`; XLA:TPU answers the other's merged batch and
      KV-head axes with copies of the cache: decode temp 3.5 GiB instead of 0.3 for Yi-34B at 200K
      on v5p-16). The two agree up to rounding (tests/test_models.py).
    prefill: a prefill call's attention (`prefill_attention`): "chunked" (`chunked_attention`), or
      a kernel of JAX's (models.kernels): "splash" (Pallas splash attention, TPU), "cudnn"
      (`jax.nn.dot_product_attention`, cuDNN flash attention, GPU). interpret: run the kernel off
      its hardware (Pallas interpret mode / the XLA implementation of the same call; tests).
    cache_multiple: KV cache slots are rounded up to a multiple of this (models.generate.cache_slots);
      0: of k_chunk. A smaller multiple (XLA:CPU: 64) holds and reads fewer empty slots (the decode
      step reads every slot); the chunked path then reads the last key tile padded with empty
      slots, the same tiles as in a cache of whole tiles.
    The engine takes them from its devices' platform (`for_platform`).
    """

    q_chunk: int = 512
    k_chunk: int = 512
    cache_multiple: int = 0
    cache_writes: str = "scatter"
    decode_scores: str = "cache_left"
    prefill: str = "chunked"
    interpret: bool = False

    @classmethod
    def for_platform(cls, platform: str, kernel: str = "auto", **tiles) -> "AttentionOptions":
        """The forms a platform's compiler handles best ("tpu" forms on TPUs, the defaults elsewhere)
        and its prefill kernel (config.sweep.attention): "auto" = splash on TPU, cuDNN on GPU, chunked
        on CPU; a kernel named for other hardware is refused (ValueError), unless given as
        "splash:interpret" / "cudnn:xla" (any platform: the kernel's reference form, slow)."""
        name, _, form = kernel.partition(":")
        auto = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "chunked")
        name = auto if name == "auto" else name
        native = {"splash": "tpu", "cudnn": "gpu"}
        if name not in PREFILL_KERNELS or (form and form != {"splash": "interpret", "cudnn": "xla"}.get(name)):
            raise ValueError(f"unknown attention kernel {kernel!r}; known: auto, chunked, splash, cudnn, "
                             "splash:interpret, cudnn:xla")
        if name in native and not form and native[name] != platform:
            raise ValueError(f"attention kernel {name!r} runs on {native[name]}, these devices are {platform}; "
                             f"use auto, chunked or {name}:{'interpret' if name == 'splash' else 'xla'}")
        tpu = dict(cache_writes="tpu", decode_scores="query_left") if platform == "tpu" else {}
        cpu = dict(cache_multiple=CPU_CACHE_MULTIPLE) if platform == "cpu" and name == "chunked" else {}
        return cls(prefill=name, interpret=bool(form), **tpu, **cpu, **tiles)


# XLA:CPU's KV cache slots come in multiples of 64, not of the key tile (512): the SmolLM2 sweep's
# 2K-token rows hold 2,176 slots instead of 2,560 (15% less KV memory, and fewer slots for every decode
# step to read); head_scores.json unchanged. Other platforms keep whole tiles (their kernels' shapes).
CPU_CACHE_MULTIPLE = 64


PREFILL_KERNELS = ("chunked", "splash", "cudnn")


CACHE_WRITES = ("scatter", "tpu")


def visible(q_pos, k_pos, window, sink=0):
    """[B, Tq, Sk] bool visibility from positions [B, Tq] and [B, Sk] (see the module docstring)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    near = qp - kp < window
    if not (isinstance(sink, int) and sink == 0):
        near = near | (kp < sink)
    return (kp >= 0) & (kp <= qp) & near


# ----------------------------------------------------------------------------- attention mass

MASS_TARGETS = ("span", "previous", "duplicate", "induction")
ALL_QUERIES = (0, 2**30)


@flax.struct.dataclass
class MassTargets:
    """Per-row arguments of the mass targets (int32, positions; one row per batch row).

    span [B, 2]: "span" = keys with span[0] <= k_pos < span[1] (half-open).
    queries [B, M, 2]: target m sums the queries with queries[m, 0] <= q_pos < queries[m, 1].
    period, start [B]: a row that repeats a block of `period` distinct tokens from position
      `start` on ("duplicate", "induction"; see `target_mask`).
    """

    span: jax.Array
    queries: jax.Array
    period: jax.Array
    start: jax.Array


def mass_targets(batch: int, num_masses: int, *, span=None, queries=None, period=None, start=None) -> MassTargets:
    """Host-side (numpy) MassTargets for `batch` rows and `num_masses` targets; unset fields are
    neutral (empty span, every query, period 1, start 0). `queries` may be [2] or [B, 2] (one range
    for every target) or [B, M, 2]."""
    def rows(x, shape, fill):
        return np.broadcast_to(np.asarray(fill if x is None else x, np.int32), shape).copy()

    q = np.asarray(ALL_QUERIES if queries is None else queries, np.int32)
    q = q[:, None] if q.ndim == 2 else q
    return MassTargets(span=rows(span, (batch, 2), 0), queries=rows(q, (batch, num_masses, 2), 0),
                       period=rows(period, (batch,), 1), start=rows(start, (batch,), 0))


def target_mask(name: str, q_pos, k_pos, t: MassTargets):
    """[B, Tq, Sk] bool: the keys of target `name` for queries at q_pos [B, Tq] (k_pos [B, Sk]).

    "span":      span[0] <= k < span[1]
    "previous":  k == q - 1
    "duplicate": the earlier occurrences of the query's token in a row that repeats a block of
                 `period` distinct tokens from `start`: start <= k < q and (q - k) % period == 0
    "induction": the token AFTER each earlier occurrence of the query's token:
                 k = q - j * period + 1 for j >= 1, i.e. (q - k + 1) % period == 0,
                 q - k + 1 >= period, and k - 1 >= start
    For tokens x at positions start + i (x[start + i] = block[i % period]) these are exactly
    TransformerLens' detection patterns (transformer_lens/head_detector.py): duplicate = earlier
    keys with the same token; induction = the duplicate pattern shifted one key to the right,
    k <= q; previous = the first sub-diagonal. Keys before `start` (BOS) are never duplicates of a
    repeated token, as no repeated token equals the BOS.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    if name == "span":
        return (k >= t.span[:, None, None, 0]) & (k < t.span[:, None, None, 1])
    if name == "previous":
        return k == q - 1
    period, start = t.period[:, None, None], t.start[:, None, None]
    if name == "duplicate":
        return (k >= start) & (k < q) & ((q - k) % period == 0)
    if name == "induction":
        d = q - k + 1
        return (k >= start + 1) & (d >= period) & (d % period == 0)
    raise ValueError(f"unknown mass target {name!r}; known: {MASS_TARGETS}")


def _query_weights(q_pos, t: MassTargets):
    """[B, T, M] float: 1 for the queries each target sums (padding queries, position -1, never)."""
    q = q_pos[:, :, None]
    lo, hi = t.queries[:, None, :, 0], t.queries[:, None, :, 1]
    return ((q >= 0) & (q >= lo) & (q < hi)).astype(jnp.float32)


def _target_sums(p, q_pos, k_pos, vis, masses, t: MassTargets):
    """sum_s p[..., t, s] * target_m(t, s) for each target: p [B, K, G, T, S] -> [B, K, G, T, M]."""
    return jnp.stack([jnp.einsum("bkgts,bts->bkgt", p, (target_mask(m, q_pos, k_pos, t) & vis).astype(p.dtype))
                      for m in masses], axis=-1)


def mass_from_probs(p, q_pos, k_pos, masses: tuple[str, ...], t: MassTargets):
    """Attention mass from full probabilities p [B, K, G, T, S]: [B, K, G, M], each target's mass
    summed over the queries in its range. The definition the chunked path must reproduce."""
    vis = (k_pos[:, None, :] >= 0) & (q_pos[:, :, None] >= 0)
    per_query = _target_sums(p.astype(jnp.float32), q_pos, k_pos, vis, masses, t)
    return jnp.einsum("bkgtm,btm->bkgm", per_query, _query_weights(q_pos, t))


def _scores(q, k, scale, score_scale, softcap=None):
    """Pre-mask scores [B, K, G, Tq, Sk] in fp32 from q [B, K, G, Tq, D] and k [B, K, Sk, D];
    `score_scale` [K, G] multiplies them (uniform mask) after the soft-cap (Gemma 2).

    Both attention matmuls take and give the head-major layout [B, K, G, T, .]: the query-major
    [B, T, K, G, D] in an operand or a result costs XLA:CPU a transpose per tile, which made the
    chunked prefill 1.9x and a decode step's attention 1.6x slower (benchmarks/kernels.py)."""
    return _scaled(jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32), scale, score_scale,
                   softcap)


def _scaled(s, scale, score_scale, softcap=None):
    """Scores [B, K, G, T, S] times the softmax scale, soft-capped (softcap * tanh(s / softcap), as
    transformers' Gemma 2), times the uniform mask's [K, G] factors."""
    s = s * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    if score_scale is not None:
        s = s * score_scale[None, :, :, None, None]
    return s


def _decode_scores(q, k, scale, score_scale, softcap=None):
    """`_scores` for one query per row (a decode step), q [B, 1, K, G, D]: the cache as the left
    operand of one [B*K]-batched matmul, [S, D] x [D, G]. XLA:CPU reads the cache 1.6x faster
    this way than with the query on the left (benchmarks/kernels.py, decode); the sums run in
    another order, so scores may differ from `_scores` in the last bit."""
    B, _, K, G, D = q.shape
    S = k.shape[2]
    s = lax.dot_general(k.reshape(B * K, S, D), q.reshape(B * K, G, D), (((2,), (2,)), ((0,), (0,))),
                        preferred_element_type=jnp.float32)                       # [B*K, S, G]
    return _scaled(jnp.einsum("bksg->bkgs", s.reshape(B, K, S, G))[:, :, :, None], scale, score_scale, softcap)


def dense_attention(q, k, v, q_pos, k_pos, *, window, scale, score_scale=None, sink=0, cache_left: bool = True,
                    softcap=None):
    """Returns (out [B, T, K, G, D] in v.dtype, probs [B, K, G, T, S] fp32); masses: `mass_from_probs`.
    cache_left: a single query's scores by `_decode_scores` (AttentionOptions.decode_scores).
    softcap: the scores' tanh soft-cap (ModelConfig.attn_softcap; None: none)."""
    if q.shape[1] == 1 and cache_left:
        s = _decode_scores(q, k, scale, score_scale, softcap)
    else:
        s = _scores(jnp.einsum("btkgd->bkgtd", q), k, scale, score_scale, softcap)
    s = jnp.where(visible(q_pos, k_pos, window, sink)[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)
    if q.shape[1] == 1:  # the same bytes: a reshape, which XLA cannot answer by transposing o_proj's weight
        return out.reshape(q.shape), p
    return jnp.einsum("bkgtd->btkgd", out), p


def chunked_attention(q, k, v, q_pos, k_pos, q_slot0, *, window, scale, score_scale=None,
                      opts: AttentionOptions = AttentionOptions(), sink=0, masses: tuple[str, ...] = (),
                      targets: MassTargets | None = None, softcap=None):
    """Flash-style attention. q_slot0 [B]: cache slot of each row's first query.

    Slots and positions are assumed to advance together within a row (true for every cache this
    package builds), which lets the loop skip key chunks the mask hides entirely (with a sink, the
    loop starts at the first chunk).

    Returns out [B, T, K, G, D]; with `masses` (target names, see `target_mask`) also their mass
    [B, K, G, M] (`mass_from_probs` of the same probabilities), accumulated per tile: for each
    target a numerator num = num * corr + sum_s p * target, and mass = num / l per query.
    """
    B, T, K, G, D = q.shape
    S = k.shape[2]
    cq, ck = min(opts.q_chunk, T), min(opts.k_chunk, S)
    if S % ck:   # a cache of AttentionOptions.cache_multiple slots: the last tile padded with empty slots
        extra = ck - S % ck
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, extra)), constant_values=-1)
        S += extra
    n_q = -(-T // cq)
    pad = n_q * cq - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    q = jnp.einsum("bitkgd->ibkgtd", q.reshape(B, n_q, cq, K, G, D))   # [n_q, B, K, G, cq, D], once
    q_pos = q_pos.reshape(B, n_q, cq).swapaxes(0, 1)
    slot_lo, slot_hi = jnp.min(q_slot0), jnp.max(q_slot0)
    M = len(masses)

    def one_q_chunk(args):
        i, qc, qpc = args
        first = slot_lo + i * cq                      # smallest query slot in this chunk
        last = slot_hi + (i + 1) * cq                 # one past the largest
        hi = jnp.minimum((last + ck - 1) // ck, S // ck)
        lo = jnp.maximum((first - window + 1) // ck, 0) if isinstance(sink, int) and sink == 0 else 0

        def body(j, carry):
            m, l, acc = carry[:3]
            kc = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=2)
            vc = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=2)
            kpc = lax.dynamic_slice_in_dim(k_pos, j * ck, ck, axis=1)
            s = _scores(qc, kc, scale, score_scale, softcap)
            vis = visible(qpc, kpc, window, sink)
            s = jnp.where(vis[:, None, None], s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bkgts,bksd->bkgtd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
            if not M:
                return m_new, l, acc
            num = carry[3] * corr[..., None] + _target_sums(p, qpc, kpc, vis, masses, targets)
            return m_new, l, acc, num

        init = (jnp.full((B, K, G, cq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, cq), jnp.float32),
                jnp.zeros((B, K, G, cq, D), jnp.float32))
        if M:
            init += (jnp.zeros((B, K, G, cq, M), jnp.float32),)
        res = lax.fori_loop(lo, hi, body, init)
        l, acc = res[1], res[2]
        l_safe = jnp.where(l == 0, 1.0, l)                  # rows that saw no key stay finite
        out = (acc / l_safe[..., None]).astype(v.dtype)                  # [B, K, G, cq, D]
        if not M:
            return out
        mass = jnp.einsum("bkgtm,btm->bkgm", res[3] / l_safe[..., None], _query_weights(qpc, targets))
        return out, mass

    res = lax.map(one_q_chunk, (jnp.arange(n_q), q, q_pos))      # [n_q, B, K, G, cq, D] (, [n_q, B, K, G, M])
    out = res[0] if M else res
    out = jnp.einsum("ibkgtd->bitkgd", out).reshape(B, n_q * cq, K, G, D)[:, :T]
    return (out, res[1].sum(0)) if M else out


def prefill_attention(q, k_new, v_new, k, v, q_pos, k_pos, q_slot0, *, window, windows: tuple[int, ...], scale,
                      score_scale=None, opts: AttentionOptions = AttentionOptions(), sink=0,
                      masses: tuple[str, ...] = (), targets: MassTargets | None = None, softcap=None):
    """A prefill call's attention: `chunked_attention` of q on the cache k, v (which holds the call's
    own keys k_new, v_new [B, T, K, D] at q_slot0), or opts.prefill's kernel (models.kernels) where
    the call has a kernel form (else chunked, logged once). windows: the static windows `window`
    (traced) takes, NO_WINDOW for none."""
    if opts.prefill != "chunked":
        why = kernels.kernel_form(opts.prefill, kv_heads=k.shape[1], cache_size=k.shape[2], windows=windows,
                                  masses=masses, sink=sink, dtype=q.dtype)
        if why is None:
            return kernels.prefill_attention(q, k_new, v_new, k, v, q_pos, k_pos, q_slot0, window=window,
                                             windows=windows, scale=scale, kernel=opts.prefill,
                                             score_scale=score_scale, softcap=softcap, interpret=opts.interpret,
                                             masses=masses, targets=targets)
        kernels.log_once(f"{opts.prefill} prefill runs chunked: {why}")
    return chunked_attention(q, k, v, q_pos, k_pos, q_slot0, window=window, scale=scale, score_scale=score_scale,
                             opts=opts, sink=sink, masses=masses, targets=targets, softcap=softcap)
