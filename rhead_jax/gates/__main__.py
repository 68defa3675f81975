"""Train DuoAttention-style gates (one per KV head) on synthetic multi-passkey prompts.

    python -m rhead_jax.gates --config smollm2_135m.py --workdir /tmp/gates_smollm2
    python -m rhead_jax.gates --config smollm2_135m.py --config.gates.steps=50 --workdir /tmp/g

Writes full_attention_heads.tsv (DuoAttention's format), gates.json, loss.jsonl and loss.png in
--workdir; a killed run started again with the same workdir resumes from its last checkpoint.
"""
from __future__ import annotations

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.define_workdir_flags()


def main(argv):
    del argv
    cli.maybe_initialize_distributed()
    config = cli.get_config()
    workdir = FLAGS.workdir or cli.default_workdir(config, "gates")
    logging.info("workdir: %s", workdir)
    from rhead_jax.gates.train import run_gates

    result = run_gates(config, workdir)
    g = result["gate_summary"]
    print(f"gates of {result['model']}: {result['steps']} steps, final distill loss {result['final']['distill']:.4g}, "
          f"mean alpha {g['mean']:.4f}, {g['above_0.5']} of {g['count']} KV heads above 0.5; "
          f"{workdir}/full_attention_heads.tsv", flush=True)

if __name__ == "__main__":
    cli.run(main)
