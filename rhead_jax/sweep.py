"""Retrieval-head detection sweep.

    python -m rhead_jax.sweep --config configs/smollm2_135m.py --workdir /tmp/smollm2
    python -m rhead_jax.sweep --config yi34b.py --config.sweep.batch_size=4 --workdir gs://bucket/yi34b
    python -m rhead_jax.sweep --config yi34b.py --dry_run --topology v5p-64 [--dry_run_context 200000]

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
flags.DEFINE_bool("dry_run", False, "Print the per-device memory plan of the sweep step on --topology and exit: "
                  "no weights, no TPUs (rhead_jax.dryrun; the model's config.json, else its preset).")
flags.DEFINE_string("topology", None, "TPU slice for --dry_run, e.g. v4-32, v5litepod-16, v5p-64, v6e-8.")
flags.DEFINE_integer("dry_run_context", None, "Context length for --dry_run (default: the longest of "
                     "config.sweep.lengths the model accepts).")
flags.DEFINE_enum("dry_run_mesh", "config", ["config", "auto"], "--dry_run mesh: config.mesh (when it fits the "
                  "slice) or rhead_jax.dryrun.auto_mesh.")
flags.DEFINE_enum("dry_run_backend", "auto", ["auto", "tpu", "cpu"], "--dry_run compiler: XLA:TPU ahead of time "
                  "(needs libtpu), simulated CPU devices, or auto (tpu when libtpu is installed).")
cli.define_config_flag()


def main(argv):
    del argv
    if FLAGS.dry_run:
        from rhead_jax import dryrun

        return dryrun.sweep_cli(cli.get_config(), topology=FLAGS.topology, context_len=FLAGS.dry_run_context,
                                config_path=FLAGS["config"].config_filename, mesh=FLAGS.dry_run_mesh,
                                backend=FLAGS.dry_run_backend)
    cli.maybe_initialize_distributed()
    config = cli.get_config()
    workdir = FLAGS.workdir or cli.default_workdir(config, "sweep")
    logging.info("workdir: %s", workdir)
    from rhead_jax.detection import run_sweep

    run_sweep(config, workdir)


if __name__ == "__main__":
    sys.argv = cli.resolve_config_argv(sys.argv)
    app.run(main)
