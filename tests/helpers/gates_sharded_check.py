"""Train gates for a few steps on several meshes of simulated CPU devices; print the gates.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.gates_sharded_check \
        --model_dir DIR --workroot DIR --meshes 1,1,1 2,4,1

Prints one line `RESULT {mesh: {"gates": [[...]], "distill": [...]}}` for the test to compare.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rhead_jax.checkpoints import load_model  # noqa: E402
from rhead_jax.config import default_config, validate  # noqa: E402
from rhead_jax.gates.train import run_gates  # noqa: E402


def tiny_config(model_dir: str, mesh: tuple[int, int, int]):
    c = default_config()
    c.model.path, c.model.name = model_dir, "tiny"
    g = c.gates
    g.steps, g.min_length, g.max_length, g.passkeys, g.passkey_words = 3, 128, 128, 2, 4
    g.sink, g.recent, g.chunk, g.checkpoint_every, g.lr = 4, 16, 128, 2, 0.05
    c.mesh.data, c.mesh.model, c.mesh.expert = mesh
    return validate(c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--workroot", required=True)
    ap.add_argument("--meshes", nargs="+", required=True)
    args = ap.parse_args()
    model = load_model(args.model_dir)
    out = {}
    for m in args.meshes:
        config = tiny_config(args.model_dir, tuple(int(x) for x in m.split(",")))
        wd = os.path.join(args.workroot, "mesh_" + m.replace(",", "x"))
        result = run_gates(config, wd, model=model)
        with open(os.path.join(wd, "loss.jsonl")) as f:
            distill = [json.loads(line)["distill"] for line in f]
        out[m] = {"gates": result["gates"], "distill": distill}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
