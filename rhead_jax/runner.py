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
from rhead_jax.models.cache import KVCache, init_cache, local_layers, ring_size_for
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.generate import Generation, GenerateSpec, decode_impl, prefill, prefill_block_impl


def _rows(cache: KVCache, starts, branches: KVCache | None = None, source=None, *, size: int,
          cfg: ModelConfig | None = None, ring: int | None = None) -> KVCache:
    """[B]-row cache of `size` slots from a 1-row (plain) cache: row b keeps slots < starts[b]. With
    `branches` (an [R]-row plain cache), row b takes them from branch row source[b] instead where
    source[b] >= 0. ring: a windowed cache (models.cache.KVCache) of `ring` ring slots: a local
    layer's ring is cut from that layer's every-position slots, row b's last `ring` positions
    before starts[b] (cfg names the local layers)."""
    B = starts.shape[0]
    local = local_layers(cfg) if ring is not None else ()
    full = [i for i in range(cache.k.shape[0]) if i not in local]
    pick = (lambda x: x) if not local else (lambda x: x[jnp.asarray(full, jnp.int32)])  # noqa: E731
    k, v = pick(cache.k)[:, :, :, :size], pick(cache.v)[:, :, :, :size]
    shape = (k.shape[0], B) + k.shape[2:]
    k, v = jnp.broadcast_to(k, shape), jnp.broadcast_to(v, shape)
    if branches is not None:
        use = (source >= 0)[None, :, None, None, None]

        def rows_of(x):  # [L, R, K, Sb, D] -> [L, B, K, size, D]: row source[b] of each, fitted to size
            x = x[:, :, :, :size]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, size - x.shape[3]), (0, 0)))
            return jnp.take(x, jnp.maximum(source, 0), axis=1)

        k, v = jnp.where(use, rows_of(pick(branches.k)), k), jnp.where(use, rows_of(pick(branches.v)), v)
    slot = jnp.arange(size)[None]
    pos = jnp.where(slot < starts[:, None], slot, -1).astype(jnp.int32)
    out = KVCache(k=k, v=v, pos=pos, length=starts.astype(jnp.int32))
    if not local:
        return out
    # ring slot r of row b holds the latest position p < starts[b] with p % ring == r (or none)
    r = jnp.arange(ring)[None]
    p = starts[:, None] - 1 - (starts[:, None] - 1 - r) % ring                       # [B, W]
    pc = jnp.maximum(p, 0)
    li = jnp.asarray(local, jnp.int32)

    def ring_of(x, xb):     # [L, 1, K, S, D] (and branches [L, R, K, Sb, D]) -> [Ll, B, K, W, D]
        got = jnp.transpose(x[li][:, 0][:, :, pc], (0, 2, 1, 3, 4))
        if xb is not None:  # row b's slots of branch row source[b], gathered without a [B, Sb] copy
            picked = xb[li][:, jnp.maximum(source, 0)[:, None], :, jnp.minimum(pc, xb.shape[3] - 1)]
            got = jnp.where((source >= 0)[None, :, None, None, None], jnp.transpose(picked, (2, 0, 3, 1, 4)), got)
        return got

    return out.replace(ring_k=ring_of(cache.k, None if branches is None else branches.k),
                       ring_v=ring_of(cache.v, None if branches is None else branches.v),
                       ring_pos=jnp.where(p >= 0, p, -1).astype(jnp.int32))


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


def _under_mesh(fn, mesh):
    """fn traced with `mesh` as the abstract mesh (what jax.sharding.get_abstract_mesh returns)."""
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


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

    def ring_for(self, size: int) -> int | None:
        """Ring slots of the batch caches of `size` slots: a windowed cache (a local layer keeps its
        window) for models with local layers smaller than the cache; None, the plain cache."""
        return ring_size_for(self.cfg, size)

    def cache_sharding(self, batch: int, size: int, plain: bool = False) -> KVCache:
        """The NamedShardings of a [batch]-row cache of `size` slots on the mesh (a KVCache of them):
        the batch caches' kind (`ring_for`), or a plain cache (the shared prefix and its branches,
        which keep every position so each row can cut its own window)."""
        shape = jax.eval_shape(lambda: init_cache(self.cfg, batch, size, ring=None if plain else self.ring_for(size)))
        return shd.cache_shardings(shape, self.mesh)

    def _put(self, x, sharding_fn):
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_global(np.asarray(x), sharding_fn(np.shape(x), self.mesh))

    def jit(self, fn, **kw):
        """`jax.jit(fn, **kw)` with this platform's compiler options (CPU_COMPILER_OPTIONS on CPU),
        traced under the mesh (the attention kernels run in `shard_map` over it, models.kernels)."""
        if self.platform == "cpu":
            kw["compiler_options"] = CPU_COMPILER_OPTIONS
        if self.mesh is not None:
            fn = _under_mesh(fn, self.mesh)
        return jax.jit(fn, **kw)

    def _jit(self, key, make):
        if key not in self._jits:
            self._jits[key] = make()
        return self._jits[key]

    # -- programs ------------------------------------------------------------------------------
    # Each `*_jit` method builds (once per shape) the jitted program the sweep runs: the call methods
    # below use it, and rhead_jax.dryrun lowers and compiles the same function on abstract arguments
    # (`jax.ShapeDtypeStruct`s carrying the mesh's shardings). One wiring for both.

    def init_cache_jit(self, batch: int, size: int, plain: bool = False):
        """() -> a zeroed [batch]-row cache of `size` slots (sharded on the mesh); windowed for a
        model with local layers (`ring_for`) unless `plain`."""
        def make():
            step = partial(init_cache, self.cfg, batch, size, ring=None if plain else self.ring_for(size))
            if self.mesh is None:
                return self.jit(step)
            return self.jit(step, out_shardings=self.cache_sharding(batch, size, plain))

        return self._jit(("init", batch, size) + (("plain",) if plain else ()), make)

    def rows_jit(self, batch: int, size: int, prefix_size: int, branches: tuple[int, int] | None = None):
        """(cache1, starts [batch][, branches, source [batch]]) -> a [batch]-row cache of `size`
        slots taken from the 1-row shared-prefix cache of `prefix_size` slots (row b keeps its
        slots < starts[b]); with `branches` = (rows, slots) of a branch cache, row b takes them from
        branch row source[b] where source[b] >= 0 (prefix.choose_branches)."""
        def make():
            step = partial(_rows, size=size, cfg=self.cfg, ring=self.ring_for(size))
            if self.mesh is None:
                return self.jit(step)
            bsh = shd.batch_sharding((batch,), self.mesh)
            in_sh = (self.cache_sharding(1, prefix_size, plain=True), bsh)
            if branches is not None:
                in_sh += (self.cache_sharding(*branches, plain=True), bsh)
            return self.jit(step, in_shardings=in_sh, out_shardings=self.cache_sharding(batch, size))

        return self._jit(("rows", batch, size, prefix_size, branches), make)

    def prefill_block_jit(self, batch: int, size: int, width: int, spec: GenerateSpec, mask: bool = False,
                          plain: bool = False):
        """(params, cache, block, tokens [d, width], positions [d, width], head_mask or None[, targets])
        -> cache: one prefill call of row block `block` (models.generate.prefill_block_impl) on a
        [batch]-row cache of `size` slots, d = the data axis. The cache is DONATED (updated in place;
        on CPU the call writes the block's rows where they lie, `in_place`: measured there).
        With spec.prefill_masses it takes the block's MassTargets (d rows) and returns (cache, mass
        [L, d, H, M]). plain: the cache is a plain one where the batch caches are windowed (the
        prefix branches')."""
        d = self.data_size

        def make():
            step = partial(prefill_block_impl, cfg=self.cfg, spec=spec, data=d, in_place=self.platform == "cpu")
            if self.mesh is None:
                return self.jit(step, donate_argnums=(1,))
            rep, csh = shd.replicated(self.mesh), self.cache_sharding(batch, size, plain)
            tsh = shd.batch_sharding((d, width), self.mesh)
            in_sh = (self.param_sh, csh, rep, tsh, tsh, rep if mask else None)
            if spec.prefill_masses:
                return self.jit(step, in_shardings=in_sh + (_targets_sharding(self.mesh, d),),
                               out_shardings=(csh, rep), donate_argnums=(1,))
            return self.jit(step, in_shardings=in_sh, out_shardings=csh, donate_argnums=(1,))

        return self._jit(("prefill_block", batch, size, width, spec, mask) + (("plain",) if plain else ()), make)

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
        """The 1-row cache the engine prefills the shared prefix into (`rows` takes the batch from
        it): plain, every position of every layer, so each row cuts its own local windows."""
        return self.init_cache_jit(1, size, plain=True)()

    def branch_cache(self, batch: int, size: int) -> KVCache:
        """The cache the engine prefills the prefix branches into (plain, like `prefix_cache`)."""
        if self.ring_for(size) is None:
            return self.init_cache(batch, size)
        return self.init_cache_jit(batch, size, plain=True)()

    @staticmethod
    def _plain(cache) -> bool:
        """A plain KVCache (not windowed; any other runner's cache counts as its own kind)."""
        return isinstance(cache, KVCache) and not cache.windowed

    def prefill(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, spec: GenerateSpec,
                head_mask=None) -> KVCache:
        """Append tokens [B, T] to the cache (used for the shared prefix, B = 1)."""
        B, _ = tokens.shape
        size = cache.size

        def run(params, tok, pos, cache, mask):
            return prefill(params, self.cfg, tok, pos, cache, chunk=spec.prefill_chunk, head_mask=mask,
                           mask_mode=spec.mask_mode, attn=spec.attn)

        key = ("prefill", tokens.shape, size, spec, head_mask is None, self._plain(cache))
        if self.mesh is None:
            fn = self._jit(key, lambda: self.jit(run))
        else:
            csh, rep = self.cache_sharding(B, size, self._plain(cache)), shd.replicated(self.mesh)
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
        plain = self._plain(cache) and self.ring_for(cache.size) is not None
        fn = self.prefill_block_jit(cache.k.shape[1], cache.size, tokens.shape[1], spec, head_mask is not None, plain)
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
