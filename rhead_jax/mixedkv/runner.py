"""`MixedRunner`: the engine's programs over a mixed KV cache (rhead_jax.models.mixed), on one device
or a mesh. Same methods as rhead_jax.runner.Runner, so `Engine.generate(..., runner=)` and
`Engine.shared_prefix(..., runner=)` drive it, and the dry run compiles the same `*_jit` programs.

Sharding: rows on "data"; the cache's head-group axis M on "model" when the mesh's model axis
divides the KV heads (then M = that size and device m holds exactly the caches of the KV heads
whose k/v projections it holds: no cache moves between devices); otherwise M = 1 and the mixed
cache is replicated along "model", as the full cache's KV-head axis is. The head tables are
small and replicated. The shared prefix is one row whose streaming heads keep every position
(`prefix_cache`), from which `rows` takes each row's ring; it is held like the full cache's.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from rhead_jax import sharding as shd
from rhead_jax.models.generate import GenerateSpec
from rhead_jax.models.mixed import decode_mixed, prefill_mixed
from rhead_jax.models.mixed_cache import (HeadTables, MixedCache, MixedLayout, cache_nbytes, head_layout,
                                          init_mixed_cache, put_rows, rows_from_prefix, take_rows)
from rhead_jax.runner import Runner

CACHE_AXES = {"full_k": ("batch", "kv_heads", None, "cache_seq", "head_dim"),
              "full_v": ("batch", "kv_heads", None, "cache_seq", "head_dim"),
              "full_pos": ("batch", "cache_seq"),
              "ring_k": ("batch", "kv_heads", None, None, "head_dim"),
              "ring_v": ("batch", "kv_heads", None, None, "head_dim"),
              "ring_pos": ("batch", None), "length": ("batch",)}


def mesh_groups(num_kv_heads: int, mesh) -> int:
    """M: the model axis size when it divides the KV heads, else 1 (see the module docstring)."""
    model = 1 if mesh is None else dict(mesh.shape)["model"]
    return model if num_kv_heads % model == 0 else 1


def mixed_layout(cfg, full, mesh, *, sink: int, recent: int) -> tuple[MixedLayout, HeadTables]:
    """Layout and tables of the full-head matrix `full` [L, K] for this mesh."""
    return head_layout(full, groups=mesh_groups(cfg.num_kv_heads, mesh), sink=sink, recent=recent)


def _prefill_block(params, tables, cache, j, tokens, positions, *, cfg, layout, spec, data):
    block = take_rows(cache, j, data)
    block = prefill_mixed(params, cfg, layout, tables, tokens, positions, block, chunk=tokens.shape[1],
                          attn=spec.attn)
    return put_rows(cache, block, j, data)


def _no_masks(*masks) -> None:
    if any(m is not None for m in masks):
        raise ValueError("the mixed KV cache runs without head masks and without attention-mass targets")


class MixedRunner(Runner):
    """Programs over a mixed cache with `layout` and (data) `tables`. Runners of one layout may share
    their compiled programs (`jits`: one dict per layout), since the tables are arguments."""

    def __init__(self, cfg, params, mesh, layout: MixedLayout, tables: HeadTables, *, jits: dict | None = None):
        super().__init__(cfg, params, mesh)
        self.layout = layout
        self.tables = tables      # placed on the mesh at the first call (the dry run passes abstract ones)
        self._placed = None
        if jits is not None:
            self._jits = jits
        self.last_cache = (0, 0, 0)   # (rows, size, bytes) of the latest batch cache built (its arrays' nbytes)

    # -- shapes and shardings ------------------------------------------------------------------

    def cache_shape(self, batch: int, size: int, ring: int | None = None) -> MixedCache:
        return jax.eval_shape(lambda: init_mixed_cache(self.cfg, self.layout, batch, size, ring=ring))

    def cache_sharding(self, batch: int, size: int, ring: int | None = None) -> MixedCache:
        shape = self.cache_shape(batch, size, ring)
        return MixedCache(**{n: NamedSharding(self.mesh, shd.logical_to_spec(
            CACHE_AXES[n], getattr(shape, n).shape, self.mesh, what=f"mixed_cache/{n}")) for n in CACHE_AXES})

    def _tables_sharding(self):
        return jax.tree.map(lambda _: shd.replicated(self.mesh), self.tables)

    def _tables(self) -> HeadTables:
        if self._placed is None:
            self._placed = self.tables if self.mesh is None else jax.tree.map(
                lambda x: shd.put_global(np.asarray(x), shd.replicated(self.mesh)), self.tables)
        return self._placed

    # -- programs ------------------------------------------------------------------------------

    def init_cache_jit(self, batch: int, size: int, ring: int | None = None):
        def make():
            step = partial(init_mixed_cache, self.cfg, self.layout, batch, size, ring=ring)
            if self.mesh is None:
                return self.jit(step)
            return self.jit(step, out_shardings=self.cache_sharding(batch, size, ring))

        return self._jit(("mixed_init", self.layout, batch, size, ring), make)

    def rows_jit(self, batch: int, size: int, prefix_size: int):
        """(prefix, starts [batch]) -> a [batch]-row cache of `size` positions from the 1-row prefix
        cache of `prefix_size` positions (models.mixed_cache.rows_from_prefix)."""
        def make():
            step = partial(rows_from_prefix, size=size, sink=self.layout.sink, ring=self.layout.ring_capacity(size))
            if self.mesh is None:
                return self.jit(step)
            in_sh = (self.cache_sharding(1, prefix_size, prefix_size), shd.batch_sharding((batch,), self.mesh))
            return self.jit(step, in_shardings=in_sh, out_shardings=self.cache_sharding(batch, size))

        return self._jit(("mixed_rows", self.layout, batch, size, prefix_size), make)

    def prefill_block_jit(self, batch: int, size: int, width: int, spec: GenerateSpec, mask: bool = False):
        """(params, tables, cache, block, tokens [d, width], positions [d, width]) -> cache (donated)."""
        _no_masks(True if mask else None)
        d = self.data_size

        def make():
            step = partial(_prefill_block, cfg=self.cfg, layout=self.layout, spec=spec, data=d)
            if self.mesh is None:
                return self.jit(step, donate_argnums=(2,))
            rep, csh = shd.replicated(self.mesh), self.cache_sharding(batch, size)
            tsh = shd.batch_sharding((d, width), self.mesh)
            return self.jit(step, in_shardings=(self.param_sh, self._tables_sharding(), csh, rep, tsh, tsh),
                           out_shardings=csh, donate_argnums=(2,))

        return self._jit(("mixed_prefill_block", self.layout, batch, size, width, spec), make)

    def decode_jit(self, batch: int, size: int, spec: GenerateSpec, mask: bool = False):
        """(params, tables, first [batch], prompt_lens [batch], cache) -> (Generation, cache) (donated)."""
        _no_masks(True if mask else None)

        def make():
            step = partial(decode_mixed, cfg=self.cfg, layout=self.layout, spec=spec)
            if self.mesh is None:
                return self.jit(step, donate_argnums=(4,))
            csh, lsh = self.cache_sharding(batch, size), shd.batch_sharding((batch,), self.mesh)
            return self.jit(step, in_shardings=(self.param_sh, self._tables_sharding(), lsh, lsh, csh),
                           out_shardings=(shd.generation_shardings(self.mesh), csh), donate_argnums=(4,))

        return self._jit(("mixed_decode", self.layout, batch, size, spec), make)

    # -- calls (Engine.generate / shared_prefix) -------------------------------------------------

    def init_cache(self, batch: int, size: int) -> MixedCache:
        cache = self.init_cache_jit(batch, size)()
        self.last_cache = (batch, size, cache_nbytes(cache))
        return cache

    def prefix_cache(self, size: int) -> MixedCache:
        """The shared prefix's 1-row cache: streaming heads keep every position (ring = size)."""
        return self.init_cache_jit(1, size, size)()

    def prefill(self, tokens, positions, cache: MixedCache, spec: GenerateSpec, head_mask=None) -> MixedCache:
        """Append tokens [B, T] (the shared prefix, B = 1) to a cache."""
        _no_masks(head_mask)
        B = tokens.shape[0]

        def run(params, tables, tok, pos, cache):
            return prefill_mixed(params, self.cfg, self.layout, tables, tok, pos, cache, chunk=spec.prefill_chunk,
                                 attn=spec.attn)

        key = ("mixed_prefill", self.layout, tokens.shape, cache.size, cache.ring_size, spec)
        if self.mesh is None:
            fn = self._jit(key, lambda: self.jit(run))
        else:
            rep, csh = shd.replicated(self.mesh), self.cache_sharding(B, cache.size, cache.ring_size)
            fn = self._jit(key, lambda: self.jit(run, in_shardings=(self.param_sh, self._tables_sharding(), rep, rep,
                                                                   csh), out_shardings=csh))
        put = lambda x: self._put(x, lambda shape, mesh: shd.replicated(mesh))  # noqa: E731
        return fn(self.params, self._tables(), put(tokens), put(positions), cache)

    def rows(self, cache1: MixedCache, starts, size: int) -> MixedCache:
        fn = self.rows_jit(len(starts), size, cache1.size)
        cache = fn(cache1, self._put(starts, shd.batch_sharding))
        self.last_cache = (len(starts), size, cache_nbytes(cache))
        return cache

    def prefill_block(self, cache: MixedCache, block: int, tokens, positions, spec: GenerateSpec,
                      head_mask=None, targets=None) -> MixedCache:
        _no_masks(head_mask, targets)
        fn = self.prefill_block_jit(cache.length.shape[0], cache.size, tokens.shape[1], spec)
        rep = lambda shape, mesh: shd.replicated(mesh)  # noqa: E731
        return fn(self.params, self._tables(), cache, self._put(jnp.int32(block), rep),
                  self._put(tokens, shd.batch_sharding), self._put(positions, shd.batch_sharding))

    def decode(self, first, lens, cache: MixedCache, spec: GenerateSpec, decode_mask=None, targets=None):
        _no_masks(decode_mask, targets)
        fn = self.decode_jit(cache.length.shape[0], cache.size, spec)
        put = lambda x: self._put(x, shd.batch_sharding)  # noqa: E731
        gen, _ = fn(self.params, self._tables(), put(first), put(lens), cache)
        return gen


class MeasuredRunner(Runner):
    """The engine's Runner (the plain full cache), recording the bytes of the batch caches it builds."""

    def __init__(self, cfg, params, mesh):
        super().__init__(cfg, params, mesh)
        self.last_cache = (0, 0, 0)

    def prefix_cache(self, size: int):
        return Runner.prefix_cache(self, size)

    def init_cache(self, batch: int, size: int):
        cache = super().init_cache(batch, size)
        self.last_cache = (batch, size, cache_nbytes(cache))
        return cache

    def rows(self, cache1, starts, size: int):
        cache = super().rows(cache1, starts, size)
        self.last_cache = (len(starts), size, cache_nbytes(cache))
        return cache
