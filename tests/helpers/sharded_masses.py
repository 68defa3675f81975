"""The extra scores of a tiny sweep and the detector scores on several meshes of simulated devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.sharded_masses \
        --model_dir DIR --workroot DIR --meshes 1,1,1 2,4,1

Prints one line `RESULT {mesh: {"sweep": [[key, generated, copy_counts, extra_scores], ...],
"detectors": {name: {"L-H": [scores]}}}}` for the test to compare.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rhead_jax import detection, detectors  # noqa: E402
from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.engine import mesh_from_config  # noqa: E402
from tests.helpers.meshes import run_meshes  # noqa: E402
from tests.helpers.sharded_check import tiny_config  # noqa: E402


def main():
    def one(model_dir, mesh, wd):
        config = tiny_config(model_dir, mesh)
        config.sweep.depths, config.sweep.max_new_tokens = [100], 4
        config.sweep.extra_scores = ("mass", "query", "logit", "dla", "spatial")
        config.detectors.length, config.detectors.repeats, config.detectors.samples = 40, 3, 2
        model = load_model(model_dir, mesh=mesh_from_config(config))
        detection.run_sweep(config, os.path.join(wd, "sweep"), model=model)
        with open(os.path.join(wd, "sweep", "results.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        detectors.run_detectors(config, os.path.join(wd, "detectors"), model=model)
        det = {n: json.load(open(os.path.join(wd, "detectors", f"head_scores_{n}.json"))) for n in detectors.DETECTORS}
        return {"sweep": [[r["key"], r["generated"], r["copy_counts"], r["extra_scores"]] for r in rows],
                "detectors": det}

    run_meshes(one)

if __name__ == "__main__":
    main()
