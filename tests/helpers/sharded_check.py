"""Run the same tiny sweep on several meshes of simulated CPU devices and print per-test results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.sharded_check \
        --model_dir DIR --workroot DIR --meshes 1,1,1 8,1,1 2,4,1 1,8,1

Prints one JSON line: {mesh: {"sweep": [[key, generated, copy_counts], ...], "top_slot": ...,
"top_weight": ...}} for the test to compare.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rhead_jax import detection  # noqa: E402
from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.config import default_config, validate  # noqa: E402
from rhead_jax.engine import Engine, mesh_from_config  # noqa: E402
from tests.helpers.meshes import run_meshes  # noqa: E402


def tiny_config(model_dir: str, mesh: tuple[int, int, int]):
    c = default_config()
    c.model.path, c.model.name = model_dir, "tiny"
    c.sweep.lengths, c.sweep.depths = [300], [0, 50, 100]
    c.sweep.batch_size, c.sweep.max_new_tokens = 8, 5
    c.sweep.prefix_branches = 4   # prompts sharing a needle's first words: branch rows sharded like the batch
    c.sweep.prefill_chunk, c.sweep.q_chunk, c.sweep.k_chunk, c.sweep.pad_multiple = 128, 64, 64, 32
    c.mesh.data, c.mesh.model, c.mesh.expert = mesh
    return validate(c)


def main():
    from absl import logging

    logging.set_verbosity(logging.INFO)

    def one(model_dir, mesh, wd):
        config = tiny_config(model_dir, mesh)
        model = load_model(model_dir, mesh=mesh_from_config(config))
        detection.run_sweep(config, wd, model=model)
        with open(os.path.join(wd, "results.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        # the captured attention itself, straight from one batch on this mesh
        engine = Engine(config, model)
        instances = engine.plan_needles()
        batch = detection.score_batch(engine, instances[:4], engine.spec(capture=True), batch_size=8,
                                      keep_attention=True)
        # orbax: save the sharded params, restore straight into this mesh's shardings
        mesh_obj = engine.mesh
        if mesh_obj is not None:
            import jax
            import numpy as np

            from rhead_jax.checkpoints.orbax_io import restore_params, save_params
            from rhead_jax.sharding import param_shardings

            save_params(os.path.join(wd, "orbax"), model.params, model.cfg)
            sh = param_shardings(model.cfg, mesh_obj)
            _, restored = restore_params(os.path.join(wd, "orbax"), shardings=sh)
            for a, b, s_ in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored), jax.tree.leaves(sh)):
                assert b.sharding == s_, (b.sharding, s_)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            print(f"ORBAX_OK {','.join(map(str, mesh))}", flush=True)
        return {"sweep": [[r["key"], r["generated"], r["copy_counts"]] for r in rows],
                "top_slot": [r["top_slot"] for r in batch], "top_weight": [r["top_weight"] for r in batch]}

    run_meshes(one)

if __name__ == "__main__":
    main()
