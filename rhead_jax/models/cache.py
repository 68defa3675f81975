"""The decoder's KV cache and what a forward pass captures.

`KVCache`: the plain cache [L, B, K, S, D] with a position per slot, or a windowed one whose local
layers keep rings of W slots (`init_cache(..., ring=W)`, `ring_size_for`, `local_layers`);
`write_rows` writes a call's keys in place on TPU; `ring_view` / `ring_slots` read and write a
ring. `CaptureSpec` says what attention a pass returns (`Captures`). rhead_jax.models.decoder's
`forward` reads and writes them.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from rhead_jax.models.attention import MASS_TARGETS
from rhead_jax.models.config import ModelConfig


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
