"""The dry-run commands: `python -m rhead_jax.sweep --dry_run` and `python -m rhead_jax.dryrun`.

    python -m rhead_jax.sweep --config yi34b.py --dry_run --topology v5p-64 [--dry_run_context 200000]
    python -m rhead_jax.dryrun --config yi34b.py --topology v5p-64 [--context 50000] [--json]
    python -m rhead_jax.dryrun --config mixtral_8x7b.py --smallest v5e --context 31947
    python -m rhead_jax.dryrun --config yi34b.py --preset Yi-6B-200K --topology v5p-8 --config.sweep.batch_size=4
    python -m rhead_jax.dryrun --config yi34b.py --smallest v5p --context 200000 --mixed_full_fraction 0.25,0.5

Both read the step's settings (batch, new tokens, prefill chunk, tiles, padding, shared prefix) from
the config (`--config.sweep.prefill_chunk=2048` overrides one) and the model's shapes from
`<config.model.path>/config.json`, else the preset of config.model.name or of the config's stem
(`--preset` / `--hf_config` override them). The context defaults to the longest of
config.sweep.lengths the model accepts. They differ in the mesh: `sweep --dry_run` plans on
config.mesh when it fits the slice, `rhead_jax.dryrun` on `auto_mesh` (`--mesh config` or
`--mesh data=-1,model=8` otherwise); and only `rhead_jax.dryrun` searches (`--smallest FAMILY`).

Both set up the compiler's devices (rhead_jax.dryrun.devices.prepare_process) before jax starts.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from absl import flags

from rhead_jax import cli, presets, sharding
from rhead_jax.dryrun import devices as dev
from rhead_jax.dryrun.memory import Plan
from rhead_jax.dryrun.planner import (find_smallest_slice, grid_programs, grid_programs_line, model_config_for,
                                      paper_context, plan)
from rhead_jax.dryrun.topology import EXAMPLES, FAMILIES, GiB, family_slices, parse_topology
from rhead_jax.errors import UserError
from rhead_jax.models.config import ModelConfig

FLAGS = flags.FLAGS
# flags of the argparse command this one replaced, now config keys
MOVED_FLAGS = {"--batch_size": "--config.sweep.batch_size=N",
               "--max_new_tokens": "--config.sweep.max_new_tokens=N",
               "--prefill_chunk": "--config.sweep.prefill_chunk=N",
               "--no_share_prefix": "--config.sweep.share_prefix=false"}


def step_settings(config) -> dict[str, Any]:
    """`plan` keyword arguments of the sweep step a config runs (batch size aside)."""
    s = config.sweep
    return dict(max_new_tokens=s.max_new_tokens, prefill_chunk=s.prefill_chunk, pad_multiple=s.pad_multiple,
                q_chunk=s.q_chunk, k_chunk=s.k_chunk, share_prefix=s.share_prefix,
                prefix_branches=s.prefix_branches, extra_scores=tuple(s.extra_scores), attention=s.attention)


def resolve_context(config, cfg: ModelConfig, context_len: int | None) -> tuple[int, list[str]]:
    """(context, notes): `context_len`, or the longest of config.sweep.lengths the model accepts."""
    if context_len is not None:
        return context_len, []
    context_len, refused = paper_context(config, cfg)
    if not refused:
        return context_len, []
    return context_len, [f"config.sweep.lengths {refused} exceed the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings} - {config.sweep.max_new_tokens}: the sweep refuses this "
                         f"config until they are dropped; planned the longest accepted length, {context_len}"]


def mixed_settings(config, fraction: float) -> dict[str, Any]:
    """`plan(mixed=...)` for a mixed KV cache keeping `fraction` of the KV heads full (config.mixedkv's
    sink and recent)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--mixed_full_fraction takes fractions in (0, 1], got {fraction}")
    return {"full_fraction": fraction, "sink": config.mixedkv.sink, "recent": config.mixedkv.recent}


def parse_mesh(text: str) -> dict[str, int]:
    """"data=-1,model=8,expert=1" -> {"data": -1, "model": 8, "expert": 1}."""
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in ("data", "model", "expert") or not v.strip().lstrip("-").isdigit():
            raise UserError(f"bad mesh {text!r}: give auto, config, or sizes such as data=-1,model=8,expert=1")
        out[k] = int(v)
    return out


def sweep_dry_run(config, *, topology: str, context_len: int | None = None, config_path: str | None = None,
                  mesh: str | Mapping[str, int] = "config", backend: str = "auto",
                  model: tuple[ModelConfig, str, str] | None = None, mixed: Mapping[str, Any] | None = None) -> Plan:
    """The plan of the config's sweep batch on `topology`: what `python -m rhead_jax.sweep --dry_run` prints.

    mesh: "config" (config.mesh when its sizes fit the slice, else auto_mesh with a note), "auto", or
    explicit sizes. model: (ModelConfig, label, source) instead of `model_config_for(config)`.
    mixed: plan a mixed KV cache instead (`mixed_settings`).
    """
    topo = parse_topology(topology)
    cfg, label, source = model or model_config_for(config, config_path)
    context_len, notes = resolve_context(config, cfg, context_len)
    notes.insert(0, f"model config: {source}")
    mesh_sizes = None
    if mesh == "config":
        try:
            mesh_sizes = sharding.mesh_shape(dict(config.mesh), topo.chips)
        except ValueError as e:
            notes.append(f"config.mesh does not fit {topo.name} ({e}); using the auto mesh")
    elif isinstance(mesh, Mapping):
        mesh_sizes = dict(mesh)
    elif mesh != "auto":
        raise UserError(f"mesh must be 'config', 'auto' or sizes such as data=-1,model=8, got {mesh!r}")
    p = plan(cfg, topo, context_len=context_len, batch_size=config.sweep.batch_size, mesh=mesh_sizes,
             backend=backend, model_name=label, mixed=mixed, **step_settings(config))
    if mesh == "config" and mesh_sizes is not None:
        p.mesh_source = "config.mesh"
    p.notes[:0] = notes
    return p


def sweep_cli(config, *, topology: str | None, context_len: int | None = None, config_path: str | None = None,
              mesh: str = "config", backend: str = "auto") -> int:
    """`python -m rhead_jax.sweep --dry_run`: prints the plan; call before jax has started."""
    if not topology:
        raise UserError(f"--dry_run needs --topology, e.g. --topology v5p-64 ({EXAMPLES}, ...)")
    backend = dev.prepare_process(parse_topology(topology).chips, backend)
    p = sweep_dry_run(config, topology=topology, context_len=context_len, config_path=config_path, mesh=mesh,
                      backend=backend)
    print(p.table(), flush=True)
    print(grid_programs_line(config), flush=True)
    print(_projection(config, p, config_path).table(), flush=True)
    return 0


def _projection(config, p: Plan, config_path: str | None = None, model=None):
    """The time projection of config's grid on the plan's slice (rhead_jax.dryrun.projection)."""
    from rhead_jax.dryrun.projection import for_plan

    cfg = (model or model_config_for(config, config_path))[0]
    return for_plan(config, cfg, p, programs=grid_programs(config)["bound"])


# ----------------------------------------------------------------------------- python -m rhead_jax.dryrun


def define_flags() -> None:
    """The flags of `python -m rhead_jax.dryrun` (besides --config); `sweep --dry_run`'s names are aliases."""
    cli.define_config_flag()
    flags.DEFINE_string("topology", None, f"TPU slice to plan on, e.g. {EXAMPLES}.")
    flags.DEFINE_enum("smallest", None, list(FAMILIES), "Find the smallest slice of this family that fits instead.")
    flags.DEFINE_integer("context", None, "Context length in tokens (default: the longest of config.sweep.lengths "
                         "the model accepts).")
    flags.DEFINE_string("mesh", "auto", "auto (rhead_jax.dryrun.auto_mesh), config (config.mesh), or sizes such as "
                        "data=-1,model=8,expert=1.")
    flags.DEFINE_enum("backend", "auto", list(dev.BACKENDS), "Compiler: XLA:TPU ahead of time (needs libtpu), "
                      "simulated CPU devices, or auto (tpu when libtpu is installed).")
    flags.DEFINE_integer("max_chips", None, "Largest slice --smallest tries (default: 256 on the cpu backend).")
    flags.DEFINE_bool("json", False, "Also print each plan as a line `JSON {...}`.")
    flags.DEFINE_string("preset", None, "Model shapes from this preset (rhead_jax.presets) instead of the "
                        "config's model.")
    flags.DEFINE_string("hf_config", None, "Model shapes from this checkpoint config.json instead of the "
                        "config's model.")
    flags.DEFINE_list("mixed_full_fraction", None, "Plan a mixed KV cache (rhead_jax.mixedkv) instead, one plan "
                      "per fraction of KV heads kept full, e.g. 0.25,0.5 (sink / recent: config.mixedkv).")
    flags.DEFINE_alias("dry_run_context", "context")
    flags.DEFINE_alias("dry_run_mesh", "mesh")
    flags.DEFINE_alias("dry_run_backend", "backend")


def refuse_moved_flags(argv: list[str]) -> list[str]:
    """`cli.run`'s rewrite hook: name the config key that replaced a flag of the old command."""
    for a in argv[1:]:
        name = a.split("=", 1)[0]
        if name in MOVED_FLAGS:
            raise UserError(f"{name} is a config key now: use {MOVED_FLAGS[name]}")
    return argv


def model_override(config) -> tuple[ModelConfig, str, str] | None:
    """(ModelConfig, label, source) of --hf_config or --preset (in config.model.dtype), else None."""
    if FLAGS.hf_config and FLAGS.preset:
        raise UserError("give at most one of --preset and --hf_config")
    dtype = config.model.dtype
    if FLAGS.hf_config:
        try:
            with open(FLAGS.hf_config) as f:
                hf = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--hf_config {FLAGS.hf_config}: cannot read a config.json ({e})") from None
        return ModelConfig.from_hf(hf, dtype=dtype), FLAGS.hf_config, FLAGS.hf_config
    if FLAGS.preset:
        try:
            name = presets.resolve_preset(FLAGS.preset)
        except KeyError as e:
            raise UserError(f"unknown --preset {FLAGS.preset!r}; give one of {', '.join(presets.preset_names())} "
                            f"(or a config stem: {', '.join(presets.CONFIG_PRESETS)})") from e
        return presets.preset_config(name, dtype=dtype), name, f"preset {name!r} (--preset)"
    return None


def _print_plan(p: Plan, as_json: bool, projection=None) -> None:
    print(p.table(), flush=True)
    if projection is not None:
        print(projection.table(), flush=True)
    if as_json:
        print("JSON " + json.dumps(dict(p.as_dict(), projection=None if projection is None else
                                        projection.as_dict())), flush=True)


def main(argv) -> int:
    """`python -m rhead_jax.dryrun`: the plan on --topology, or the smallest slice of --smallest."""
    del argv
    config = cli.get_config()
    if bool(FLAGS.topology) == bool(FLAGS.smallest):
        raise UserError(f"give exactly one of --topology (e.g. {EXAMPLES}) and --smallest ({', '.join(FAMILIES)})")
    if FLAGS.topology:
        chips = parse_topology(FLAGS.topology).chips
    else:
        chips = min(max(t.chips for t in family_slices(FLAGS.smallest)), FLAGS.max_chips or dev.MAX_CPU_DEVICES)
    mesh = FLAGS.mesh
    if mesh not in ("auto", "config"):
        mesh = parse_mesh(mesh)
        if FLAGS.topology:   # refuse bad sizes before any compiler set-up
            sharding.mesh_shape(mesh, chips, what="--mesh")
    try:
        mixed = [mixed_settings(config, float(f)) for f in FLAGS.mixed_full_fraction or ()] or [None]
    except ValueError as e:
        raise UserError(str(e) if isinstance(e, UserError) else
                        f"--mixed_full_fraction takes comma-separated fractions, got {FLAGS.mixed_full_fraction}")
    backend = dev.prepare_process(chips, FLAGS.backend)
    model = model_override(config) or model_config_for(config, cli.config_path())
    if FLAGS.topology:
        for mx in mixed:
            p = sweep_dry_run(config, topology=FLAGS.topology, context_len=FLAGS.context, mesh=mesh, backend=backend,
                              model=model, mixed=mx)
            _print_plan(p, FLAGS.json, _projection(config, p, model=model))
        return 0

    if mesh != "auto":
        raise UserError("--smallest chooses meshes itself (auto_mesh); drop --mesh")
    cfg, label, _ = model
    context_len, _ = resolve_context(config, cfg, FLAGS.context)

    def show(p: Plan):
        verdict = ("fits" if p.fits else "does not fit") + ("" if p.compiled or p.compile_error else " (analytic)")
        print(f"-- {p.topology.name}: mesh {p.mesh}, total {p.total_bytes / GiB:.2f} GiB of "
              f"{p.usable_bytes / GiB:.2f} usable: {verdict}", flush=True)
        if FLAGS.json:
            print("JSON " + json.dumps(p.as_dict()), flush=True)

    status = 0
    for mx in mixed:
        what = "" if mx is None else f" with a mixed KV cache ({100 * mx['full_fraction']:g}% full heads)"
        found = find_smallest_slice(cfg, FLAGS.smallest, context_len, config.sweep.batch_size,
                                    max_chips=FLAGS.max_chips, on_attempt=show, backend=backend, model_name=label,
                                    mixed=mx, **step_settings(config))
        if found is None:
            print(f"no {FLAGS.smallest} slice (up to {FLAGS.max_chips or 'the largest'} chips) fits {label} at "
                  f"{context_len} tokens{what}")
            status = 1
            continue
        print(found.table())
    return status
