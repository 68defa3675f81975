"""Retrieval-head detection sweep.

    python -m rhead_jax.sweep --config configs/smollm2_135m.py --workdir /tmp/smollm2
    python -m rhead_jax.sweep --config yi34b.py --config.sweep.batch_size=4 --workdir gs://bucket/yi34b

A bare config name resolves to the repository's configs/ directory. Results (head_scores.json in
the original format, results.jsonl per test, summary.json) land in --workdir; a killed sweep
started again with the same workdir resumes where it stopped.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (local path or gs://...); resumable.")
cli.define_config_flag()


def main(argv):
    del argv
    config = cli.get_config()
    workdir = FLAGS.workdir or cli.default_workdir(config, "sweep")
    logging.info("workdir: %s", workdir)
    from rhead_jax.detection import run_sweep

    run_sweep(config, workdir)


if __name__ == "__main__":
    sys.argv = cli.resolve_config_argv(sys.argv)
    app.run(main)
