"""Dry runs: will a sweep fit on a TPU slice? Per-device memory of the sweep step, without weights.

    python -m rhead_jax.dryrun --preset Yi-34B-200K --topology v5p-64 --context 200000
    python -m rhead_jax.dryrun --preset Mixtral-8x7B-v0.1 --smallest v5e --context 31947
    python -m rhead_jax.sweep --config yi34b.py --dry_run --topology v5p-64 [--dry_run_context 200000]

`plan(cfg, topology, context_len=..., batch_size=...)` builds the sweep's generate step exactly as
`rhead_jax.runner.Runner.generate` jits it (same function, same in/out shardings, same static
GenerateSpec), but on ABSTRACT arguments (`jax.ShapeDtypeStruct`s carrying NamedShardings, bf16
params): nothing is allocated and no checkpoint is read. It is lowered and compiled for the slice's
devices, and reports per device:

* analytic bytes from the shardings (each leaf's bytes / its number of shards): params, the
  batch's KV cache (argument), the returned KV cache (Runner does not donate the cache, so the
  output is a second copy), the resident shared-prefix cache (a 1-row cache that `run_sweep` keeps
  for the whole sweep when `config.sweep.share_prefix`; batch 1 cannot be split on "data", so every
  data shard holds it whole), prompts/lengths and the replicated outputs;
* the compiler's `memory_analysis()`: argument, output, alias, temp (activations and scratch) and
  generated-code sizes. The shared-prefix cache is passed as an extra, unused argument
  (`keep_unused=True`) so the compiler's accounting (and, on TPU, its out-of-memory check) holds it;
* total vs the chip's HBM, with a margin (default 5%) left for the runtime: fits yes/no, headroom.

Two compilers, chosen by `backend`:

* "tpu": the real XLA:TPU compiler, ahead of time and without TPUs (`jax.experimental.topologies`
  device descriptions for e.g. "v5p:4x4x2"). Needs the `libtpu` package matching jaxlib
  (`pip install "jax[tpu]==<jax version>"`; TPU VMs have it). Programs that exceed HBM fail to
  compile; the plan then reports the compiler's required bytes and "does not fit".
* "cpu": the slice's chips are stood in for by simulated CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=<chips>`, set before jax starts: the CLI and
  `sweep --dry_run` re-exec themselves with it when needed). The SPMD partitioning, shardings and
  argument/output sizes are the TPU program's, but temp comes from the CPU compiler, which computes
  bf16 dots and scatters in f32 (f32 copies of activations and of the whole KV cache around each
  cache update): CPU temp OVERESTIMATES the TPU's, from 1.2x to 28x in the README's comparison, so
  a CPU "fits" is conservative and a CPU "does not fit" is inconclusive. Loop-invariant code motion
  is disabled for these compiles: on CPU it would hoist f32 copies of every stacked weight out of
  the layer loop, an artifact that TPUs (bf16 matmuls) do not have.
* "auto" (default): "tpu" when `libtpu` can be imported, else "cpu".

Default mesh (`auto_mesh`), for a slice of N chips and a model with K KV heads and E experts:
  model  = the largest divisor of N that also divides K, at most `max_model` (8): the model axis
           splits params (heads, MLP columns, vocab) and the KV cache (KV heads); an axis that does
           not divide K would replicate the cache, and 8 is where the GQA models' KV heads end;
           then, while the data axis would exceed the batch (rows wasted on padding) and 2*model
           still divides gcd(N, K) and stays <= 2*max_model, model doubles;
  expert = gcd(N / model, E) for MoE models (experts on their own axis), else 1;
  data   = the rest (instances of a batch; Runner pads the batch to a multiple of it).
`plan(mesh=...)` takes explicit sizes instead ({"data": -1, "model": 8, "expert": 1} or a Mesh);
`sweep --dry_run` uses the config's `config.mesh` when its sizes fit the slice.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from functools import partial
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

GiB = 2 ** 30
MARGIN = 0.05          # share of HBM left for the TPU runtime, fragmentation, and estimate error
MAX_CPU_DEVICES = 256  # largest slice simulated on CPU devices by default
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}

# ----------------------------------------------------------------------------- TPU slices

# family -> (HBM GiB per chip, names count TensorCores (2 per chip) rather than chips, torus dims)
FAMILIES: dict[str, dict[str, Any]] = {
    "v4": dict(hbm_gib=32, cores_in_name=True, dims=3, prefix="v4"),
    "v5e": dict(hbm_gib=16, cores_in_name=False, dims=2, prefix="v5litepod"),
    "v5p": dict(hbm_gib=95, cores_in_name=True, dims=3, prefix="v5p"),
    "v6e": dict(hbm_gib=32, cores_in_name=False, dims=2, prefix="v6e"),
}
# slice sizes in CHIPS, smallest first (the sizes Cloud TPU sells as one slice)
SLICE_CHIPS = {
    "v4": [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
    "v5p": [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144],
    "v5e": [1, 4, 8, 16, 32, 64, 128, 256],
    "v6e": [1, 4, 8, 16, 32, 64, 128, 256],
}
_GRIDS = {
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
}
_NAME_RE = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice. `name` is the Cloud TPU accelerator type (v4-32, v5litepod-16, v5p-64, v6e-8)."""

    name: str
    family: str          # "v4", "v5e", "v5p", "v6e"
    chips: int           # devices JAX sees (one per chip; v4/v5p TensorCore pairs run as one megacore)
    hbm_bytes: int       # per chip
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)

    @property
    def grid(self) -> tuple[int, ...] | None:
        """Physical chip grid (x, y[, z]) of the slice, or None where we know no standard shape."""
        return _GRIDS[FAMILIES[self.family]["dims"]].get(self.chips)

    @property
    def tpu_topology_name(self) -> str | None:
        """The name `jax.experimental.topologies.get_topology_desc` takes, e.g. "v5p:2x2x2"."""
        g = self.grid
        return None if g is None else f"{self.family}:{'x'.join(map(str, g))}"


def _chips_per_host(family: str, chips: int) -> int:
    if family in ("v4", "v5p"):
        return min(4, chips)
    return chips if chips <= 8 else 4   # v5e/v6e: 1-, 4- and 8-chip single hosts; 4-chip hosts beyond


def parse_topology(name: str) -> Topology:
    """"v4-32" -> 16 chips; "v5litepod-16" (or "v5e-16") -> 16; "v5p-64" -> 32; "v6e-8" -> 8.

    v4 and v5p names count TensorCores (2 per chip); v5e and v6e names count chips.
    """
    m = _NAME_RE.match(str(name).strip().lower())
    if not m:
        raise ValueError(f"unknown TPU topology {name!r}; expected e.g. v4-32, v5litepod-16, v5p-64, v6e-8")
    prefix, n = m.group(1), int(m.group(2))
    family = {"v5litepod": "v5e"}.get(prefix, prefix)
    spec = FAMILIES[family]
    chips = n // 2 if spec["cores_in_name"] else n
    if spec["cores_in_name"] and n % 2:
        raise ValueError(f"{name}: {family} names count TensorCores (2 per chip); {n} is odd")
    if chips not in SLICE_CHIPS[family]:
        sizes = ", ".join(topology_name(family, c) for c in SLICE_CHIPS[family])
        raise ValueError(f"{name}: no {family} slice of {chips} chips; sizes: {sizes}")
    return Topology(name=topology_name(family, chips), family=family, chips=chips,
                    hbm_bytes=spec["hbm_gib"] * GiB, chips_per_host=_chips_per_host(family, chips))


def topology_name(family: str, chips: int) -> str:
    spec = FAMILIES[family]
    return f"{spec['prefix']}-{chips * 2 if spec['cores_in_name'] else chips}"


def family_slices(family: str) -> list[Topology]:
    if family not in FAMILIES:
        raise ValueError(f"unknown TPU family {family!r}; one of {', '.join(FAMILIES)}")
    return [parse_topology(topology_name(family, c)) for c in SLICE_CHIPS[family]]


# ----------------------------------------------------------------------------- meshes


def auto_mesh(cfg, chips: int, *, batch_size: int, max_model: int = 8) -> dict[str, int]:
    """The default (data, model, expert) sizes for `chips` devices (heuristic in the module doc)."""
    kv = math.gcd(chips, cfg.num_kv_heads)
    model = max(d for d in range(1, min(kv, max_model) + 1) if kv % d == 0)
    expert = math.gcd(chips // model, cfg.num_experts) if cfg.is_moe else 1
    while (chips // (model * expert) > batch_size and kv % (2 * model) == 0 and 2 * model <= 2 * max_model
           and chips % (2 * model * expert) == 0):
        model *= 2
    return {"data": chips // (model * expert), "model": model, "expert": expert}


def resolve_mesh_sizes(sizes: Mapping[str, int], chips: int) -> dict[str, int]:
    """Concrete sizes from a config.mesh-style mapping (one size may be -1); ValueError if they
    cannot cover exactly `chips` devices."""
    from rhead_jax.sharding import MESH_AXES

    out = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, v in out.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {out}")
    known = math.prod(v for v in out.values() if v != -1)
    if free:
        if chips % known:
            raise ValueError(f"mesh {out} does not divide {chips} chips")
        out[free[0]] = chips // known
    if math.prod(out.values()) != chips:
        raise ValueError(f"mesh {out} covers {math.prod(out.values())} devices, the slice has {chips} chips")
    return out


def _build_mesh(sizes: Mapping[str, int], devices, notes: list[str]):
    """rhead_jax.sharding.make_mesh on `devices`; if JAX cannot map the sizes onto the physical torus
    (e.g. model=8 on a 4x4x4 v5p slice), the same mesh with physical axes split, and a note: the sweep
    itself (sharding.make_mesh) would raise there."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from rhead_jax import sharding as shd

    try:
        return shd.make_mesh(sizes, devices=devices)
    except (NotImplementedError, ValueError, AssertionError) as e:
        notes.append(f"WARNING: rhead_jax.sharding.make_mesh({dict(sizes)}) raises on this topology "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); planned with physical axes "
                     "split (mesh_utils.create_device_mesh(allow_split_physical_axes=True)), which the "
                     "sweep needs too")
        shape = tuple(int(sizes[a]) for a in shd.MESH_AXES)
        arr = mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
        return Mesh(arr, shd.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


# ----------------------------------------------------------------------------- analytic sizes


def _spec_shards(spec, sizes: Mapping[str, int]) -> int:
    n = 1
    for ax in spec:
        for a in (ax if isinstance(ax, tuple) else (ax,)):
            if a is not None:
                n *= sizes[a]
    return n


def _shard_bytes(shape, dtype, spec, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array of `shape` sharded by `spec` (dims divide: the sharding
    rules replicate any that don't)."""
    import numpy as np

    total = math.prod(shape) * np.dtype(dtype).itemsize
    return total // _spec_shards(spec, sizes)


def analytic_bytes(cfg, sizes: Mapping[str, int], *, batch: int, prompt_len: int, cache_size: int,
                   max_new_tokens: int, top_k: int = 1, share_prefix: bool = True,
                   donate_cache: bool = False) -> dict[str, int]:
    """Per-device bytes from the shardings alone (no devices, no compile)."""
    import jax

    from rhead_jax import sharding as shd
    from rhead_jax.models.decoder import init_cache, param_shapes

    mesh_like = SimpleNamespace(shape=dict(sizes))   # logical_to_spec only reads mesh.shape
    params = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = "/".join(k.key for k in kp)
        spec = shd.logical_to_spec(shd.param_axes(cfg, path), leaf.shape, mesh_like, what=path)
        params += _shard_bytes(leaf.shape, leaf.dtype, spec, sizes)

    def cache_bytes(rows: int) -> int:
        shape = jax.eval_shape(lambda: init_cache(cfg, rows, cache_size))
        out = 0
        for name, axes in shd.CACHE_AXES.items():
            leaf = getattr(shape, name)
            spec = shd.logical_to_spec(axes, leaf.shape, mesh_like, what=f"cache/{name}")
            out += _shard_bytes(leaf.shape, leaf.dtype, spec, sizes)
        return out

    kv = cache_bytes(batch)
    data = sizes["data"] if batch % sizes["data"] == 0 else 1
    L, H = cfg.num_layers, cfg.num_heads
    inputs = (batch * prompt_len + batch) * 4 // data                  # prompts, lengths (int32)
    outputs = (batch * max_new_tokens + batch) * 4 + 2 * batch * max_new_tokens * L * H * top_k * 4  # replicated
    return {
        "params": params,
        "kv_cache": kv,
        "kv_cache_out": 0 if donate_cache else kv,
        "shared_prefix_cache": cache_bytes(1) if share_prefix else 0,
        "inputs": inputs,
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """Per-device memory of one sweep step on one slice. Byte counts are per device."""

    model: str
    topology: Topology
    mesh: dict[str, int]
    mesh_source: str
    context_len: int
    batch_size: int               # instances per batch as configured
    batch: int                    # rows compiled (batch_size rounded up to the data axis)
    prompt_len: int               # padded prompt length P
    prefill_width: int
    cache_size: int
    prefill_chunk: int
    max_new_tokens: int
    backend: str                  # "tpu" or "cpu"
    analytic: dict[str, int]
    compiled: dict[str, int] | None = None
    compile_error: str | None = None
    compile_seconds: float = 0.0
    margin: float = MARGIN
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def hbm_bytes(self) -> int:
        return self.topology.hbm_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.hbm_bytes * (1 - self.margin))

    @property
    def analytic_total(self) -> int:
        return sum(self.analytic.values())

    @property
    def temp_bytes(self) -> int | None:
        return None if self.compiled is None else self.compiled["temp"]

    @property
    def total_bytes(self) -> int:
        """Peak estimate: the compiled program's arguments (the resident shared-prefix cache among
        them) + outputs - aliased + temp + code; without a compile, the analytic lower bound."""
        c = self.compiled
        if c is None:
            return self.analytic_total
        if "required" in c:
            return c["required"]
        return c["argument"] + c["output"] - c["alias"] + c["temp"] + c["generated_code"]

    @property
    def fits(self) -> bool:
        return self.compile_error is None and self.total_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.total_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "topology": self.topology.name, "chips": self.topology.chips,
            "hosts": self.topology.hosts, "hbm_gib": self.hbm_bytes / GiB, "mesh": self.mesh,
            "mesh_source": self.mesh_source, "context_len": self.context_len, "batch_size": self.batch_size,
            "batch": self.batch, "prompt_len": self.prompt_len, "cache_size": self.cache_size,
            "prefill_chunk": self.prefill_chunk, "backend": self.backend,
            "analytic_gib": {k: v / GiB for k, v in self.analytic.items()},
            "compiled_gib": None if self.compiled is None else {k: v / GiB for k, v in self.compiled.items()},
            "compile_error": self.compile_error, "compile_seconds": round(self.compile_seconds, 1),
            "total_gib": self.total_bytes / GiB, "usable_gib": self.usable_bytes / GiB, "fits": self.fits,
            "headroom_gib": self.headroom_bytes / GiB, "notes": self.notes,
        }

    def table(self) -> str:
        t, g = self.topology, (lambda b: f"{b / GiB:9.2f}")
        donated = self.analytic["kv_cache_out"] == 0 and self.analytic["kv_cache"] > 0
        rows_per_dev = self.batch // self.mesh["data"] if self.batch % self.mesh["data"] == 0 else self.batch
        lines = [
            f"== dry run: {self.model} on {t.name} ({t.chips} chips, {t.hosts} host(s), "
            f"{t.hbm_bytes / GiB:g} GiB HBM per chip) ==",
            f"mesh: data={self.mesh['data']} model={self.mesh['model']} expert={self.mesh['expert']} "
            f"({self.mesh_source})",
            f"sweep step: batch {self.batch} ({rows_per_dev} row(s) per device), context {self.context_len} "
            f"-> prompt {self.prompt_len} (prefill width {self.prefill_width}), cache {self.cache_size} slots, "
            f"prefill chunk {self.prefill_chunk}, {self.max_new_tokens} new tokens, bf16",
            f"compiler: {_BACKEND_TEXT[self.backend]}",
            "",
            f"{'per device':48s} {'GiB':>9s}",
            f"{'params (analytic: leaf bytes / shards)':48s} {g(self.analytic['params'])}",
            f"{'KV cache, batch (analytic)':48s} {g(self.analytic['kv_cache'])}",
            f"{'KV cache, returned copy (analytic; ' + ('donated)' if donated else 'not donated)'):48s} "
            f"{g(self.analytic['kv_cache_out'])}",
            f"{'shared-prefix cache, resident (analytic)':48s} {g(self.analytic['shared_prefix_cache'])}",
            f"{'prompts, lengths (analytic)':48s} {g(self.analytic['inputs'])}",
            f"{'generated tokens, captured slots (analytic)':48s} {g(self.analytic['outputs'])}",
            f"{'analytic total (no activations)':48s} {g(self.analytic_total)}",
        ]
        c = self.compiled
        if c is not None and "required" not in c:
            lines += [
                f"{'compiler memory_analysis(): arguments':48s} {g(c['argument'])}",
                f"{'  outputs':48s} {g(c['output'])}",
                f"{'  aliased (outputs reusing arguments)':48s} {g(c['alias'])}",
                f"{'  temp (activations, scratch)':48s} {g(c['temp'])}",
                f"{'  generated code':48s} {g(c['generated_code'])}",
            ]
        elif c is not None:
            lines.append(f"{'compiler: memory required (out of memory)':48s} {g(c['required'])}")
        if self.compile_error:
            lines.append(f"compile error: {self.compile_error}")
        lines += [
            f"{'total':48s} {g(self.total_bytes)}",
            f"{'HBM per chip / usable (%d%% margin)' % round(100 * self.margin):48s} "
            f"{g(self.hbm_bytes)} / {self.usable_bytes / GiB:.2f}",
            (f"fits: yes, headroom {self.headroom_bytes / GiB:.2f} GiB "
             f"({100 * self.headroom_bytes / self.hbm_bytes:.0f}% of HBM)" if self.fits else
             f"fits: NO, over by {-self.headroom_bytes / GiB:.2f} GiB"),
        ]
        if self.compiled is None and self.compile_error is None:
            lines.append("(no compile: the analytic lower bound alone decides; activations not counted)")
        lines += [f"note: {n}" for n in self.notes]
        if self.backend == "cpu" and (self.compiled or self.compile_error):
            lines.append("note: CPU-compiled memory stands in for the TPU compiler's (simulated CPU devices); "
                         "its temp overestimates a TPU's (bf16 dots and cache updates computed in f32 on CPU): "
                         "'fits' is conservative, 'NO' inconclusive; install libtpu for the TPU compiler's numbers")
        lines.append(f"(compiled in {self.compile_seconds:.1f} s)" if self.compiled or self.compile_error else "")
        return "\n".join(l for l in lines if l is not None).rstrip()


_BACKEND_TEXT = {
    "tpu": "XLA:TPU, ahead of time for the slice's device description (libtpu, no TPU needed)",
    "cpu": "XLA:CPU on simulated devices standing in for the chips",
}


def tpu_compiler_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _backend(backend: str) -> str:
    if backend == "auto":
        return "tpu" if tpu_compiler_available() else "cpu"
    if backend not in ("tpu", "cpu"):
        raise ValueError(f"backend must be auto, tpu or cpu, got {backend!r}")
    if backend == "tpu" and not tpu_compiler_available():
        raise RuntimeError("backend='tpu' needs the libtpu package matching jaxlib "
                           "(pip install \"jax[tpu]==<your jax version>\"); or use backend='cpu'")
    return backend


def _devices(topology: Topology, backend: str):
    import jax

    if backend == "tpu":
        from jax.experimental import topologies

        # device descriptions only: never claim the machine's TPUs (a sweep may be running on them)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        name = topology.tpu_topology_name
        if name is None:
            raise ValueError(f"{topology.name}: no TPU device description for a non-power-of-two slice; "
                             "use backend='cpu'")
        kw = {"chip_config_name": "megacore"} if topology.family in ("v4", "v5p") else {}
        if topology.family in ("v5e", "v6e") and topology.chips <= 8:
            g = topology.grid
            kw["chips_per_host_bounds"] = (g[0], g[1], 1)
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)
    devs = jax.devices("cpu")
    if len(devs) < topology.chips:
        raise RuntimeError(
            f"{topology.name} needs {topology.chips} simulated devices, jax has {len(devs)} CPU devices: start "
            f"the process with XLA_FLAGS={DEVICE_COUNT_FLAG}={topology.chips} (python -m rhead_jax.dryrun and "
            "python -m rhead_jax.sweep --dry_run set it themselves)")
    return devs[:topology.chips]


_OOM_RE = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", re.S)
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def plan(cfg, topology: Topology | str, *, context_len: int, batch_size: int, max_new_tokens: int = 50,
         prefill_chunk: int = 4096, mesh: Any = None, pad_multiple: int = 64, q_chunk: int = 512,
         k_chunk: int = 512, share_prefix: bool = True, donate_cache: bool = False, backend: str = "auto",
         compile: bool = True, margin: float = MARGIN, model_name: str | None = None,
         max_model: int = 8) -> Plan:
    """Plan the sweep step of `cfg` at `context_len` on `topology`; see the module docstring.

    mesh: None (auto_mesh), a mapping of sizes ({"data": -1, "model": 8}), or a jax Mesh whose
      devices stand for the chips. compile=False: the analytic numbers only (no devices needed).
    """
    import jax
    import jax.numpy as jnp

    from rhead_jax import sharding as shd
    from rhead_jax.models.attention import AttentionOptions
    from rhead_jax.models.decoder import init_cache, param_shapes
    from rhead_jax.models.generate import GenerateSpec, cache_size_for, generate_impl

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    backend = _backend(backend) if compile else ("tpu" if backend == "tpu" else "cpu")
    notes: list[str] = []
    if cfg.dtype != "bfloat16":
        notes.append(f"params/activations in {cfg.dtype} (the paper configs run bfloat16)")
    limit = cfg.max_position_embeddings - max_new_tokens
    if context_len > limit:
        notes.append(f"context {context_len} + {max_new_tokens} new tokens exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}: the sweep refuses lengths > {limit}")
    mesh_obj = None
    if mesh is None:
        sizes, source = auto_mesh(cfg, topo.chips, batch_size=batch_size, max_model=max_model), "auto"
    elif isinstance(mesh, Mapping):
        sizes, source = resolve_mesh_sizes(mesh, topo.chips), "given"
    else:
        mesh_obj, sizes, source = mesh, dict(mesh.shape), "given Mesh"
        if mesh.size != topo.chips:
            raise ValueError(f"mesh has {mesh.size} devices, {topo.name} has {topo.chips} chips")
    data = sizes["data"]
    batch = -(-batch_size // data) * data
    spec = GenerateSpec(max_new_tokens=max_new_tokens, stop_tokens=(2,), top_k=1, mask_mode="zero",
                        prefill_chunk=prefill_chunk, attn=AttentionOptions(q_chunk=q_chunk, k_chunk=k_chunk))
    P = -(-context_len // pad_multiple) * pad_multiple
    width = P                       # worst case: a row that shares no prefix prefills its whole prompt
    S = cache_size_for(P, spec)
    analytic = analytic_bytes(cfg, sizes, batch=batch, prompt_len=P, cache_size=S, max_new_tokens=max_new_tokens,
                              share_prefix=share_prefix, donate_cache=donate_cache)
    p = Plan(model=model_name or cfg.model_type, topology=topo, mesh=sizes, mesh_source=source,
             context_len=context_len, batch_size=batch_size, batch=batch, prompt_len=P, prefill_width=width,
             cache_size=S, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, backend=backend,
             analytic=analytic, margin=margin, notes=notes)
    if batch != batch_size:
        notes.append(f"batch {batch_size} padded to {batch} rows for data={data} (as Runner does)")
    for ax, dim, what in (("model", cfg.num_kv_heads, "KV heads: the KV cache is replicated on it"),
                          ("model", cfg.num_heads, "query heads"), ("expert", cfg.num_experts or 1, "experts")):
        if sizes[ax] > 1 and dim % sizes[ax]:
            notes.append(f"{ax}={sizes[ax]} does not divide the {dim} {what}")
    if not compile:
        return p

    if mesh_obj is None:
        mesh_obj = _build_mesh(sizes, _devices(topo, backend), notes)
    param_sh = shd.param_shardings(cfg, mesh_obj)
    cache_shape = jax.eval_shape(lambda: init_cache(cfg, batch, S))
    cache_sh = shd.cache_shardings(cache_shape, mesh_obj)
    bsh, lsh = shd.batch_sharding((batch, P), mesh_obj), shd.batch_sharding((batch,), mesh_obj)
    abstract = lambda tree, shs: jax.tree.map(  # noqa: E731
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shs)
    args = [abstract(param_shapes(cfg), param_sh), jax.ShapeDtypeStruct((batch, P), jnp.int32, sharding=bsh),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=lsh), abstract(cache_shape, cache_sh), None, None]
    in_sh = [param_sh, bsh, lsh, cache_sh, None, None]
    step = partial(generate_impl, cfg=cfg, spec=spec, prefill_width=width)
    if share_prefix:
        # the resident 1-row shared-prefix cache: an unused argument, so the compiler counts it
        shared_shape = jax.eval_shape(lambda: init_cache(cfg, 1, S))
        shared_sh = shd.cache_shardings(shared_shape, mesh_obj)
        args.append(abstract(shared_shape, shared_sh))
        in_sh.append(shared_sh)
        fn = lambda p_, t_, l_, c_, pm, dm, _shared: step(p_, t_, l_, c_, pm, dm)  # noqa: E731
    else:
        fn = step
    jitted = jax.jit(fn, in_shardings=tuple(in_sh), out_shardings=(shd.generation_shardings(mesh_obj), cache_sh),
                     keep_unused=True, donate_argnums=(3,) if donate_cache else ())
    t0 = time.time()
    try:
        lowered = jitted.lower(*args)
        compiled = lowered.compile(CPU_COMPILER_OPTIONS if backend == "cpu" else None)
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error is a result, not a crash
        p.compile_seconds = time.time() - t0
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        m = _OOM_RE.search(str(e))
        if m or "RESOURCE_EXHAUSTED" in str(e):
            p.compile_error = msg[:400]
            if m:
                p.compiled = {"required": int(float(m.group(1)) * _UNIT[m.group(2)]),
                              "available": int(float(m.group(3)) * _UNIT[m.group(4)])}
            return p
        raise
    p.compile_seconds = time.time() - t0
    ma = compiled.memory_analysis()
    p.compiled = {
        "argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
        "generated_code": int(ma.generated_code_size_in_bytes),
    }
    return p


# ----------------------------------------------------------------------------- smallest slice


def find_smallest_slice(cfg, family: str, context_len: int, batch_size: int, *, max_chips: int | None = None,
                        on_attempt: Callable[[Plan], None] | None = None, **plan_kw) -> Plan | None:
    """The plan of the smallest slice of `family` ("v4", "v5e", "v5p", "v6e") whose sweep step fits,
    or None. Slices are tried in increasing size with `auto_mesh`; one whose analytic lower bound
    (params + KV caches, no activations) already exceeds HBM is not compiled. The search stops
    early when more chips no longer lower that bound (the data axis has outgrown the batch and the
    model axis cannot grow): no larger slice of the family can fit then.

    max_chips: largest slice tried (default: MAX_CPU_DEVICES with the CPU backend, no limit on TPU).
    on_attempt(plan) is called with every plan (analytic-only ones included).
    """
    backend = _backend(plan_kw.pop("backend", "auto"))
    if max_chips is None and backend == "cpu":
        max_chips = MAX_CPU_DEVICES
    if plan_kw.get("mesh") is not None:
        raise ValueError("find_smallest_slice chooses meshes itself (auto_mesh); do not pass mesh")
    plan_kw.pop("mesh", None)
    best_bound = None
    for topo in family_slices(family):
        if max_chips is not None and topo.chips > max_chips:
            break
        if backend == "tpu" and topo.tpu_topology_name is None:
            continue
        bound = plan(cfg, topo, context_len=context_len, batch_size=batch_size, backend=backend, compile=False,
                     **plan_kw)
        stalled = best_bound is not None and bound.analytic_total >= best_bound
        best_bound = bound.analytic_total if best_bound is None else min(best_bound, bound.analytic_total)
        if bound.analytic_total > bound.usable_bytes:
            bound.notes.append("not compiled: the analytic lower bound exceeds usable HBM")
            if stalled:
                bound.notes.append("larger slices of this family do not lower the per-device bound: search stopped")
            if on_attempt:
                on_attempt(bound)
            if stalled:
                return None
            continue
        p = plan(cfg, topo, context_len=context_len, batch_size=batch_size, backend=backend, **plan_kw)
        if on_attempt:
            on_attempt(p)
        if p.fits:
            return p
    return None


# ----------------------------------------------------------------------------- processes


def ensure_cpu_devices(n: int) -> None:
    """Make sure jax will have >= n CPU devices: set XLA_FLAGS if jax has not started its backends
    yet, else re-exec this process (same command line) with the flag set."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    cur = re.search(rf"{DEVICE_COUNT_FLAG}=(\d+)", flags)
    if cur and int(cur.group(1)) >= n:
        return
    new = (re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", flags) + f" {DEVICE_COUNT_FLAG}={n}").strip()
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = new
        return
    import jax

    if len(jax.devices("cpu")) >= n:
        return
    if os.environ.get("RHEAD_DRYRUN_REEXEC"):
        raise RuntimeError(f"still {len(jax.devices('cpu'))} CPU devices after re-exec; set XLA_FLAGS="
                           f"{DEVICE_COUNT_FLAG}={n} before starting python")
    env = {**os.environ, "XLA_FLAGS": new, "RHEAD_DRYRUN_REEXEC": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), env)


def prepare_process(chips: int, backend: str = "auto") -> str:
    """Call before jax starts (CLIs): picks the backend and, for "cpu", arranges `chips` devices.

    Dry runs never need an attached accelerator (TPU plans use device descriptions), so JAX_PLATFORMS
    defaults to cpu here: a dry run on a TPU VM leaves its TPUs (and a running sweep) alone.
    """
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    b = _backend(backend)
    if b == "cpu":
        ensure_cpu_devices(chips)
    return b


# ----------------------------------------------------------------------------- configs (sweep --dry_run)


def model_config_for(config, config_path: str | None = None):
    """(ModelConfig, label, source) for a sweep config: `<model.path>/config.json` when it exists
    (a real checkpoint's config takes precedence), else the preset named by model.name or by the
    config file's stem (rhead_jax.presets.CONFIG_PRESETS)."""
    from pathlib import Path

    from rhead_jax import presets
    from rhead_jax.models.config import ModelConfig

    dtype = config.model.dtype
    path = Path(str(config.model.path))
    if (path / "config.json").is_file():
        cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), dtype=dtype)
        return cfg, config.model.name or path.name, f"{path / 'config.json'}"
    candidates = [config.model.name, path.name]
    if config_path:
        candidates.append(Path(str(config_path).partition(":")[0]).stem)
    for c in candidates:
        try:
            name = presets.resolve_preset(c) if c else None
        except KeyError:
            continue
        if name:
            return presets.preset_config(name, dtype=dtype), name, f"preset {name!r} (transcribed config.json)"
    raise ValueError(f"no config.json under {path} and no preset matches {candidates}; presets: "
                     f"{', '.join(presets.preset_names())}")


def paper_context(config, cfg) -> tuple[int, list[int]]:
    """The longest of config.sweep.lengths the model accepts, and the lengths it refuses."""
    limit = cfg.max_position_embeddings - config.sweep.max_new_tokens
    lengths = sorted(int(x) for x in config.sweep.lengths)
    ok = [x for x in lengths if x <= limit]
    return (max(ok) if ok else max(lengths)), [x for x in lengths if x > limit]


def sweep_dry_run(config, *, topology: str, context_len: int | None = None, config_path: str | None = None,
                  mesh: str = "config", backend: str = "auto") -> Plan:
    """What `python -m rhead_jax.sweep --dry_run` prints: the plan of the config's model at its longest
    paper context (or `context_len`) on `topology`, with the config's batch, chunks and mesh."""
    topo = parse_topology(topology)
    cfg, label, source = model_config_for(config, config_path)
    notes = [f"model config: {source}"]
    if context_len is None:
        context_len, refused = paper_context(config, cfg)
        if refused:
            notes.append(f"config.sweep.lengths {refused} exceed the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings} - {config.sweep.max_new_tokens}: the sweep refuses this "
                         f"config until they are dropped; planned the longest accepted length, {context_len}")
    mesh_sizes = None
    if mesh == "config":
        try:
            mesh_sizes = resolve_mesh_sizes(dict(config.mesh), topo.chips)
        except ValueError as e:
            notes.append(f"config.mesh does not fit {topo.name} ({e}); using the auto mesh")
    elif mesh != "auto":
        raise ValueError(f"mesh must be 'config' or 'auto', got {mesh!r}")
    s = config.sweep
    p = plan(cfg, topo, context_len=context_len, batch_size=s.batch_size, max_new_tokens=s.max_new_tokens,
             prefill_chunk=s.prefill_chunk, mesh=mesh_sizes, pad_multiple=s.pad_multiple, q_chunk=s.q_chunk,
             k_chunk=s.k_chunk, share_prefix=s.share_prefix, backend=backend, model_name=label)
    if mesh_sizes is not None:
        p.mesh_source = "config.mesh"
    p.notes[:0] = notes
    return p


def sweep_cli(config, *, topology: str | None, context_len: int | None = None, config_path: str | None = None,
              mesh: str = "config", backend: str = "auto") -> int:
    """`python -m rhead_jax.sweep --dry_run`: prints the plan; call before jax has started."""
    if not topology:
        raise ValueError("--dry_run needs --topology, e.g. --topology v5p-64 (v4-32, v5litepod-16, v6e-8, ...)")
    backend = prepare_process(parse_topology(topology).chips, backend)
    p = sweep_dry_run(config, topology=topology, context_len=context_len, config_path=config_path, mesh=mesh,
                      backend=backend)
    print(p.table(), flush=True)
    return 0


# ----------------------------------------------------------------------------- CLI


def _parse_mesh(text: str | None):
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rhead_jax.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", help="preset model name (rhead_jax.presets) or a configs/ stem")
    ap.add_argument("--hf_config", help="a checkpoint's config.json instead of a preset")
    ap.add_argument("--topology", help="e.g. v4-32, v5litepod-16, v5p-64, v6e-8")
    ap.add_argument("--smallest", metavar="FAMILY", help="find the smallest slice of v4/v5e/v5p/v6e that fits")
    ap.add_argument("--context", type=int, required=True, help="context length in tokens")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=50)
    ap.add_argument("--prefill_chunk", type=int, default=4096)
    ap.add_argument("--mesh", help="sizes, e.g. data=-1,model=8,expert=1 (default: auto)")
    ap.add_argument("--no_share_prefix", action="store_true", help="plan without the resident shared-prefix cache")
    ap.add_argument("--donate_cache", action="store_true", help="plan with the cache argument donated")
    ap.add_argument("--backend", default="auto", choices=("auto", "tpu", "cpu"))
    ap.add_argument("--max_chips", type=int, help="largest slice --smallest tries")
    ap.add_argument("--json", action="store_true", help="print the plan(s) as JSON lines too")
    a = ap.parse_args(argv)
    if bool(a.topology) == bool(a.smallest):
        ap.error("give exactly one of --topology and --smallest")
    if a.smallest:
        chips = max(t.chips for t in family_slices(a.smallest))
        chips = min(chips, a.max_chips or MAX_CPU_DEVICES)
    else:
        chips = parse_topology(a.topology).chips
    backend = prepare_process(chips, a.backend)

    from rhead_jax import presets
    from rhead_jax.models.config import ModelConfig

    if a.hf_config:
        with open(a.hf_config) as f:
            cfg, label = ModelConfig.from_hf(json.load(f), dtype="bfloat16"), a.hf_config
    elif a.preset:
        label = presets.resolve_preset(a.preset)
        cfg = presets.preset_config(label)
    else:
        ap.error("give --preset or --hf_config")
    kw = dict(batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, prefill_chunk=a.prefill_chunk,
              share_prefix=not a.no_share_prefix, donate_cache=a.donate_cache, backend=backend, model_name=label)
    if a.topology:
        p = plan(cfg, a.topology, context_len=a.context, mesh=_parse_mesh(a.mesh), **kw)
        print(p.table(), flush=True)
        if a.json:
            print("JSON " + json.dumps(p.as_dict()), flush=True)
        return 0

    def show(p: Plan):
        verdict = ("fits" if p.fits else "does not fit") + ("" if p.compiled or p.compile_error else " (analytic)")
        print(f"-- {p.topology.name}: mesh {p.mesh}, total {p.total_bytes / GiB:.2f} GiB of "
              f"{p.usable_bytes / GiB:.2f} usable: {verdict}", flush=True)
        if a.json:
            print("JSON " + json.dumps(p.as_dict()), flush=True)

    found = find_smallest_slice(cfg, a.smallest, a.context, a.batch_size, max_chips=a.max_chips, on_attempt=show,
                                **{k: v for k, v in kw.items() if k != "batch_size"})
    if found is None:
        print(f"no {a.smallest} slice (up to {a.max_chips or 'the largest'} chips) fits {label} at {a.context} tokens")
        return 1
    print(found.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
