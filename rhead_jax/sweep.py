"""Retrieval-head detection sweep.

    python -m rhead_jax.sweep --config configs/smollm2_135m.py --workdir /tmp/smollm2
    python -m rhead_jax.sweep --config yi34b.py --config.sweep.batch_size=4 --workdir gs://bucket/yi34b
    python -m rhead_jax.sweep --config yi34b.py --dry_run --topology v5p-64 [--dry_run_context 200000]

A bare config name resolves to the configs shipped with the package (rhead_jax.configs). Results (head_scores.json in
the original format, results.jsonl per test, summary.json) land in --workdir; a killed sweep
started again with the same workdir resumes where it stopped. A sweep whose model passes no test of
the ROUGE gate ends with one `error:` line (what it answered, the likely causes and their fixes) and
exit status 2; its files stay in the workdir (rhead_jax.diagnosis).
"""
from __future__ import annotations

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.define_workdir_flags()
flags.DEFINE_bool("dry_run", False, "Print the per-device memory plan of the sweep step on --topology and exit: "
                  "no weights, no TPUs (rhead_jax.dryrun; the model's config.json, else its preset).")
flags.DEFINE_string("topology", None, "TPU slice for --dry_run, e.g. v4-32, v5litepod-16, v5p-64, v6e-8.")
flags.DEFINE_integer("dry_run_context", None, "Context length for --dry_run (default: the longest of "
                     "config.sweep.lengths the model accepts).")
flags.DEFINE_enum("dry_run_mesh", "config", ["config", "auto"], "--dry_run mesh: config.mesh (when it fits the "
                  "slice) or rhead_jax.dryrun.auto_mesh.")
flags.DEFINE_enum("dry_run_backend", "auto", ["auto", "tpu", "cpu"], "--dry_run compiler: XLA:TPU ahead of time "
                  "(needs libtpu), simulated CPU devices, or auto (tpu when libtpu is installed).")


def main(argv):
    del argv
    if FLAGS.dry_run:
        from rhead_jax import dryrun

        return dryrun.sweep_cli(cli.get_config(), topology=FLAGS.topology, context_len=FLAGS.dry_run_context,
                                config_path=cli.config_path(), mesh=FLAGS.dry_run_mesh,
                                backend=FLAGS.dry_run_backend)
    cli.maybe_initialize_distributed()
    config = cli.get_config()
    workdir = FLAGS.workdir or cli.default_workdir(config, "sweep")
    logging.info("workdir: %s", workdir)
    from rhead_jax.detection import run_sweep

    summary = run_sweep(config, workdir)
    if summary["tests"] and not summary["tests_kept"]:
        from rhead_jax.diagnosis import no_kept_message
        from rhead_jax.errors import UserError

        raise UserError(no_kept_message(summary["gate"], workdir, chat=config.model.chat,
                                        faithful=config.sweep.faithful, lengths=config.sweep.lengths))


if __name__ == "__main__":
    cli.run(main)
