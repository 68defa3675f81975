"""The sweep's jitted programs, on one device or on a mesh.

`Runner(cfg, params)` runs on the default device. `Runner(cfg, params, mesh)` compiles the same
programs with `jax.jit` in/out shardings (what `pjit` became): params by the logical-axis rules,
batches and KV caches along "data", heads along "model", experts along "expert"; the small
outputs (tokens, captured slots) come back replicated so every process can read them.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rhead_jax import sharding as shd
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import KVCache, init_cache
from rhead_jax.models.generate import (Generation, GenerateSpec, decode_impl, generate, generate_impl, prefill,
                                       prefill_block_impl)


def _rows(cache: KVCache, starts, size: int) -> KVCache:
    """[B]-row cache of `size` slots from a 1-row cache: row b keeps slots < starts[b]."""
    B = starts.shape[0]
    k, v = cache.k[:, :, :, :size], cache.v[:, :, :, :size]
    shape = (k.shape[0], B) + k.shape[2:]
    slot = jnp.arange(size)[None]
    pos = jnp.where(slot < starts[:, None], slot, -1).astype(jnp.int32)
    return KVCache(k=jnp.broadcast_to(k, shape), v=jnp.broadcast_to(v, shape), pos=pos,
                   length=starts.astype(jnp.int32))


def _without_resident(step, params, prompts, lens, cache, prefill_mask, decode_mask, _resident):
    """`step` with one more argument it does not read (arrays kept resident on the devices)."""
    return step(params, prompts, lens, cache, prefill_mask, decode_mask)


class Runner:
    def __init__(self, cfg: ModelConfig, params, mesh=None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self._jits: dict = {}
        if mesh is not None:
            self.param_sh = shd.param_shardings(cfg, mesh)

    @property
    def data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"]

    # -- helpers -------------------------------------------------------------------------------

    def _cache_sh(self, batch: int, size: int) -> KVCache:
        shape = jax.eval_shape(lambda: init_cache(self.cfg, batch, size))
        return shd.cache_shardings(shape, self.mesh)

    def _put(self, x, sharding_fn):
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_global(np.asarray(x), sharding_fn(np.shape(x), self.mesh))

    def _jit(self, key, make):
        if key not in self._jits:
            self._jits[key] = make()
        return self._jits[key]

    # -- programs ------------------------------------------------------------------------------

    def init_cache(self, batch: int, size: int) -> KVCache:
        if self.mesh is None:
            return init_cache(self.cfg, batch, size)
        fn = self._jit(("init", batch, size), lambda: jax.jit(
            partial(init_cache, self.cfg, batch, size), out_shardings=self._cache_sh(batch, size)))
        return fn()

    def prefill(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, spec: GenerateSpec,
                head_mask=None) -> KVCache:
        """Append tokens [B, T] to the cache (used for the shared prefix, B = 1)."""
        B, _ = tokens.shape
        size = cache.size

        def run(params, tok, pos, cache, mask):
            return prefill(params, self.cfg, tok, pos, cache, chunk=spec.prefill_chunk, head_mask=mask,
                           mask_mode=spec.mask_mode, attn=spec.attn)

        key = ("prefill", tokens.shape, size, spec, head_mask is None)
        if self.mesh is None:
            fn = self._jit(key, lambda: jax.jit(run))
        else:
            csh, rep = self._cache_sh(B, size), shd.replicated(self.mesh)
            fn = self._jit(key, lambda: jax.jit(
                run, in_shardings=(self.param_sh, rep, rep, csh, None if head_mask is None else rep),
                out_shardings=csh))
        rep_fn = lambda shape, mesh: shd.replicated(mesh)  # noqa: E731
        mask = None if head_mask is None else self._put(head_mask, rep_fn)
        return fn(self.params, self._put(tokens, rep_fn), self._put(positions, rep_fn), cache, mask)

    def rows(self, cache1: KVCache, starts: np.ndarray, size: int) -> KVCache:
        B = len(starts)
        if self.mesh is None:
            fn = self._jit(("rows", B, size, cache1.size), lambda: jax.jit(partial(_rows, size=size)))
            return fn(cache1, jnp.asarray(starts))
        fn = self._jit(("rows", B, size, cache1.size), lambda: jax.jit(
            partial(_rows, size=size), out_shardings=self._cache_sh(B, size)))
        return fn(cache1, self._put(starts, shd.batch_sharding))

    def prefill_block(self, cache: KVCache, block: int, tokens: np.ndarray, positions: np.ndarray,
                      spec: GenerateSpec, head_mask=None) -> KVCache:
        """Append tokens [d, W] to the rows of row block `block` (one row per data shard, see
        models.generate.take_row_block). The cache is donated: it is updated in place."""
        d, W = tokens.shape
        B, size = cache.k.shape[1], cache.size
        key = ("prefill_block", B, size, W, spec, head_mask is None)

        def make():
            step = partial(prefill_block_impl, cfg=self.cfg, spec=spec, data=d)
            if self.mesh is None:
                return jax.jit(step, donate_argnums=(1,))
            rep, csh = shd.replicated(self.mesh), self._cache_sh(B, size)
            tsh = shd.batch_sharding((d, W), self.mesh)
            return jax.jit(step, in_shardings=(self.param_sh, csh, rep, tsh, tsh, None if head_mask is None else rep),
                           out_shardings=csh, donate_argnums=(1,))

        fn = self._jit(key, make)
        rep_fn = lambda shape, mesh: shd.replicated(mesh)  # noqa: E731
        mask = None if head_mask is None else self._put(head_mask, rep_fn)
        return fn(self.params, cache, self._put(np.int32(block), rep_fn), self._put(tokens, shd.batch_sharding),
                  self._put(positions, shd.batch_sharding), mask)

    def decode(self, first: np.ndarray, lens: np.ndarray, cache: KVCache, spec: GenerateSpec,
               decode_mask=None) -> Generation:
        """The greedy decode loop with capture over a prefilled [B]-row cache (donated); returns
        host-readable (replicated) outputs."""
        B, size = cache.k.shape[1], cache.size
        key = ("decode", B, size, spec, decode_mask is None)

        def make():
            step = partial(decode_impl, cfg=self.cfg, spec=spec)
            if self.mesh is None:
                return jax.jit(step, donate_argnums=(3,))
            rep, csh, lsh = shd.replicated(self.mesh), self._cache_sh(B, size), shd.batch_sharding((B,), self.mesh)
            return jax.jit(step, in_shardings=(self.param_sh, lsh, lsh, csh, None if decode_mask is None else rep),
                           out_shardings=(shd.generation_shardings(self.mesh), csh), donate_argnums=(3,))

        fn = self._jit(key, make)
        rep_fn = lambda shape, mesh: shd.replicated(mesh)  # noqa: E731
        dm = None if decode_mask is None else self._put(decode_mask, rep_fn)
        gen, _ = fn(self.params, self._put(first, shd.batch_sharding), self._put(lens, shd.batch_sharding), cache, dm)
        return gen

    def generate_jit(self, batch: int, prompt_len: int, cache_size: int, *, spec: GenerateSpec, prefill_width: int,
                     prefill_mask: bool = False, decode_mask: bool = False, resident=None,
                     donate_cache: bool = False):
        """The jitted, sharded generate step for [batch, prompt_len] prompts and a `cache_size`-slot
        cache: what `generate` calls, and what `rhead_jax.dryrun` lowers and compiles on abstract
        arguments (`jax.ShapeDtypeStruct`s). Needs a mesh.

        Arguments of the returned function: (params, prompts, lengths, cache, prefill_mask or None,
        decode_mask or None) -> (Generation, cache). `resident`: shardings of arrays that stay on the
        devices during the step (the dry run passes the shared-prefix cache's): the function then
        takes them as one more, unused argument (`keep_unused=True`) so the compiler counts them.
        `donate_cache`: donate the cache argument (the sweep does not).
        """
        if self.mesh is None:
            raise ValueError("Runner.generate_jit needs a mesh (Runner(cfg, params, mesh))")
        B, P, size = batch, prompt_len, cache_size
        resident_key = None if resident is None else tuple(jax.tree.leaves(resident))
        key = ("generate", B, P, size, spec, prefill_width, not prefill_mask, not decode_mask, resident_key,
               donate_cache)

        def make():
            rep = shd.replicated(self.mesh)
            bsh = shd.batch_sharding((B, P), self.mesh)
            lsh = shd.batch_sharding((B,), self.mesh)
            csh = self._cache_sh(B, size)
            in_sh = (self.param_sh, bsh, lsh, csh, rep if prefill_mask else None, rep if decode_mask else None)
            step = partial(generate_impl, cfg=self.cfg, spec=spec, prefill_width=prefill_width)
            kw = {}
            if resident is not None:
                in_sh += (resident,)
                step = partial(_without_resident, step)
                kw["keep_unused"] = True
            if donate_cache:
                kw["donate_argnums"] = (3,)
            return jax.jit(step, in_shardings=in_sh, out_shardings=(shd.generation_shardings(self.mesh), csh), **kw)

        return self._jit(key, make)

    def generate(self, prompts: np.ndarray, lens: np.ndarray, cache: KVCache, *, spec: GenerateSpec,
                 prefill_width: int, prefill_mask=None, decode_mask=None) -> Generation:
        """Greedy generation with capture; returns host-readable (replicated) outputs."""
        if self.mesh is None:
            gen, _ = generate(self.params, self.cfg, jnp.asarray(prompts), jnp.asarray(lens), cache,
                              spec=spec, prefill_width=prefill_width, prefill_mask=prefill_mask,
                              decode_mask=decode_mask)
            return gen
        B, P = prompts.shape
        if B % self.data_size:
            raise ValueError(f"batch of {B} rows does not divide the data axis ({self.data_size}); "
                             "pad the batch (run_batch does) or change config.mesh")
        fn = self.generate_jit(B, P, cache.size, spec=spec, prefill_width=prefill_width,
                               prefill_mask=prefill_mask is not None, decode_mask=decode_mask is not None)
        rep_fn = lambda shape, mesh: shd.replicated(mesh)  # noqa: E731
        pm = None if prefill_mask is None else self._put(prefill_mask, rep_fn)
        dm = None if decode_mask is None else self._put(decode_mask, rep_fn)
        gen, _ = fn(self.params, self._put(prompts, shd.batch_sharding), self._put(lens, shd.batch_sharding),
                    cache, pm, dm)
        return gen
