"""Dry runs: will a sweep fit on a TPU slice? Per-device memory of the sweep step, without weights or TPUs.

    python -m rhead_jax.sweep --config yi34b.py --dry_run --topology v5p-64 [--dry_run_context 200000]
    python -m rhead_jax.dryrun --config yi34b.py --topology v5p-64 [--context 50000] [--json]
    python -m rhead_jax.dryrun --config mixtral_8x7b.py --smallest v5e --context 31947

Modules, by concept (each imports only those above it):
  topology  the Cloud TPU slice catalog (Topology, parse_topology, family_slices); pure data
  devices   the compiler backend (tpu: libtpu device descriptions; cpu: simulated devices) and the
            process set-up it needs (prepare_process, ensure_cpu_devices)
  memory    meshes (auto_mesh), analytic per-device bytes, and the Plan report
  planner   plan(): the programs of a sweep batch (Runner.*_jit) compiled on abstract arguments;
            find_smallest_slice; the model shapes of a sweep config (model_config_for)
  cli       `sweep --dry_run` (sweep_cli) and the `python -m rhead_jax.dryrun` command (main)
"""
from rhead_jax.dryrun.cli import sweep_cli, sweep_dry_run
from rhead_jax.dryrun.devices import (CPU_COMPILER_OPTIONS, DEVICE_COUNT_FLAG, MAX_CPU_DEVICES, ensure_cpu_devices,
                                      prepare_process, resolve_backend, tpu_compiler_available)
from rhead_jax.dryrun.memory import MARGIN, Plan, analytic_bytes, auto_mesh
from rhead_jax.dryrun.planner import find_smallest_slice, model_config_for, paper_context, plan
from rhead_jax.dryrun.topology import (FAMILIES, SLICE_CHIPS, GiB, Topology, chips_per_host, family_slices,
                                       parse_topology, topology_name)

__all__ = ["CPU_COMPILER_OPTIONS", "DEVICE_COUNT_FLAG", "FAMILIES", "GiB", "MARGIN", "MAX_CPU_DEVICES", "Plan",
           "SLICE_CHIPS", "Topology", "analytic_bytes", "auto_mesh", "chips_per_host", "ensure_cpu_devices",
           "family_slices", "find_smallest_slice", "model_config_for", "paper_context", "parse_topology", "plan",
           "prepare_process", "resolve_backend", "sweep_cli", "sweep_dry_run", "topology_name",
           "tpu_compiler_available"]
