"""Per-device memory of a sweep batch on a slice: the mesh, the analytic bytes, and the `Plan`.

A batch runs three kinds of programs (rhead_jax.engine.Engine.generate): the cache set-up
(`Runner.rows` from the shared prefix, or `Runner.init_cache`), prefill calls of one row block
(`Runner.prefill_block`) and the decode loop (`Runner.decode`); the batch's KV cache is donated
through every call, so it exists once. Analytic bytes come from the shardings alone (each leaf's
bytes / its number of shards; no devices, no compile): params, the batch's KV cache, the resident
shared-prefix cache (a 1-row cache the engine keeps for the whole sweep when
`config.sweep.share_prefix`; batch 1 cannot be split on "data", so every data shard holds it whole),
one prefill call's tokens/positions and the decode loop's inputs, and the replicated outputs. A `Plan`
adds each program's `memory_analysis()` (rhead_jax.dryrun.planner): the peak is the largest of the
programs' (arguments + outputs - aliased + temp + code + what stays resident besides its
arguments), i.e. params + cache + shared prefix + the largest temp; it is judged against the chip's
HBM less a margin (default 5%) left for the runtime.

Default mesh (`auto_mesh`), for a slice of N chips and a model with K KV heads and E experts:
  model  = the largest divisor of N that also divides K, at most `max_model` (8): the model axis
           splits params (heads, MLP columns, vocab) and the KV cache (KV heads); an axis that does
           not divide K would replicate the cache, and 8 is where the GQA models' KV heads end;
           then, while the data axis would exceed the batch (rows wasted on padding) and 2*model
           still divides gcd(N, K) and stays <= 2*max_model, model doubles;
  expert = gcd(N / model, E) for MoE models (experts on their own axis), else 1;
  data   = the rest (instances of a batch; Runner pads the batch to a multiple of it).
Explicit sizes ({"data": -1, "model": 8}, config.mesh) are resolved by `rhead_jax.sharding.mesh_shape`,
the function the sweep's own mesh (`sharding.make_mesh`) uses.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any, Mapping

import jax
import numpy as np

from rhead_jax import sharding as shd
from rhead_jax.dryrun.topology import GiB, Topology
from rhead_jax.models.cache import init_cache, ring_size_for
from rhead_jax.models.decoder import param_shapes

MARGIN = 0.05          # share of HBM left for the TPU runtime, fragmentation, and estimate error

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


def padded_batch(batch_size: int, data: int) -> int:
    """Rows compiled: `batch_size` rounded up to a multiple of the data axis (as Runner pads it)."""
    return -(-batch_size // data) * data


def rows_per_device(batch: int, data: int) -> int:
    """Rows of a [batch, ...] array each device holds: split on "data" when it divides, else all."""
    return batch // data if batch % data == 0 else batch


# ----------------------------------------------------------------------------- analytic sizes


def spec_shards(spec, sizes: Mapping[str, int]) -> int:
    """Number of shards a PartitionSpec cuts an array into on a mesh of `sizes`."""
    n = 1
    for ax in spec:
        for a in (ax if isinstance(ax, tuple) else (ax,)):
            if a is not None:
                n *= sizes[a]
    return n


def shard_bytes(shape, dtype, spec, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array of `shape` sharded by `spec` (dims divide: the sharding
    rules replicate any that don't)."""
    total = math.prod(shape) * np.dtype(dtype).itemsize
    return total // spec_shards(spec, sizes)


def params_bytes(cfg, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of the parameters under `rhead_jax.sharding`'s rules on a mesh of `sizes`."""
    mesh_like = SimpleNamespace(shape=dict(sizes))   # logical_to_spec only reads mesh.shape
    out = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = "/".join(k.key for k in kp)
        spec = shd.logical_to_spec(shd.param_axes(cfg, path), leaf.shape, mesh_like, what=path)
        out += shard_bytes(leaf.shape, leaf.dtype, spec, sizes)
    return out


def cache_bytes(cfg, sizes: Mapping[str, int], *, rows: int, cache_size: int, plain: bool = False) -> int:
    """Per-device bytes of a [rows]-row KV cache of `cache_size` slots (k, v, pos, length): the
    batch caches' kind (windowed for a model with local layers: their rings hold the window, not
    the context; models.cache.ring_size_for), or the plain cache (`plain`: the shared prefix)."""
    mesh_like = SimpleNamespace(shape=dict(sizes))
    ring = None if plain else ring_size_for(cfg, cache_size)
    shape = jax.eval_shape(lambda: init_cache(cfg, rows, cache_size, ring=ring))
    out = 0
    for name, axes in shd.CACHE_AXES.items():
        leaf = getattr(shape, name)
        if leaf is None:
            continue
        spec = shd.logical_to_spec(axes, leaf.shape, mesh_like, what=f"cache/{name}")
        out += shard_bytes(leaf.shape, leaf.dtype, spec, sizes)
    return out


def mixed_cache_bytes(cfg, layout, sizes: Mapping[str, int], *, rows: int, cache_size: int,
                      ring: int | None = None) -> int:
    """Per-device bytes of a [rows]-row mixed KV cache (rhead_jax.models.mixed) of `cache_size` positions."""
    from rhead_jax.mixedkv.runner import CACHE_AXES as MIXED_AXES
    from rhead_jax.models.mixed import init_mixed_cache

    mesh_like = SimpleNamespace(shape=dict(sizes))
    shape = jax.eval_shape(lambda: init_mixed_cache(cfg, layout, rows, cache_size, ring=ring))
    out = 0
    for name, axes in MIXED_AXES.items():
        leaf = getattr(shape, name)
        spec = shd.logical_to_spec(axes, leaf.shape, mesh_like, what=f"mixed_cache/{name}")
        out += shard_bytes(leaf.shape, leaf.dtype, spec, sizes)
    return out


def analytic_bytes(cfg, sizes: Mapping[str, int], *, batch: int, prefill_width: int, cache_size: int,
                   max_new_tokens: int, top_k: int = 1, share_prefix: bool = True,
                   prefix_branches: int = 0) -> dict[str, int]:
    """Per-device bytes from the shardings alone (no devices, no compile). The batch's cache is
    counted once: every program of a batch takes it donated and returns it in place. The
    shared-prefix cache counts its reference row and, with config.sweep.prefix_branches, that many
    branch rows at the batch's cache size (an upper bound: the engine picks fewer, often shorter)."""
    kv = cache_bytes(cfg, sizes, rows=batch, cache_size=cache_size)
    d = sizes["data"]
    data = d if batch % d == 0 else 1
    L, H = cfg.num_layers, cfg.num_heads
    inputs = 2 * prefill_width * 4 + 2 * batch * 4 // data      # one prefill call's tokens, positions; first, lens
    outputs = (batch * max_new_tokens + batch) * 4 + 2 * batch * max_new_tokens * L * H * top_k * 4  # replicated
    return {
        "params": params_bytes(cfg, sizes),
        "kv_cache": kv,
        "shared_prefix_cache": (cache_bytes(cfg, sizes, rows=1, cache_size=cache_size, plain=True)
                                + (cache_bytes(cfg, sizes, rows=-(-prefix_branches // d) * d, cache_size=cache_size,
                                               plain=True)
                                   if prefix_branches else 0)) if share_prefix else 0,
        "inputs": inputs,
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------- the plan


PROGRAMS = {"setup": "cache set-up", "prefill": "prefill call", "decode": "decode loop"}


def program_peak(c: Mapping[str, int]) -> int:
    """Per-device peak while one compiled program runs: its arguments + outputs - aliased + temp +
    code, plus what stays resident besides its arguments (`resident`); or, when it did not fit, the
    compiler's required bytes + `resident`."""
    if "required" in c:
        return c["required"] + c.get("resident", 0)
    return c["argument"] + c["output"] - c["alias"] + c["temp"] + c["generated_code"] + c.get("resident", 0)


@dataclasses.dataclass
class Plan:
    """Per-device memory of one sweep batch on one slice. Byte counts are per device.

    compiled: per program ("setup", "prefill", "decode"; see PROGRAMS) the compiler's
    memory_analysis() ("argument", "output", "alias", "temp", "generated_code") and "resident": the
    bytes that stay on the device besides its arguments (params during the set-up, the shared-prefix
    cache during prefill and decode); a program that did not fit has "required" / "available"."""

    model: str
    topology: Topology
    mesh: dict[str, int]
    mesh_source: str
    context_len: int
    batch_size: int               # instances per batch as configured
    batch: int                    # rows compiled (batch_size rounded up to the data axis)
    prompt_len: int               # padded prompt length P
    prefill_width: int            # the widest prefill call (tokens per row of a row block)
    cache_size: int
    prefill_chunk: int
    max_new_tokens: int
    backend: str                  # "tpu" or "cpu"
    analytic: dict[str, int]
    attention: str = "chunked"    # the prefill calls' attention: "splash" (XLA:TPU) or "chunked"
    compiled: dict[str, dict[str, int]] | None = None
    mixed: dict[str, Any] | None = None   # a mixed KV cache's plan: full_fraction, full heads, layout, sink, recent
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
        """The largest temp of the compiled programs."""
        if not self.compiled:
            return None
        return max(c.get("temp", 0) for c in self.compiled.values())

    @property
    def peak_program(self) -> str | None:
        if not self.compiled:
            return None
        return max(self.compiled, key=lambda k: program_peak(self.compiled[k]))

    @property
    def total_bytes(self) -> int:
        """Peak estimate: the largest `program_peak` of the compiled programs (params + the batch's
        cache + the shared prefix + that program's temp, code and small buffers); without a compile,
        the analytic lower bound."""
        if not self.compiled:
            return self.analytic_total
        return max(program_peak(c) for c in self.compiled.values())

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
            "batch": self.batch, "prompt_len": self.prompt_len, "prefill_width": self.prefill_width,
            "cache_size": self.cache_size, "prefill_chunk": self.prefill_chunk, "backend": self.backend,
            "attention": self.attention,
            "analytic_gib": {k: v / GiB for k, v in self.analytic.items()},
            "compiled_gib": None if self.compiled is None else
            {p: {k: v / GiB for k, v in c.items() if not k.startswith("cost_")} for p, c in self.compiled.items()},
            "cost_analysis": None if self.compiled is None else
            {p: {k[5:]: v for k, v in c.items() if k.startswith("cost_")} for p, c in self.compiled.items()},
            "temp_gib": None if self.temp_bytes is None else self.temp_bytes / GiB,
            "peak_program": self.peak_program,
            "compile_error": self.compile_error, "compile_seconds": round(self.compile_seconds, 1),
            "total_gib": self.total_bytes / GiB, "usable_gib": self.usable_bytes / GiB, "fits": self.fits,
            "headroom_gib": self.headroom_bytes / GiB, "mixed": self.mixed, "notes": self.notes,
        }

    def table(self) -> str:
        t, g = self.topology, (lambda b: f"{b / GiB:9.2f}")
        rows_per_dev = rows_per_device(self.batch, self.mesh["data"])
        kv_label, mx = "KV cache", self.mixed
        if mx:
            kv_label = f"mixed KV cache ({100 * mx['full_fraction']:g}% full)"
        per = "chip" if t.physical_chips == t.chips else "device"   # TPU7x: 2 devices per chip
        size = f"{t.chips} chips" if per == "chip" else f"{t.physical_chips} chips = {t.chips} devices"
        lines = [
            f"== dry run: {self.model} on {t.name} ({size}, {t.hosts} host(s), "
            f"{t.hbm_bytes / GiB:g} GiB HBM per {per}) ==",
            f"mesh: data={self.mesh['data']} model={self.mesh['model']} expert={self.mesh['expert']} "
            f"({self.mesh_source})",
            f"sweep batch: {self.batch} rows ({rows_per_dev} per device), context {self.context_len} "
            f"-> prompt {self.prompt_len}, cache {self.cache_size} slots (donated through every call), "
            f"prefill calls of up to {self.prefill_width} tokens per row block (prefill chunk {self.prefill_chunk}), "
            f"{self.max_new_tokens} new tokens, bf16",
            f"compiler: {_BACKEND_TEXT[self.backend]}",
            f"prefill attention: {self.attention}" + (" (Pallas splash attention kernel)" if self.attention == "splash"
                                                      else " (models.attention.chunked_attention)"),
        ] + ([
            f"mixed KV cache: {mx['full_heads']} of {mx['kv_heads']} KV heads full, the rest streaming (sink "
            f"{mx['sink']} + recent {mx['recent']}); {mx['groups']} head group(s) on 'model', per group "
            f"{mx['full_slots']} full and {mx['ring_slots']} ring (layer, head) caches; plain cache "
            f"{mx['full_cache_bytes'] / GiB:.2f} GiB per device"] if mx else []) + [
            "",
            f"{'per device':48s} {'GiB':>9s}",
            f"{'params (analytic: leaf bytes / shards)':48s} {g(self.analytic['params'])}",
            f"{kv_label + ', batch (analytic; donated, held once)':48s} {g(self.analytic['kv_cache'])}",
            f"{'shared-prefix cache, resident (analytic)':48s} {g(self.analytic['shared_prefix_cache'])}",
            f"{'prefill tokens, decode inputs (analytic)':48s} {g(self.analytic['inputs'])}",
            f"{'generated tokens, captured slots (analytic)':48s} {g(self.analytic['outputs'])}",
            f"{'analytic total (no activations)':48s} {g(self.analytic_total)}",
        ]
        c = self.compiled or {}
        if c:
            names = list(c)
            lines += ["", f"{'compiler memory_analysis()':36s}" + "".join(f"{PROGRAMS.get(n, n):>16s}" for n in names)]
            for key, label in (("argument", "arguments"), ("output", "outputs"),
                               ("alias", "aliased (outputs reusing arguments)"),
                               ("temp", "temp (activations, scratch)"),
                               ("generated_code", "generated code"), ("resident", "resident besides arguments"),
                               ("required", "required (did not fit)")):
                if any(key in c[n] for n in names):
                    lines.append(f"{'  ' + label:36s}" + "".join(
                        f"{c[n][key] / GiB:16.2f}" if key in c[n] else f"{'':16s}" for n in names))
            lines.append(f"{'  peak while it runs':36s}" + "".join(f"{program_peak(c[n]) / GiB:16.2f}" for n in names))
            lines.append("")
        if self.compile_error:
            lines.append(f"compile error: {self.compile_error}")
        peak = self.peak_program
        total_label = f"total (peak: {PROGRAMS.get(peak, peak)})" if c else "total (analytic)"
        lines += [
            f"{total_label:48s} {g(self.total_bytes)}",
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
