"""Greedy generation as one jitted program: chunked prefill, then a `lax.while_loop` of decode steps
that captures, at every step, each head's top-k attended cache slots for the newest query.

Protocol (the original's, ORIGINAL.md §4): prefill every prompt token but the last; each decode
step feeds one token (first the last prompt token, then each generated one), takes the argmax of
the logits as the next token and records the attention of that step's query.

Attention mass (opt-in, GenerateSpec.prefill_masses / decode_masses, targets given per row as a
models.attention.MassTargets): the prefill sums each target's mass over the queries in its range;
the decode loop sums, per row, the newest query's mass over the steps that produced a token.

Logit contributions (opt-in, GenerateSpec.decode_outputs, a span [B, 2] per row): at every decode
step, per head, LOCOS's logit-contribution terms of the token the step generated
(decoder.head_logit_contributions), from the head's output and its part from the span's keys.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models.attention import AttentionOptions, MassTargets
from rhead_jax.models.cache import CaptureSpec, KVCache, init_cache
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import check_head_mask, forward, head_logit_contributions


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateSpec:
    """Static settings of a generation call.

    max_new_tokens: decode-step cap (the original: 50).
    stop_tokens: ids that end a row after the step that produced them (newline, EOS).
    leading_stop_tokens: those of stop_tokens that do not end a row before it produced a token
      outside them (rhead_jax.plan.ends_test: default mode's newlines before the answer).
    top_k: attended slots captured per head and step (0: no capture; scoring needs 1).
    mask_mode: decoder.MASK_MODES, for both head masks (see decoder.forward).
    prefill_chunk: tokens per prefill call; bounds activation memory at long contexts.
    attn: attention tile sizes.
    prefill_masses / decode_masses: attention-mass targets (cache.CaptureSpec.masses) reduced
      during the prefill / at every decode step; () = none, and the programs are those without.
    decode_outputs: each decode step's logit-contribution terms (Generation.logit_terms); the
      decode loop then takes the rows' output spans.
    """

    max_new_tokens: int = 50
    stop_tokens: tuple[int, ...] = ()
    leading_stop_tokens: tuple[int, ...] = ()
    top_k: int = 1
    mask_mode: str = "zero"
    prefill_chunk: int = 2048
    attn: AttentionOptions = AttentionOptions()
    prefill_masses: tuple[str, ...] = ()
    decode_masses: tuple[str, ...] = ()
    decode_outputs: bool = False


@flax.struct.dataclass
class Generation:
    """tokens [B, N] (-1 after a row stopped); num_tokens [B];
    topk_index / topk_weight [B, N, L, H, k]: cache slots (= prompt indices for slots < prompt
    length) and weights of each head's most-attended keys at each step (-1 / 0 after stop);
    mass [B, L, H, M]: GenerateSpec.decode_masses summed over the steps that produced a token
    (divide by num_tokens for the mean), or None; logit_terms [B, N, L, H, 3] fp32: each step's
    decoder.head_logit_contributions for the token it generated (0 after stop), or None."""

    tokens: jax.Array
    num_tokens: jax.Array
    topk_index: jax.Array | None
    topk_weight: jax.Array | None
    mass: jax.Array | None = None
    logit_terms: jax.Array | None = None


def cache_slots(n: int, attn: AttentionOptions) -> int:
    """n slots rounded up to attn.cache_multiple (0: to the key chunk)."""
    m = attn.cache_multiple or attn.k_chunk
    return -(-n // m) * m


def cache_size_for(prompt_len: int, spec: GenerateSpec) -> int:
    """Cache slots for a padded prompt length and its generation (`cache_slots`).

    Padding tokens past the end are dropped by the write into the cache (cache.write_rows), so only real
    tokens need a slot.
    """
    return cache_slots(prompt_len + spec.max_new_tokens, spec.attn)


def prefill(params, cfg: ModelConfig, tokens, positions, cache: KVCache, *, chunk: int,
            head_mask=None, mask_mode="zero", attn=AttentionOptions(), masses: tuple[str, ...] = (),
            targets: MassTargets | None = None, row=None):
    """Append tokens [B, T] (padding at row ends, position -1) to the cache, `chunk` at a time.
    row: None, or the cache row of the tokens' first row (decoder.forward's `row`).

    Returns the cache; with `masses`, (cache, mass [L, B, H, M]): each target's attention mass
    summed over the queries in its range (targets.queries), over all calls."""
    if masses:
        capture = CaptureSpec(masses=masses)

        def call_mass(carry, tok, pos):
            cache, total = carry
            _, cache, caps = forward(params, cfg, tok, pos, cache, head_mask=head_mask, mask_mode=mask_mode,
                                     capture=capture, logits="none", attn=attn, targets=targets, row=row)
            return cache, total + caps.mass

        total = jnp.zeros((cfg.num_layers, tokens.shape[0], cfg.num_heads, len(masses)), jnp.float32)
        return prefill_loop(call_mass, tokens, positions, (cache, total), chunk)

    def call(cache, tok, pos):
        _, cache, _ = forward(params, cfg, tok, pos, cache, head_mask=head_mask, mask_mode=mask_mode,
                              logits="none", attn=attn, row=row)
        return cache

    return prefill_loop(call, tokens, positions, cache, chunk)


def prefill_loop(call, tokens, positions, carry, chunk: int):
    """THE prefill loop over any cache: tokens, positions [B, T] (padding: position -1) fed to
    `call(carry, tokens [B, c], positions [B, c]) -> carry` in calls of c = min(chunk, T) under
    `lax.scan` (the last call padded). carry: the cache (and whatever the call adds up)."""
    B, T = tokens.shape
    chunk = min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    tokens = tokens.reshape(B, n, chunk).swapaxes(0, 1)
    positions = positions.reshape(B, n, chunk).swapaxes(0, 1)
    return lax.scan(lambda c, xs: (call(c, *xs), None), carry, (tokens, positions))[0]


@partial(jax.jit, static_argnames=("cfg", "spec", "prefill_width"))
def generate(params, cfg: ModelConfig, prompts, prompt_lens, cache: KVCache, *, spec: GenerateSpec,
             prefill_width: int, prefill_mask=None, decode_mask=None, output_span=None) -> tuple[Generation, KVCache]:
    """Greedy generation for a batch of prompts sharing one padded shape.

    Args:
      prompts: [B, P] int32 prompt ids, padded at the end. prompt_lens: [B].
      cache: row b already holds the first cache.length[b] prompt tokens (0 for a fresh cache from
        `init_cache`; more when a shared prefix was prefilled once, see rhead_jax.sweep).
      prefill_width: static; >= max_b(prompt_lens[b] - 1 - cache.length[b]). The prefill processes
        this many tokens per row, so a shared prefix saves its FLOPs.
      prefill_mask / decode_mask: [L, H] head masks for the two phases (None: no masking).
      output_span: [B, 2] the rows' spans of spec.decode_outputs (None without).
    """
    B, P = prompts.shape
    if cache.size < cache_size_for(P, spec):
        raise ValueError(f"cache has {cache.size} slots; prompts of padded length {P} need "
                         f"cache_size_for(P, spec) = {cache_size_for(P, spec)}")
    start = cache.length
    n_prefill = prompt_lens - 1 - start
    t = jnp.arange(prefill_width)
    src = jnp.clip(start[:, None] + t, 0, P - 1)
    rest = jnp.take_along_axis(prompts, src, axis=1)
    rest_pos = jnp.where(t[None] < n_prefill[:, None], start[:, None] + t, -1)
    cache = prefill(params, cfg, rest, rest_pos, cache, chunk=spec.prefill_chunk,
                    head_mask=prefill_mask, mask_mode=spec.mask_mode, attn=spec.attn)

    first = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1)[:, 0]
    return decode_impl(params, first, prompt_lens, cache, decode_mask, None, output_span, cfg=cfg, spec=spec)


def decode_impl(params, first, prompt_lens, cache: KVCache, decode_mask, targets: MassTargets | None = None,
                output_span=None, *, cfg: ModelConfig, spec: GenerateSpec) -> tuple[Generation, KVCache]:
    """The greedy decode loop with capture, after the prefill: the cache holds every prompt token
    but the last; `first` [B] is that last token and `prompt_lens` [B] the prompt lengths.
    targets: the rows' MassTargets of spec.decode_masses (None without); output_span [B, 2]: the
    rows' spans of spec.decode_outputs (None without)."""
    capture = CaptureSpec(top_k=spec.top_k, masses=spec.decode_masses, span_outputs=spec.decode_outputs)

    def step(tok, pos, cache):
        logits, cache, caps = forward(params, cfg, tok, pos, cache, head_mask=decode_mask,
                                      mask_mode=spec.mask_mode, capture=capture, attn=spec.attn, targets=targets,
                                      output_span=output_span)
        terms = (lambda nxt: head_logit_contributions(params, cfg, caps, nxt)) if spec.decode_outputs else None
        return logits, cache, caps.topk_index, caps.topk_weight, caps.mass, terms

    return decode_loop(step, first, prompt_lens, cache, spec=spec, num_layers=cfg.num_layers, num_heads=cfg.num_heads)


def decode_loop(step, first, prompt_lens, cache, *, spec: GenerateSpec, num_layers: int, num_heads: int):
    """THE greedy decode loop with capture over any cache (a `lax.while_loop`; the plain and
    windowed KVCache, models.mixed's MixedCache): the cache holds every prompt token but the last,
    `first` [B] is that token. step(tok [B, 1], pos [B, 1], cache) -> (logits [B, 1, V], cache,
    topk_index, topk_weight [L, B, H, k] (None without spec.top_k), mass [L, B, H, M] (None
    without spec.decode_masses), terms: nxt [B] -> [L, B, H, 3] logit terms of the generated
    token (None without spec.decode_outputs)). Returns (Generation, cache)."""
    B = first.shape[0]
    N, k = spec.max_new_tokens, spec.top_k
    L, H = num_layers, num_heads
    stops = jnp.asarray(spec.stop_tokens or (-2,), jnp.int32)
    lead = jnp.asarray(spec.leading_stop_tokens or (-2,), jnp.int32)
    masses = spec.decode_masses
    outputs = spec.decode_outputs

    def cond(c):
        step_i, _, _, done, *_ = c
        return (step_i < N) & ~jnp.all(done)

    def body(c):
        step_i, cache, tok, done, out, n_tok, cap_i, cap_w = c[:8]
        pos = (prompt_lens - 1 + step_i)[:, None]
        logits, cache, top_i, top_w, mass, terms_of = step(tok[:, None], pos, cache)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        out = out.at[:, step_i].set(jnp.where(done, -1, nxt))
        live = ~done[:, None, None, None]
        if k:
            cap_i = cap_i.at[:, step_i].set(jnp.where(live, top_i.swapaxes(0, 1), -1))
            cap_w = cap_w.at[:, step_i].set(jnp.where(live, top_w.swapaxes(0, 1), 0.0))
        n_tok = n_tok + (~done).astype(jnp.int32)
        seen = jnp.any((out >= 0) & ~jnp.isin(out, lead), axis=1)  # a token outside `lead` so far
        done = done | (jnp.isin(nxt, stops) & seen)
        new = (step_i + 1, cache, nxt, done, out, n_tok, cap_i, cap_w)
        if masses:  # the steps that produce a token (those the copy score counts)
            new += (c[8] + jnp.where(live, mass.swapaxes(0, 1), 0.0),)
        if outputs:
            terms = terms_of(nxt).swapaxes(0, 1)    # [B, L, H, 3]
            new += (c[-1].at[:, step_i].set(jnp.where(live, terms, 0.0)),)
        return new

    init = (jnp.int32(0), cache, first, jnp.zeros((B,), bool), jnp.full((B, N), -1, jnp.int32),
            jnp.zeros((B,), jnp.int32), jnp.full((B, N, L, H, k), -1, jnp.int32),
            jnp.zeros((B, N, L, H, k), jnp.float32))
    if masses:
        init += (jnp.zeros((B, L, H, len(masses)), jnp.float32),)
    if outputs:
        init += (jnp.zeros((B, N, L, H, 3), jnp.float32),)
    res = lax.while_loop(cond, body, init)
    _, cache, _, _, out, n_tok, cap_i, cap_w = res[:8]
    gen = Generation(tokens=out, num_tokens=n_tok, topk_index=cap_i if k else None,
                     topk_weight=cap_w if k else None, mass=res[8] if masses else None,
                     logit_terms=res[-1] if outputs else None)
    return gen, cache


# ----------------------------------------------------------------------------- row blocks
# The engine prefills a batch's rows separately (each at its own width) and decodes them together.
# A row block is one row per data shard: with the batch axis sharded d ways into [d, B/d], block j
# is local row j of every shard, so taking and writing it back never moves data between devices.


def _block_axis(x, axis: int, d: int):
    """[..., B, ...] -> [..., d, B/d, ...] (a view: the batch axis split by shard)."""
    return x.reshape(x.shape[:axis] + (d, x.shape[axis] // d) + x.shape[axis + 1:])


# the batch axis of each KVCache field (rings: None in a plain cache)
_BATCH_AXIS = {"k": 1, "v": 1, "pos": 0, "length": 0, "ring_k": 1, "ring_v": 1, "ring_pos": 0}


def take_row_block(cache: KVCache, j, d: int) -> KVCache:
    """The d-row cache of block j: rows j, B/d + j, 2B/d + j, ... of a [B]-row cache."""
    take = lambda x, axis: lax.dynamic_index_in_dim(_block_axis(x, axis, d), j, axis + 1, keepdims=False)  # noqa: E731
    return cache.replace(**{n: take(getattr(cache, n), a) for n, a in _BATCH_AXIS.items()
                            if getattr(cache, n) is not None})


def put_row_block(cache: KVCache, block: KVCache, j, d: int) -> KVCache:
    """`cache` with block j replaced by `block` (in place when the cache is donated)."""
    def put(x, y, axis):
        xb = lax.dynamic_update_index_in_dim(_block_axis(x, axis, d), y, j, axis + 1)
        return xb.reshape(x.shape)

    return cache.replace(**{n: put(getattr(cache, n), getattr(block, n), a) for n, a in _BATCH_AXIS.items()
                            if getattr(cache, n) is not None})


def prefill_block_impl(params, cache: KVCache, j, tokens, positions, head_mask, targets: MassTargets | None = None,
                       *, cfg: ModelConfig, spec: GenerateSpec, data: int, in_place: bool = False):
    """Append tokens [d, W] (position -1 = padding) to the rows of block j; W is one prefill call.
    Returns the cache; with spec.prefill_masses, (cache, mass [L, d, H, M]) for the block's rows
    (targets: their MassTargets, d rows).

    in_place (one data shard, a plain cache written by scatter): the call writes row j of the
    cache where it lies (decoder.forward's `row`) instead of taking the row's cache out and putting
    it back, which held a copy of the row's whole cache for the call (XLA:CPU, SmolLM2, 3 rows of
    2,048 slots: 132 MiB of temporaries, 42 MiB in place); the same values."""
    if in_place and data == 1 and not cache.windowed and spec.attn.cache_writes == "scatter":
        return prefill(params, cfg, tokens, positions, cache, chunk=tokens.shape[1], head_mask=head_mask,
                       mask_mode=spec.mask_mode, attn=spec.attn, masses=spec.prefill_masses, targets=targets, row=j)
    block = take_row_block(cache, j, data)
    block = prefill(params, cfg, tokens, positions, block, chunk=tokens.shape[1], head_mask=head_mask,
                    mask_mode=spec.mask_mode, attn=spec.attn, masses=spec.prefill_masses, targets=targets)
    if spec.prefill_masses:
        block, mass = block
        return put_row_block(cache, block, j, data), mass
    return put_row_block(cache, block, j, data)


def prefill_widths(chunk: int, levels: int = 4) -> tuple[int, ...]:
    """The prefill call widths the engine compiles: chunk, chunk/2, ... (`levels` of them)."""
    return tuple(sorted({max(chunk >> i, 1) for i in range(levels)}, reverse=True))


def prefill_pieces(n: int, widths: Sequence[int]) -> list[int]:
    """Split n tokens into calls of the given widths (descending): full calls of the largest, then
    the rest rounded up to the smallest width and written in binary (at most smallest - 1 padding)."""
    big, small = widths[0], widths[-1]
    pieces = [big] * (n // big)
    rest = -(-(n - big * (n // big)) // small) * small
    for w in widths:
        while rest >= w:
            pieces.append(w)
            rest -= w
    return pieces


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to one [B, P] int32 array (P rounded up to `multiple`) and their lengths."""
    lens = np.array([len(p) for p in prompts], np.int32)
    P = -(-int(lens.max()) // multiple) * multiple
    out = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, lens


def greedy_generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    spec: GenerateSpec = GenerateSpec(), prefill_mask=None, decode_mask=None,
                    output_span=None) -> Generation:
    """Convenience wrapper: pad a list of prompts, allocate a cache, generate."""
    check_head_mask(cfg, prefill_mask, spec.mask_mode)
    check_head_mask(cfg, decode_mask, spec.mask_mode)
    arr, lens = pad_prompts(prompts)
    longest = int(lens.max())
    if longest + spec.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {spec.max_new_tokens} new tokens exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}; use shorter contexts")
    cache = init_cache(cfg, len(prompts), cache_size_for(arr.shape[1], spec))
    width = max(longest - 1, 1)
    gen, _ = generate(params, cfg, jnp.asarray(arr), jnp.asarray(lens), cache, spec=spec,
                      prefill_width=width, prefill_mask=prefill_mask, decode_mask=decode_mask,
                      output_span=None if output_span is None else jnp.asarray(output_span, jnp.int32))
    return gen
