"""The time projection (rhead_jax.dryrun.projection) of every paper model's grid on its smallest v5e and
v5p slices, as a markdown table (docs/accel.md).

    python -m benchmarks.projection_table

The slices and compile seconds are the README's compiled dry runs (XLA:TPU, the smallest slice that
fits each model at its longest paper length, batch 8); the plans here are analytic (no compile),
auto meshes, presets. Compile time: the README's seconds for the three programs / 3 x the grid's
program bound.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# config -> [(slice, README compile seconds for its 3 programs)]: the README's smallest-slice table
SLICES = {
    "yi34b.py": [("v5litepod-32", 22), ("v5p-8", 19)],
    "yi_6b_200k.py": [("v5litepod-4", 23), ("v5p-8", 25)],
    "llama2_7b_80k.py": [("v5litepod-64", 31), ("v5p-8", 32)],
    "llama2_13b_64k.py": [(None, None), ("v5p-16", 32)],
    "mistral_7b_v02.py": [("v5litepod-4", 38), ("v5p-8", 29)],
    "mixtral_8x7b.py": [("v5litepod-16", 43), ("v5p-8", 28)],
    "qwen15_14b.py": [(None, None), ("v5p-8", 25)],
}


def main() -> int:
    import importlib.util

    from rhead_jax.config import resolve_config_path, validate
    from rhead_jax.dryrun.cli import step_settings
    from rhead_jax.dryrun.planner import grid_programs, model_config_for, paper_context, plan
    from rhead_jax.dryrun.projection import for_plan

    print("| model | slice (chips) | mesh | grid (instances, batches) | prefill TFLOP/chip | "
          "splash: prefill / decode h | "
          "chunked: prefill h | compile h | wall h (splash) | chip-hours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, slices in SLICES.items():
        path = resolve_config_path(name)
        spec = importlib.util.spec_from_file_location("cfg_" + name[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = validate(module.get_config())
        cfg, label, _ = model_config_for(config, path)
        context, _ = paper_context(config, cfg)
        programs = grid_programs(config)["bound"]
        for topo, compile_s in slices:
            if topo is None:
                family = "v5e"
                print(f"| {label} | no {family} slice fits (README) | | | | | | | | |")
                continue
            settings = step_settings(config)
            runs = {}
            for kernel in ("splash", "chunked"):
                p = plan(cfg, topo, context_len=context, batch_size=config.sweep.batch_size, compile=False,
                         backend="tpu", model_name=label, **dict(settings, attention=kernel))
                runs[kernel] = (p, for_plan(config, cfg, p, programs=programs))
            p, proj = runs["splash"]
            proj.compile_seconds = compile_s / 3 * programs
            ph = proj.phases
            mesh = "x".join(str(p.mesh[a]) for a in ("data", "model", "expert"))
            print(f"| {label} | {p.topology.name} ({p.topology.chips}) | {mesh} | {proj.grid['instances']}, "
                  f"{proj.grid['batches']} | {ph['prefill'].flops / 1e12:,.0f} | "
                  f"{ph['prefill'].seconds / 3600:.2f} / {ph['decode'].seconds / 3600:.2f} | "
                  f"{runs['chunked'][1].phases['prefill'].seconds / 3600:.2f} | {proj.compile_seconds / 3600:.2f} | "
                  f"{proj.wall_seconds / 3600:.2f} | {proj.chip_hours:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
