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
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods: "
                  "every host runs the same command; settings come from the TPU environment).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a TPU "
                    "environment, e.g. two local processes); implies --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
cli.define_config_flag()


def main(argv):
    del argv
    cli.maybe_initialize_distributed()
    config = cli.get_config()
    workdir = FLAGS.workdir or cli.default_workdir(config, "sweep")
    logging.info("workdir: %s", workdir)
    from rhead_jax.detection import run_sweep

    run_sweep(config, workdir)


if __name__ == "__main__":
    sys.argv = cli.resolve_config_argv(sys.argv)
    app.run(main)
