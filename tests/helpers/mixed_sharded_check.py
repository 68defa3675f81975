"""Generate one batch with a mixed KV cache on several meshes of simulated CPU devices; print the outputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.mixed_sharded_check \
        --model_dir DIR --meshes 1,1,1 8,1,1 4,2,1 1,8,1

Prints one JSON line `RESULT {mesh: {"tokens", "topk_index", "topk_weight", "groups", "spec"}}`: the
generated tokens and captured key positions of every head (shared prefix, row blocks, decode).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.engine import Engine, mesh_from_config  # noqa: E402
from rhead_jax.mixedkv.runner import MixedRunner, mixed_layout  # noqa: E402
from tests.helpers.sharded_check import tiny_config  # noqa: E402

FULL = [[True, False], [False, True]]   # the tiny model's 2 layers x 2 KV heads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--meshes", nargs="+", required=True)
    args = ap.parse_args()
    out = {}
    for m in args.meshes:
        config = tiny_config(args.model_dir, tuple(int(x) for x in m.split(",")))
        engine = Engine(config, load_model(args.model_dir, mesh=mesh_from_config(config)))
        layout, tables = mixed_layout(engine.cfg, np.array(FULL), engine.mesh, sink=4, recent=24)
        runner = MixedRunner(engine.cfg, engine.model.params, engine.mesh, layout, tables)
        instances = engine.plan_needles()[:8]
        spec = engine.spec(capture=True)
        shared = engine.shared_prefix(instances, spec, label="mixed", runner=runner)
        gen = engine.generate([i.prompt_ids for i in instances], spec, batch_size=8, shared=shared,
                              keys=[i.key for i in instances], runner=runner)
        spec_text = "" if engine.mesh is None else str(runner.cache_sharding(8, 512).full_k.spec)
        out[m] = {"tokens": gen.tokens.tolist(), "topk_index": gen.topk_index.tolist(),
                  "topk_weight": gen.topk_weight.tolist(), "groups": layout.groups, "spec": spec_text}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
