"""The sweep's jitted programs, on one device or on a mesh.

`Runner(cfg, params)` runs on the default device. `Runner(cfg, params, mesh)` compiles the same
programs with `jax.jit` in/out shardings (what `pjit` became): params by the logical-axis rules,
batches and KV caches along "data", heads along "model", experts along "expert"; the small
outputs (tokens, captured slots, attention masses) come back replicated so every process can
read them.

Attention masses (GenerateSpec.prefill_masses / decode_masses) add one argument to the programs
that reduce them, the rows' MassTargets (sharded like the rows), and one output, the masses
(replicated); a spec without masses compiles the programs it compiled before.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rhead_jax import sharding as shd
from rhead_jax.models.attention import MassTargets
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import KVCache, init_cache
from rhead_jax.models.generate import Generation, GenerateSpec, decode_impl, prefill, prefill_block_impl


def _rows(cache: KVCache, starts, branches: KVCache | None = None, source=None, *, size: int) -> KVCache:
    """[B]-row cache of `size` slots from a 1-row cache: row b keeps slots < starts[b]. With
    `branches` (an [R]-row cache), row b takes them from branch row source[b] instead where
    source[b] >= 0."""
    B = starts.shape[0]
    k, v = cache.k[:, :, :, :size], cache.v[:, :, :, :size]
    shape = (k.shape[0], B) + k.shape[2:]
    k, v = jnp.broadcast_to(k, shape), jnp.broadcast_to(v, shape)
    if branches is not None:
        use = (source >= 0)[None, :, None, None, None]

        def rows_of(x):  # [L, R, K, Sb, D] -> [L, B, K, size, D]: row source[b] of each, fitted to size
            x = x[:, :, :, :size]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, size - x.shape[3]), (0, 0)))
            return jnp.take(x, jnp.maximum(source, 0), axis=1)

        k, v = jnp.where(use, rows_of(branches.k), k), jnp.where(use, rows_of(branches.v), v)
    slot = jnp.arange(size)[None]
    pos = jnp.where(slot < starts[:, None], slot, -1).astype(jnp.int32)
    return KVCache(k=k, v=v, pos=pos, length=starts.astype(jnp.int32))


def _rep_fn(shape, mesh):
    return shd.replicated(mesh)


def _targets_sharding(mesh, rows: int) -> MassTargets:
    """MassTargets of `rows` rows: every field split along "data" by its row axis."""
    return MassTargets(span=shd.batch_sharding((rows, 2), mesh), queries=shd.batch_sharding((rows, 1, 2), mesh),
                       period=shd.batch_sharding((rows,), mesh), start=shd.batch_sharding((rows,), mesh))


def _masses_of(params, tokens, positions, targets, *, cfg: ModelConfig, spec: GenerateSpec, size: int):
    """mass [L, B, H, M] of spec.prefill_masses over tokens [B, T]: a fresh cache of `size` slots,
    the tokens prefilled in calls of spec.prefill_chunk, the cache dropped."""
    cache = init_cache(cfg, tokens.shape[0], size)
    _, mass = prefill(params, cfg, tokens, positions, cache, chunk=spec.prefill_chunk, mask_mode=spec.mask_mode,
                      attn=spec.attn, masses=spec.prefill_masses, targets=targets)
    return mass


# XLA:CPU compiles the sweep's programs 20% faster at LLVM -O1 than at its default, and they run
# as fast (their dots are library calls; SmolLM2 sweep, warm: 54.3 / 55.8 s vs 54.1 / 59.4 s;
# compiles 7.8 vs 9.8 s; identical outputs). Other platforms keep their defaults.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class Runner:
    def __init__(self, cfg: ModelConfig, params, mesh=None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self._jits: dict = {}
        if mesh is not None:
            self.param_sh = shd.param_shardings(cfg, mesh)

    @property
    def platform(self) -> str:
        """"cpu", "gpu" or "tpu": the devices the programs run on."""
        devices = jax.devices() if self.mesh is None else self.mesh.devices.flat
        return next(iter(devices)).platform

    @property
    def data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"]

    # -- helpers -------------------------------------------------------------------------------

    def cache_sharding(self, batch: int, size: int) -> KVCache:
        """The NamedShardings of a [batch]-row cache of `size` slots on the mesh (a KVCache of them)."""
        shape = jax.eval_shape(lambda: init_cache(self.cfg, batch, size))
        return shd.cache_shardings(shape, self.mesh)

    def _put(self, x, sharding_fn):
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_global(np.asarray(x), sharding_fn(np.shape(x), self.mesh))

    def jit(self, fn, **kw):
        """`jax.jit(fn, **kw)` with this platform's compiler options (CPU_COMPILER_OPTIONS on CPU)."""
        if self.platform == "cpu":
            kw["compiler_options"] = CPU_COMPILER_OPTIONS
        return jax.jit(fn, **kw)

    def _jit(self, key, make):
        if key not in self._jits:
            self._jits[key] = make()
        return self._jits[key]

    # -- programs ------------------------------------------------------------------------------
    # Each `*_jit` method builds (once per shape) the jitted program the sweep runs: the call methods
    # below use it, and rhead_jax.dryrun lowers and compiles the same function on abstract arguments
    # (`jax.ShapeDtypeStruct`s carrying the mesh's shardings). One wiring for both.

    def init_cache_jit(self, batch: int, size: int):
        """() -> a zeroed [batch]-row cache of `size` slots (sharded on the mesh)."""
        def make():
            step = partial(init_cache, self.cfg, batch, size)
            if self.mesh is None:
                return self.jit(step)
            return self.jit(step, out_shardings=self.cache_sharding(batch, size))

        return self._jit(("init", batch, size), make)

    def rows_jit(self, batch: int, size: int, prefix_size: int, branches: tuple[int, int] | None = None):
        """(cache1, starts [batch][, branches, source [batch]]) -> a [batch]-row cache of `size`
        slots taken from the 1-row shared-prefix cache of `prefix_size` slots (row b keeps its
        slots < starts[b]); with `branches` = (rows, slots) of a branch cache, row b takes them from
        branch row source[b] where source[b] >= 0 (engine.choose_branches)."""
        def make():
            step = partial(_rows, size=size)
            if self.mesh is None:
                return self.jit(step)
            bsh = shd.batch_sharding((batch,), self.mesh)
            in_sh = (self.cache_sharding(1, prefix_size), bsh)
            if branches is not None:
                in_sh += (self.cache_sharding(*branches), bsh)
            return self.jit(step, in_shardings=in_sh, out_shardings=self.cache_sharding(batch, size))

        return self._jit(("rows", batch, size, prefix_size, branches), make)

    def prefill_block_jit(self, batch: int, size: int, width: int, spec: GenerateSpec, mask: bool = False):
        """(params, cache, block, tokens [d, width], positions [d, width], head_mask or None[, targets])
        -> cache: one prefill call of row block `block` (models.generate.prefill_block_impl) on a
        [batch]-row cache of `size` slots, d = the data axis. The cache is DONATED (updated in place).
        With spec.prefill_masses it takes the block's MassTargets (d rows) and returns (cache, mass
        [L, d, H, M])."""
        d = self.data_size

        def make():
            step = partial(prefill_block_impl, cfg=self.cfg, spec=spec, data=d)
            if self.mesh is None:
                return self.jit(step, donate_argnums=(1,))
            rep, csh = shd.replicated(self.mesh), self.cache_sharding(batch, size)
            tsh = shd.batch_sharding((d, width), self.mesh)
            in_sh = (self.param_sh, csh, rep, tsh, tsh, rep if mask else None)
            if spec.prefill_masses:
                return self.jit(step, in_shardings=in_sh + (_targets_sharding(self.mesh, d),),
                               out_shardings=(csh, rep), donate_argnums=(1,))
            return self.jit(step, in_shardings=in_sh, out_shardings=csh, donate_argnums=(1,))

        return self._jit(("prefill_block", batch, size, width, spec, mask), make)

    def decode_jit(self, batch: int, size: int, spec: GenerateSpec, mask: bool = False):
        """(params, first [batch], prompt_lens [batch], cache, decode_mask or None[, targets[, output_span]])
        -> (Generation, cache): the greedy decode loop with capture (models.generate.decode_impl), with
        the rows' MassTargets when spec.decode_masses (None in their place without, when
        spec.decode_outputs) and their output spans [batch, 2] when spec.decode_outputs. The cache is DONATED; the Generation comes back
        replicated (host-readable on every process)."""
        def make():
            step = partial(decode_impl, cfg=self.cfg, spec=spec)
            if self.mesh is None:
                return self.jit(step, donate_argnums=(3,))
            rep, csh = shd.replicated(self.mesh), self.cache_sharding(batch, size)
            lsh = shd.batch_sharding((batch,), self.mesh)
            in_sh = (self.param_sh, lsh, lsh, csh, rep if mask else None)
            if spec.decode_masses or spec.decode_outputs:
                in_sh += (_targets_sharding(self.mesh, batch) if spec.decode_masses else None,)
            if spec.decode_outputs:
                in_sh += (shd.batch_sharding((batch, 2), self.mesh),)
            return self.jit(step, in_shardings=in_sh,
                           out_shardings=(shd.generation_shardings(self.mesh), csh), donate_argnums=(3,))

        return self._jit(("decode", batch, size, spec, mask), make)

    def masses_jit(self, batch: int, width: int, size: int, spec: GenerateSpec):
        """(params, tokens [batch, width], positions [batch, width], targets) -> mass [L, batch, H, M]:
        spec.prefill_masses of whole sequences prefilled into a fresh cache of `size` slots
        (rhead_jax.detectors). Rows along "data"; the masses come back replicated."""
        def make():
            fn = partial(_masses_of, cfg=self.cfg, spec=spec, size=size)
            if self.mesh is None:
                return self.jit(fn)
            tsh = shd.batch_sharding((batch, width), self.mesh)
            return self.jit(fn, in_shardings=(self.param_sh, tsh, tsh, _targets_sharding(self.mesh, batch)),
                           out_shardings=shd.replicated(self.mesh))

        return self._jit(("masses", batch, width, size, spec), make)

    def init_cache(self, batch: int, size: int) -> KVCache:
        return self.init_cache_jit(batch, size)()

    def prefix_cache(self, size: int) -> KVCache:
        """The 1-row cache the engine prefills the shared prefix into (`rows` takes the batch from it)."""
        return self.init_cache(1, size)

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
            fn = self._jit(key, lambda: self.jit(run))
        else:
            csh, rep = self.cache_sharding(B, size), shd.replicated(self.mesh)
            fn = self._jit(key, lambda: self.jit(
                run, in_shardings=(self.param_sh, rep, rep, csh, None if head_mask is None else rep),
                out_shardings=csh))
        mask = None if head_mask is None else self._put(head_mask, _rep_fn)
        return fn(self.params, self._put(tokens, _rep_fn), self._put(positions, _rep_fn), cache, mask)

    def rows(self, cache1: KVCache, starts: np.ndarray, size: int, branches: KVCache | None = None,
             source: np.ndarray | None = None) -> KVCache:
        if branches is None:
            return self.rows_jit(len(starts), size, cache1.size)(cache1, self._put(starts, shd.batch_sharding))
        fn = self.rows_jit(len(starts), size, cache1.size, (branches.k.shape[1], branches.size))
        return fn(cache1, self._put(starts, shd.batch_sharding), branches, self._put(source, shd.batch_sharding))

    def _put_targets(self, targets: MassTargets) -> MassTargets:
        return jax.tree.map(lambda x: self._put(x, shd.batch_sharding), targets)

    def prefill_block(self, cache: KVCache, block: int, tokens: np.ndarray, positions: np.ndarray,
                      spec: GenerateSpec, head_mask=None, targets: MassTargets | None = None):
        """Append tokens [d, W] to the rows of row block `block` (one row per data shard, see
        models.generate.take_row_block). The cache is donated: it is updated in place. With
        spec.prefill_masses (targets: the block's d rows) returns (cache, mass [L, d, H, M])."""
        fn = self.prefill_block_jit(cache.k.shape[1], cache.size, tokens.shape[1], spec, head_mask is not None)
        mask = None if head_mask is None else self._put(head_mask, _rep_fn)
        args = (self.params, cache, self._put(np.int32(block), _rep_fn), self._put(tokens, shd.batch_sharding),
                self._put(positions, shd.batch_sharding), mask)
        if spec.prefill_masses:
            args += (self._put_targets(targets),)
        return fn(*args)

    def decode(self, first: np.ndarray, lens: np.ndarray, cache: KVCache, spec: GenerateSpec,
               decode_mask=None, targets: MassTargets | None = None, output_span=None) -> Generation:
        """The greedy decode loop with capture over a prefilled [B]-row cache (donated); returns
        host-readable (replicated) outputs. targets: the rows' MassTargets of spec.decode_masses;
        output_span: their spans [B, 2] of spec.decode_outputs."""
        fn = self.decode_jit(cache.k.shape[1], cache.size, spec, decode_mask is not None)
        dm = None if decode_mask is None else self._put(decode_mask, _rep_fn)
        args = (self.params, self._put(first, shd.batch_sharding), self._put(lens, shd.batch_sharding), cache, dm)
        if spec.decode_masses or spec.decode_outputs:
            args += (self._put_targets(targets) if spec.decode_masses else None,)
        if spec.decode_outputs:
            args += (self._put(np.asarray(output_span, np.int32), shd.batch_sharding),)
        gen, _ = fn(*args)
        return gen

    def masses(self, tokens: np.ndarray, positions: np.ndarray, targets: MassTargets, spec: GenerateSpec,
               size: int) -> jax.Array:
        """spec.prefill_masses of whole sequences tokens [B, T] (see masses_jit): [L, B, H, M]."""
        fn = self.masses_jit(tokens.shape[0], tokens.shape[1], size, spec)
        return fn(self.params, self._put(tokens, shd.batch_sharding), self._put(positions, shd.batch_sharding),
                  self._put_targets(targets))
