"""A mixed KV cache: every (layer, KV head) is FULL (keeps every position) or STREAMING (keeps the
first `sink` positions and a ring buffer of the `recent` latest), as DuoAttention deploys retrieval
and streaming heads. The memory is really saved: a streaming head's slots are sink + recent, not S.
This module holds the cache's layout, its head tables, the cache itself and its rows (the engine's
batches); rhead_jax.models.mixed runs the model over it (forward, prefill, decode).

Layout. The KV heads are split into M contiguous groups of Kg = K / M heads (M = the mesh's model
axis when it divides K, so a device holds the cache of the heads it computes; else 1). Within a
group, all full (layer, head) pairs share one slot axis, grouped by layer; so do the streaming ones:

    full_k, full_v [B, M, F, S, D]    F = full pairs per group (the largest group's), S = positions
    full_pos       [B, S]             position held by each full slot (-1: empty); slot = position
    ring_k, ring_v [B, M, R, W, D]    R = streaming pairs per group, W = sink + recent (<= S)
    ring_pos       [B, W]             position held by each ring slot (-1: empty)
    length         [B]                the next position (= full slot) of each row

Position p of a streaming head lives in ring slot p if p < sink, else sink + (p - sink) % (W - sink).

Which pair is where is DATA (`HeadTables`, int32 index tables), not program structure: layers still
run under `lax.scan` (compile time does not grow with depth) and one compiled program serves every
head choice with the same counts (all rankings at one fraction, on one device). Per layer and
group, attention reads Fl = min(Kg, F) full heads (gathered from the slot axis) and Rl = min(Kg, R)
streaming heads; a layer with fewer pads and drops the padded heads' outputs. So memory follows
the choice exactly; compute is that of the padded counts (not reduced below full attention's when
Kg is small). The alternative, static per-layer slices with the layer loop unrolled in Python,
would compute exactly the chosen heads but compile one program per head choice, each growing
with depth.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rhead_jax.models.config import ModelConfig


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedLayout:
    """The static shape of a mixed cache (hashable: a jit static argument).

    groups (M): KV heads split into M contiguous groups of K / M heads.
    full_slots (F) / ring_slots (R): full / streaming (layer, head) pairs per group (the largest group's).
    sink, recent: what a streaming head sees (module docstring).
    """

    num_layers: int
    num_kv_heads: int
    groups: int
    full_slots: int
    ring_slots: int
    sink: int
    recent: int

    @property
    def kv_per_group(self) -> int:
        return self.num_kv_heads // self.groups

    @property
    def full_per_layer(self) -> int:
        """Fl: full heads attention reads per layer and group (padded)."""
        return min(self.kv_per_group, self.full_slots)

    @property
    def ring_per_layer(self) -> int:
        """Rl: streaming heads attention reads per layer and group (padded)."""
        return min(self.kv_per_group, self.ring_slots)

    @property
    def window(self) -> int:
        """W: ring slots of a batch cache (capped at the cache's positions by `ring_capacity`)."""
        return self.sink + self.recent

    def ring_capacity(self, size: int) -> int:
        return min(self.window, size)


@flax.struct.dataclass
class HeadTables:
    """Where each (layer, group)'s heads are, as int32 arrays (data: one program serves many choices).

    full_head / full_slot [L, M, Fl]: group-local KV head index and slot on the F axis of the layer's
      j-th full head (padding: head 0, slot F, out of range, so writes to it are dropped).
    ring_head / ring_slot [L, M, Rl]: the same for streaming heads (padding slot R).
    pick [L, M, Kg]: for each group-local head, its index in [full heads (Fl); streaming heads (Rl)].
    """

    full_head: jax.Array
    full_slot: jax.Array
    ring_head: jax.Array
    ring_slot: jax.Array
    pick: jax.Array


def head_layout(full, *, groups: int = 1, sink: int, recent: int) -> tuple[MixedLayout, HeadTables]:
    """Layout and tables of a boolean [L, K] `full` (True: full head) split into `groups` groups."""
    full = np.asarray(full, bool)
    L, K = full.shape
    if groups < 1 or K % groups:
        raise ValueError(f"groups={groups} must divide the {K} KV heads")
    if sink < 0 or recent < 1:
        raise ValueError(f"streaming heads need sink >= 0 and recent >= 1, got sink={sink}, recent={recent}")
    Kg = K // groups
    g = full.reshape(L, groups, Kg)
    F, R = int(g.sum((0, 2)).max()), int((~g).sum((0, 2)).max())
    layout = MixedLayout(num_layers=L, num_kv_heads=K, groups=groups, full_slots=F, ring_slots=R, sink=sink,
                         recent=recent)
    Fl, Rl = layout.full_per_layer, layout.ring_per_layer
    fh, fs = np.zeros((L, groups, Fl), np.int32), np.full((L, groups, Fl), F, np.int32)
    rh, rs = np.zeros((L, groups, Rl), np.int32), np.full((L, groups, Rl), R, np.int32)
    pick = np.zeros((L, groups, Kg), np.int32)
    for m in range(groups):
        nf = nr = 0
        for l in range(L):
            jf = jr = 0
            for h in range(Kg):
                if g[l, m, h]:
                    fh[l, m, jf], fs[l, m, jf], pick[l, m, h] = h, nf, jf
                    jf, nf = jf + 1, nf + 1
                else:
                    rh[l, m, jr], rs[l, m, jr], pick[l, m, h] = h, nr, Fl + jr
                    jr, nr = jr + 1, nr + 1
    tables = HeadTables(full_head=jnp.asarray(fh), full_slot=jnp.asarray(fs), ring_head=jnp.asarray(rh),
                        ring_slot=jnp.asarray(rs), pick=jnp.asarray(pick))
    return layout, tables


# ----------------------------------------------------------------------------- cache


@flax.struct.dataclass
class MixedCache:
    """See the module docstring for the shapes. Every array has the batch on axis 0."""

    full_k: jax.Array
    full_v: jax.Array
    full_pos: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    ring_pos: jax.Array
    length: jax.Array

    @property
    def size(self) -> int:
        return self.full_pos.shape[1]

    @property
    def ring_size(self) -> int:
        return self.ring_pos.shape[1]


def init_mixed_cache(cfg: ModelConfig, layout: MixedLayout, batch: int, size: int, *, ring: int | None = None,
                     dtype=None) -> MixedCache:
    """A zeroed cache of `size` positions; streaming heads get `ring` slots (default: sink + recent,
    at most `size`; `ring=size` keeps every position, as the shared prefix's reference does)."""
    dtype = dtype or jnp.dtype(cfg.dtype)
    W = layout.ring_capacity(size) if ring is None else ring
    M, D = layout.groups, cfg.head_dim
    fshape, rshape = (batch, M, layout.full_slots, size, D), (batch, M, layout.ring_slots, W, D)
    return MixedCache(full_k=jnp.zeros(fshape, dtype), full_v=jnp.zeros(fshape, dtype),
                      full_pos=jnp.full((batch, size), -1, jnp.int32), ring_k=jnp.zeros(rshape, dtype),
                      ring_v=jnp.zeros(rshape, dtype), ring_pos=jnp.full((batch, W), -1, jnp.int32),
                      length=jnp.zeros((batch,), jnp.int32))


def cache_nbytes(cache) -> int:
    """Bytes of a cache's arrays (any pytree: MixedCache, KVCache)."""
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def ring_slot(pos, sink: int, capacity: int):
    """Ring slot of position(s) `pos` in a ring of `capacity` slots."""
    rec = max(capacity - sink, 1)
    return jnp.where(pos < sink, pos, sink + (pos - sink) % rec)


# ----------------------------------------------------------------------------- rows (the engine's batches)


def rows_from_prefix(prefix: MixedCache, starts, size: int, *, sink: int, ring: int) -> MixedCache:
    """A [B]-row batch cache of `size` positions and `ring` ring slots from a 1-row prefix cache whose
    ring keeps every position (`init_mixed_cache(..., ring=<its size>)`, slot = position): row b
    takes positions < starts[b], i.e. its full heads' slots and, for its streaming heads, the sink
    and the latest positions its ring holds after them (exactly what prefilling them would leave)."""
    B = starts.shape[0]
    fk, fv = prefix.full_k[:, :, :, :size], prefix.full_v[:, :, :, :size]
    shape = (B,) + fk.shape[1:]
    n = starts[:, None].astype(jnp.int32)
    slot = jnp.arange(size)[None]
    w = jnp.arange(ring)[None]
    rec = max(ring - sink, 1)
    p = jnp.where(w < sink, w, w + rec * ((n - 1 - w) // rec))      # the latest position of slot w below n
    ok = w < n
    idx = jnp.where(ok, p, 0)
    take = lambda buf: jax.vmap(lambda pb: jnp.take(buf[0], pb, axis=2))(idx)  # noqa: E731  [B, M, R, ring, D]
    return MixedCache(full_k=jnp.broadcast_to(fk, shape), full_v=jnp.broadcast_to(fv, shape),
                      full_pos=jnp.where(slot < n, slot, -1).astype(jnp.int32), ring_k=take(prefix.ring_k),
                      ring_v=take(prefix.ring_v),
                      ring_pos=jnp.where(ok, p, -1).astype(jnp.int32), length=starts.astype(jnp.int32))


def take_rows(cache, j, d: int):
    """Row block j of a cache whose arrays all have the batch on axis 0 (rows j, B/d + j, ...; see
    models.generate.take_row_block)."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(_split(x, d), j, 1, keepdims=False), cache)


def put_rows(cache, block, j, d: int):
    """`cache` with row block j replaced by `block` (in place when the cache is donated)."""
    return jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(_split(x, d), y, j, 1).reshape(x.shape),
                        cache, block)


def _split(x, d: int):
    """[B, ...] -> [d, B/d, ...] (a view: the batch axis split by data shard)."""
    return x.reshape((d, x.shape[0] // d) + x.shape[1:])
