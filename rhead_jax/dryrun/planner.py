"""Plans: the programs of a sweep batch on a slice, lowered and compiled without weights or TPUs.

`plan(cfg, topology, context_len=..., batch_size=...)` compiles the programs `Engine.generate` runs
for one batch, built by the same `Runner` methods its calls use (same functions, in/out shardings,
donation and static GenerateSpec), on ABSTRACT arguments (`jax.ShapeDtypeStruct`s carrying
NamedShardings): nothing is allocated and no checkpoint is read. The programs:
  setup    `Runner.rows_jit` (a batch cache from the shared prefix) or `Runner.init_cache_jit`
  prefill  `Runner.prefill_block_jit` at the widest call the batch makes (cache donated)
  decode   `Runner.decode_jit`, the greedy decode loop with capture (cache donated)
With config.sweep.extra_scores (`extra_scores=`), prefill and decode are the programs that also
reduce the extra scores' attention masses (and take their targets), so their memory shows.
The shared-prefix cache the engine keeps resident is not an argument of prefill or decode: it is
added to their peak (`memory.program_peak`). With `mixed=` the same three programs are the
MixedRunner's (rhead_jax.mixedkv: a mixed KV cache of full and streaming heads). A program that exceeds HBM fails to compile on TPU;
the plan then reports the compiler's required bytes and "does not fit".

With the CPU backend (rhead_jax.dryrun.devices) the SPMD partitioning, shardings and argument/output
sizes are the TPU program's, but temp comes from the CPU compiler, which computes bf16 dots and
scatters in f32 (f32 copies of activations and of the whole KV cache around each cache update):
CPU temp OVERESTIMATES the TPU's, from 1.2x to 28x in the README's comparison, so a CPU "fits" is
conservative and a CPU "does not fit" is inconclusive.

`plan`'s step settings default to the config schema's (`rhead_jax.config.default_config().sweep`:
prefill chunk, tiles, padding, new tokens), so a plan with defaults is the step a default sweep runs.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from rhead_jax import presets
from rhead_jax import sharding as shd
from rhead_jax.config import default_config
from rhead_jax.dryrun import devices as dev
from rhead_jax.dryrun.memory import (MARGIN, Plan, analytic_bytes, auto_mesh, cache_bytes, mixed_cache_bytes,
                                     padded_batch)
from rhead_jax.dryrun.topology import GiB, Topology, family_slices, parse_topology
from rhead_jax.engine import extra_score_masses
from rhead_jax.errors import UserError
from rhead_jax.models.attention import AttentionOptions, MassTargets
from rhead_jax.models.cache import init_cache, ring_size_for
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes
from rhead_jax.models.generate import GenerateSpec, cache_size_for, prefill_pieces, prefill_widths
from rhead_jax.runner import Runner

SWEEP_DEFAULTS = default_config().sweep   # the one home of the step settings' defaults
_OOM_RE = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", re.S)
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def context_limit(cfg: ModelConfig, max_new_tokens: int) -> int:
    """The longest context the sweep accepts for a model: its positions less the new tokens."""
    return cfg.max_position_embeddings - max_new_tokens


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings`: arguments that allocate nothing."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _abstract_targets(rows: int, masses: int, mesh) -> MassTargets:
    """Abstract MassTargets of `rows` rows (split along "data", as the Runner puts them)."""
    def arg(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shd.batch_sharding(shape, mesh))

    return MassTargets(span=arg((rows, 2)), queries=arg((rows, masses, 2)), period=arg((rows,)), start=arg((rows,)))


def compiler_oom(error: BaseException) -> tuple[str, dict[str, int] | None] | None:
    """(message, {"required", "available"} bytes or None) when `error` is the compiler's out-of-memory
    error (a result of the plan, not a crash), else None."""
    text = str(error)
    m = _OOM_RE.search(text)
    if not (m or "RESOURCE_EXHAUSTED" in text):
        return None
    msg = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    sizes = None if m is None else {"required": int(float(m.group(1)) * _UNIT[m.group(2)]),
                                    "available": int(float(m.group(3)) * _UNIT[m.group(4)])}
    return msg[:400], sizes


def plan(cfg: ModelConfig, topology: Topology | str, *, context_len: int, batch_size: int,
         max_new_tokens: int = SWEEP_DEFAULTS.max_new_tokens, prefill_chunk: int = SWEEP_DEFAULTS.prefill_chunk,
         mesh: Any = None, pad_multiple: int = SWEEP_DEFAULTS.pad_multiple, q_chunk: int = SWEEP_DEFAULTS.q_chunk,
         k_chunk: int = SWEEP_DEFAULTS.k_chunk, share_prefix: bool = SWEEP_DEFAULTS.share_prefix,
         prefix_branches: int = SWEEP_DEFAULTS.prefix_branches,
         extra_scores: tuple[str, ...] = tuple(SWEEP_DEFAULTS.extra_scores), backend: str = "auto",
         compile: bool = True, margin: float = MARGIN,
         model_name: str | None = None, max_model: int = 8, mixed: Mapping[str, Any] | None = None,
         attention: str = SWEEP_DEFAULTS.attention) -> Plan:
    """Plan a sweep batch of `cfg` at `context_len` on `topology` (see the module docstring).

    mesh: None (auto_mesh), a mapping of sizes ({"data": -1, "model": 8}), or a jax Mesh whose
      devices stand for the chips. compile=False: the analytic numbers only (no devices needed).
    attention: the prefill attention ("auto": splash with the TPU compiler, chunked with the CPU one;
      "chunked"; "splash"), as AttentionOptions.for_platform("tpu", attention) takes it.
    mixed: {"full_fraction", "sink", "recent"}: plan the batch with a mixed KV cache
      (rhead_jax.mixedkv) instead, its full heads spread evenly over the model axis (layer-major
      order: the best case; a ranking that piles full heads onto one KV-head index needs more).
    """
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    backend = dev.resolve_backend(backend) if compile else ("tpu" if backend == "tpu" else "cpu")
    notes: list[str] = []
    if cfg.dtype != "bfloat16":
        notes.append(f"params/activations in {cfg.dtype} (the paper configs run bfloat16)")
    limit = context_limit(cfg, max_new_tokens)
    if not 1 <= context_len <= cfg.max_position_embeddings:
        raise UserError(f"context {context_len} is out of range for {model_name or cfg.model_type}: it holds "
                        f"{cfg.max_position_embeddings} positions and the sweep accepts contexts up to {limit} "
                        f"(+ {max_new_tokens} new tokens); give a context length in 1..{limit}")
    if context_len > limit:
        notes.append(f"context {context_len} + {max_new_tokens} new tokens exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}: the sweep refuses lengths > {limit}")
    mesh_obj = None
    if mesh is None:
        sizes, source = auto_mesh(cfg, topo.chips, batch_size=batch_size, max_model=max_model), "auto"
    elif isinstance(mesh, Mapping):
        sizes, source = shd.mesh_shape(mesh, topo.chips, what=f"the {topo.name} mesh"), "given"
    else:
        mesh_obj, sizes, source = mesh, dict(mesh.shape), "given Mesh"
        if mesh.size != topo.chips:
            raise UserError(f"the given mesh has {mesh.size} devices, {topo.name} has {topo.chips} chips; "
                            f"give a mesh of {topo.chips} devices")
    data = sizes["data"]
    batch = padded_batch(batch_size, data)
    # the TPU program's cache writes, whichever compiler stands in (the engine on TPUs picks the same),
    # and its prefill attention: splash on XLA:TPU (attention="auto"); the CPU compiler cannot lower
    # the TPU kernel, so it stands in with the chunked path
    kernel = attention.partition(":")[0]
    kernel = kernel if kernel != "auto" else ("splash" if backend == "tpu" else "chunked")
    if kernel not in ("splash", "chunked"):
        raise UserError(f"a dry run plans TPU programs: config.sweep.attention must be auto, chunked or splash, "
                        f"got {attention!r}")
    if kernel == "splash" and backend != "tpu" and compile:
        raise UserError("config.sweep.attention='splash' compiles only with the TPU compiler (libtpu on the path, "
                        "--backend tpu); the cpu backend plans the chunked path (auto)")
    spec = GenerateSpec(max_new_tokens=max_new_tokens, stop_tokens=(2,), top_k=1, mask_mode="zero",
                        prefill_chunk=prefill_chunk,
                        attn=AttentionOptions.for_platform("tpu", kernel, q_chunk=q_chunk, k_chunk=k_chunk),
                        **extra_score_masses(extra_scores))
    P = -(-context_len // pad_multiple) * pad_multiple
    # the widest prefill call: a row that shares no prefix prefills its whole prompt but the last token
    width = max(prefill_pieces(max(context_len - 1, 1), prefill_widths(prefill_chunk)))
    S = cache_size_for(P, spec)
    analytic = analytic_bytes(cfg, sizes, batch=batch, prefill_width=width, cache_size=S,
                              max_new_tokens=max_new_tokens, share_prefix=share_prefix,
                              prefix_branches=0 if mixed is not None else prefix_branches)
    ring = ring_size_for(cfg, S)
    if ring is not None and mixed is None:
        n_local = sum(w is not None for w in cfg.windows)
        plain = cache_bytes(cfg, sizes, rows=batch, cache_size=S, plain=True)
        notes.append(f"windowed KV cache: {n_local} of {cfg.num_layers} layers are local and keep a ring of {ring} "
                     f"slots (their window), not {S}; a plain cache would take {plain / GiB:.2f} GiB per device; "
                     "the shared prefix stays plain (every row cuts its window from it)")
    layout = tables = None
    if mixed is not None and extra_scores:
        raise UserError("the mixed KV cache is planned without extra scores: drop --config.sweep.extra_scores "
                        "or --mixed_full_fraction")
    if mixed is not None:
        layout, tables, mixed_info = _mixed_plan(cfg, sizes, mixed)
        mixed_info["full_cache_bytes"] = analytic["kv_cache"]
        analytic["kv_cache"] = mixed_cache_bytes(cfg, layout, sizes, rows=batch, cache_size=S)
        if share_prefix:
            analytic["shared_prefix_cache"] = mixed_cache_bytes(cfg, layout, sizes, rows=1, cache_size=S, ring=S)
        notes.append("mixed KV cache: the shared prefix is one row whose streaming heads keep every position "
                     "(rows take their rings from it); --config.sweep.share_prefix=false drops it")
    p = Plan(model=model_name or cfg.model_type, topology=topo, mesh=sizes, mesh_source=source, attention=kernel,
             context_len=context_len, batch_size=batch_size, batch=batch, prompt_len=P, prefill_width=width,
             cache_size=S, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, backend=backend,
             analytic=analytic, margin=margin, notes=notes, mixed=None if mixed is None else mixed_info)
    if batch != batch_size:
        notes.append(f"batch {batch_size} padded to {batch} rows for data={data} (as Runner does)")
    for ax, dim, what in (("model", cfg.num_kv_heads, "KV heads: the KV cache is replicated on it"),
                          ("model", cfg.num_heads, "query heads"), ("expert", cfg.num_experts or 1, "experts")):
        if sizes[ax] > 1 and dim % sizes[ax]:
            notes.append(f"{ax}={sizes[ax]} does not divide the {dim} {what}")
    if not compile:
        return p

    if mesh_obj is None:
        mesh_obj = shd.make_mesh(sizes, devices=dev.compile_devices(topo, backend))
    rep = shd.replicated(mesh_obj)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding((batch,), mesh_obj))
    call = jax.ShapeDtypeStruct((data, width), jnp.int32, sharding=shd.batch_sharding((data, width), mesh_obj))
    shared = analytic["shared_prefix_cache"]
    block = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    if mixed is not None:
        from rhead_jax.mixedkv.runner import MixedRunner

        runner = MixedRunner(cfg, None, mesh_obj, layout, tables)
        tabs = _abstract(tables, runner._tables_sharding())
        cache = _abstract(runner.cache_shape(batch, S), runner.cache_sharding(batch, S))
        params = _abstract(param_shapes(cfg), runner.param_sh)
        cache1 = _abstract(runner.cache_shape(1, S, S), runner.cache_sharding(1, S, S))
        programs = {
            "setup": (runner.rows_jit(batch, S, S), (cache1, rows), analytic["params"]) if share_prefix else
            (runner.init_cache_jit(batch, S), (), analytic["params"]),
            "prefill": (runner.prefill_block_jit(batch, S, width, spec), (params, tabs, cache, block, call, call),
                        shared),
            "decode": (runner.decode_jit(batch, S, spec), (params, tabs, rows, rows, cache), shared),
        }
        return _compile(p, programs, backend)
    runner = Runner(cfg, None, mesh_obj)      # no params: only its jitted programs are used
    cache = _abstract(jax.eval_shape(lambda: init_cache(cfg, batch, S, ring=runner.ring_for(S))),
                      runner.cache_sharding(batch, S))
    params = _abstract(param_shapes(cfg), runner.param_sh)
    if share_prefix:
        cache1 = _abstract(jax.eval_shape(lambda: init_cache(cfg, 1, S)), runner.cache_sharding(1, S, plain=True))
        setup = (runner.rows_jit(batch, S, S), (cache1, rows), analytic["params"])
    else:
        setup = (runner.init_cache_jit(batch, S), (), analytic["params"])
    prefill_args = (params, cache, block, call, call, None)
    decode_args = (params, rows, rows, cache, None)
    if spec.prefill_masses:
        prefill_args += (_abstract_targets(data, len(spec.prefill_masses), mesh_obj),)
    if spec.decode_masses or spec.decode_outputs:
        decode_args += (_abstract_targets(batch, len(spec.decode_masses), mesh_obj) if spec.decode_masses else None,)
    if spec.decode_outputs:
        decode_args += (jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=shd.batch_sharding((batch, 2), mesh_obj)),)
    programs = {
        "setup": setup,
        "prefill": (runner.prefill_block_jit(batch, S, width, spec), prefill_args, shared),
        "decode": (runner.decode_jit(batch, S, spec), decode_args, shared),
    }
    return _compile(p, programs, backend)


def _mixed_plan(cfg: ModelConfig, sizes: Mapping[str, int], mixed: Mapping[str, Any]):
    """(layout, tables, info) of a mixed KV cache at mixed["full_fraction"], full heads in layer-major order."""
    from types import SimpleNamespace

    import numpy as np

    from rhead_jax.mixedkv.heads import num_full, top_full
    from rhead_jax.mixedkv.runner import mixed_layout

    L, K = cfg.num_layers, cfg.num_kv_heads
    f = float(mixed["full_fraction"])
    full = top_full(np.zeros((L, K)), num_full(f, L * K))
    layout, tables = mixed_layout(cfg, full, SimpleNamespace(shape=dict(sizes)), sink=int(mixed["sink"]),
                                  recent=int(mixed["recent"]))
    info = {"full_fraction": f, "full_heads": int(full.sum()), "kv_heads": L * K, "sink": layout.sink,
            "recent": layout.recent, "groups": layout.groups, "full_slots": layout.full_slots,
            "ring_slots": layout.ring_slots}
    return layout, tables, info


def _compile(p: Plan, programs: dict, backend: str) -> Plan:
    """Compile each (jitted fn, abstract args, resident bytes) of `programs` into p.compiled."""
    p.compiled = {}
    t0 = time.time()
    for name, (fn, args, resident) in programs.items():
        try:
            compiled = fn.lower(*args).compile(dev.CPU_COMPILER_OPTIONS if backend == "cpu" else None)
        except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error is a result, not a crash
            oom = compiler_oom(e)
            if oom is None:
                raise
            msg, need = oom
            p.compile_error = f"{name}: {msg}"
            if need is not None:
                p.compiled[name] = dict(need, resident=resident)
            break
        ma = compiled.memory_analysis()
        cost = _cost(compiled)
        p.compiled[name] = {
            "argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
            "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
            "generated_code": int(ma.generated_code_size_in_bytes), "resident": resident,
            **cost,
        }
    p.compile_seconds = time.time() - t0
    if not p.compiled:
        p.compiled = None
    return p


def _cost(compiled) -> dict[str, int]:
    """The compiler's cost_analysis(): {"cost_flops", "cost_bytes"} (a loop body counted once;
    nothing for a Pallas call's FLOPs), {} where it gives none."""
    try:
        c = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional figures
        return {}
    c = c[0] if isinstance(c, (list, tuple)) and c else c
    if not c:
        return {}
    return {"cost_flops": int(c.get("flops", 0)), "cost_bytes": int(c.get("bytes accessed", 0))}


def find_smallest_slice(cfg: ModelConfig, family: str, context_len: int, batch_size: int, *,
                        max_chips: int | None = None, on_attempt: Callable[[Plan], None] | None = None,
                        **plan_kw) -> Plan | None:
    """The plan of the smallest slice of `family` ("v4", "v5e", "v5p", "v6e") whose sweep step fits,
    or None. Slices are tried in increasing size with `auto_mesh`; one whose analytic lower bound
    (params + KV caches, no activations) already exceeds HBM is not compiled. The search stops
    early when more chips no longer lower that bound (the data axis has outgrown the batch and the
    model axis cannot grow): no larger slice of the family can fit then.

    max_chips: largest slice tried (default: MAX_CPU_DEVICES with the CPU backend, no limit on TPU).
    on_attempt(plan) is called with every plan (analytic-only ones included).
    """
    backend = dev.resolve_backend(plan_kw.pop("backend", "auto"))
    if max_chips is None and backend == "cpu":
        max_chips = dev.MAX_CPU_DEVICES
    if plan_kw.pop("mesh", None) is not None:
        raise UserError("find_smallest_slice chooses meshes itself (auto_mesh); do not pass mesh")
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


# ----------------------------------------------------------------------------- model shapes of a config


def model_config_for(config, config_path: str | None = None) -> tuple[ModelConfig, str, str]:
    """(ModelConfig, label, source) for a sweep config: `<model.path>/config.json` when it exists
    (a real checkpoint's config takes precedence), else the preset named by model.name or by the
    config file's stem (rhead_jax.presets.CONFIG_PRESETS). UserError when neither exists."""
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
    raise UserError(f"unknown model: no config.json under {path} and no preset matches {candidates}; set "
                    f"config.model.path to a checkpoint directory or config.model.name to one of the presets: "
                    f"{', '.join(presets.preset_names())}")


def paper_context(config, cfg: ModelConfig) -> tuple[int, list[int]]:
    """The longest of config.sweep.lengths the model accepts, and the lengths it refuses."""
    limit = context_limit(cfg, config.sweep.max_new_tokens)
    lengths = sorted(int(x) for x in config.sweep.lengths)
    ok = [x for x in lengths if x <= limit]
    return (max(ok) if ok else max(lengths)), [x for x in lengths if x > limit]


def grid_programs(config) -> dict[str, Any]:
    """The XLA programs a sweep of config's grid needs, at most (the engine's bound): per context
    length, one cache set-up, the prefill call widths, one decode loop and one copy-count scoring;
    plus the shared prefix's prefill once. Depths and needles add none (lengths whose batches have
    the same cache size even share theirs)."""
    s = config.sweep
    widths = prefill_widths(s.prefill_chunk)
    lengths, depths = sorted(set(s.lengths)), sorted(set(s.depths))
    branches = bool(s.share_prefix and s.prefix_branches)
    # with prefix branches: a second cache set-up per length (rows taken from branches too), and
    # once the branch cache's set-up and its prefill widths
    per_length = 1 + len(widths) + 1 + 1 + branches
    once = 1 + (1 + len(widths) if branches else 0)
    return {"lengths": len(lengths), "depths": len(depths), "widths": list(widths), "per_length": per_length,
            "bound": len(lengths) * per_length + once, "batches_of_one_cell": len(lengths) * len(depths),
            "branches": branches}


def grid_programs_line(config) -> str:
    g = grid_programs(config)
    setups, branches = ("2 cache set-ups", " and its branches") if g["branches"] else ("1 cache set-up", "")
    return (f"XLA programs for the whole grid: at most {g['bound']} ({g['lengths']} lengths x ({setups} + "
            f"{len(g['widths'])} prefill widths {'/'.join(map(str, g['widths']))} + 1 decode loop + 1 scoring) + the "
            f"shared prefix{branches}), whatever the {g['depths']} depths and the needles; a program per "
            f"(length, depth) batch would be {g['batches_of_one_cell']} or more")
