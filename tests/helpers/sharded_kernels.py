"""A tiny sweep with the chunked prefill and with splash attention (interpret mode) on meshes of
simulated devices: splash runs in shard_map over the data and model axes.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.helpers.sharded_kernels \
        --model_dir DIR --workroot DIR --meshes 1,1,1 2,2,1

Prints `RESULT {mesh: {attention: [[key, generated, copy_counts, query scores], ...],
attention + " kernel traces": how many prefill calls were traced through models.kernels}}`.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rhead_jax import detection  # noqa: E402
from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.engine import mesh_from_config  # noqa: E402
from rhead_jax.models import kernels  # noqa: E402
from tests.helpers.meshes import run_meshes  # noqa: E402
from tests.helpers.sharded_check import tiny_config  # noqa: E402


def main():
    traced = []
    kernel = kernels.prefill_attention
    kernels.prefill_attention = lambda *a, **k: traced.append(1) or kernel(*a, **k)

    def one(model_dir, mesh, wd):
        out = {}
        for attention in ("chunked", "splash:interpret"):
            config = tiny_config(model_dir, mesh)
            config.sweep.depths, config.sweep.max_new_tokens, config.sweep.batch_size = [50], 3, 4
            config.sweep.extra_scores, config.sweep.attention = ("query",), attention
            model = load_model(model_dir, mesh=mesh_from_config(config))
            run = os.path.join(wd, attention.replace(":", "_"))
            detection.run_sweep(config, run, model=model)
            with open(os.path.join(run, "results.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            out[attention] = [[r["key"], r["generated"], r["copy_counts"], r["extra_scores"]["query"]] for r in rows]
            out[attention + " kernel traces"] = len(traced)
            traced.clear()
        return out

    run_meshes(one)


if __name__ == "__main__":
    main()
