"""Generate one batch with a mixed KV cache on several meshes of simulated CPU devices; print the outputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.mixed_sharded_check \
        --model_dir DIR --meshes 1,1,1 8,1,1 4,2,1 1,8,1

Prints one JSON line `RESULT {mesh: {"tokens", "topk_index", "topk_weight", "groups", "spec"}}`: the
generated tokens and captured key positions of every head (shared prefix, row blocks, decode).
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.engine import Engine, mesh_from_config  # noqa: E402
from rhead_jax.mixedkv.runner import MixedRunner, mixed_layout  # noqa: E402
from tests.helpers.meshes import run_meshes  # noqa: E402
from tests.helpers.sharded_check import tiny_config  # noqa: E402

FULL = [[True, False], [False, True]]   # the tiny model's 2 layers x 2 KV heads


def main():
    def one(model_dir, mesh, _):
        config = tiny_config(model_dir, mesh)
        engine = Engine(config, load_model(model_dir, mesh=mesh_from_config(config)))
        layout, tables = mixed_layout(engine.cfg, np.array(FULL), engine.mesh, sink=4, recent=24)
        runner = MixedRunner(engine.cfg, engine.model.params, engine.mesh, layout, tables)
        instances = engine.plan_needles()[:8]
        spec = engine.spec(capture=True)
        shared = engine.shared_prefix(instances, spec, label="mixed", runner=runner)
        gen = engine.generate([i.prompt_ids for i in instances], spec, batch_size=8, shared=shared,
                              keys=[i.key for i in instances], runner=runner)
        spec_text = "" if engine.mesh is None else str(runner.cache_sharding(8, 512).full_k.spec)
        return {"tokens": gen.tokens.tolist(), "topk_index": gen.topk_index.tolist(),
                "topk_weight": gen.topk_weight.tolist(), "groups": layout.groups, "spec": spec_text}

    run_meshes(one, workroot=False)


if __name__ == "__main__":
    main()
