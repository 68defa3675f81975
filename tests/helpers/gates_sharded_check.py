"""Train gates for a few steps on several meshes of simulated CPU devices; print the gates.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.gates_sharded_check \
        --model_dir DIR --workroot DIR --meshes 1,1,1 2,4,1

Prints one line `RESULT {mesh: {"gates": [[...]], "distill": [...]}}` for the test to compare.
"""
from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.config import default_config, validate  # noqa: E402
from rhead_jax.gates.train import run_gates  # noqa: E402
from tests.helpers.meshes import run_meshes  # noqa: E402


def tiny_config(model_dir: str, mesh: tuple[int, int, int]):
    c = default_config()
    c.model.path, c.model.name = model_dir, "tiny"
    g = c.gates
    g.steps, g.min_length, g.max_length, g.passkeys, g.passkey_words = 3, 128, 128, 2, 4
    g.sink, g.recent, g.chunk, g.checkpoint_every, g.lr = 4, 16, 128, 2, 0.05
    c.mesh.data, c.mesh.model, c.mesh.expert = mesh
    return validate(c)


@functools.lru_cache(maxsize=None)
def _model(model_dir: str):
    """The model, loaded once for every mesh (unsharded: run_gates shards it)."""
    return load_model(model_dir)


def main():
    def one(model_dir, mesh, wd):
        result = run_gates(tiny_config(model_dir, mesh), wd, model=_model(model_dir))
        with open(os.path.join(wd, "loss.jsonl")) as f:
            distill = [json.loads(line)["distill"] for line in f]
        return {"gates": result["gates"], "distill": distill}

    run_meshes(one)


if __name__ == "__main__":
    main()
