"""Induction, duplicate-token (echo) and previous-token scores of every head on repeated random tokens.

    python -m rhead_jax.detectors --config smollm2_135m.py --workdir /tmp/detectors
    python -m rhead_jax.detectors --config yi34b.py --config.detectors.samples=4 --workdir gs://bucket/yi34b_det

Same config files, overrides and multi-host flags as rhead_jax.sweep; the sequences come from
config.detectors (length, repeats, samples, seed), the tiles and rows per call from config.sweep,
the mesh from config.mesh. Files (head_scores_induction.json, head_scores_duplicate.json,
head_scores_previous.json, summary.json) land in --workdir; see the rhead_jax.detectors package.
"""
from __future__ import annotations

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.define_workdir_flags()


def main(argv):
    del argv
    config = cli.get_config()
    cli.maybe_initialize_distributed()
    workdir = FLAGS.workdir or cli.default_workdir(config, "detectors")
    logging.info("workdir: %s", workdir)
    from rhead_jax.detectors import run_detectors

    run_detectors(config, workdir)


if __name__ == "__main__":
    cli.run(main)
