"""Masking ablation of retrieval heads: the needle grid (or a QA / CoT task) with heads masked.

    python -m rhead_jax.ablate --config smollm2_135m.py --scores wd/head_scores.json --mask top:20
    python -m rhead_jax.ablate --config smollm2_135m.py --scores wd/head_scores.json --mask random:20 --seeds 0,1,2
    python -m rhead_jax.ablate --config smollm2_135m.py --mask list:16-19,11-15
    python -m rhead_jax.ablate --config smollm2_135m.py --scores S.json --sweep_k 0,5,10,20 --seeds 0,1,2
    python -m rhead_jax.ablate --config smollm2_135m.py --scores S.json --task qa:my_qa.jsonl
    ... --config.mask.mode=uniform --config.mask.phase=decode     # the original's ablation

Same config files, overrides and workdir rules as rhead_jax.sweep (a bare config name resolves to
configs/); the flags below override `config.ablation.*`. Outputs (results.json, Fig. 1 style
heatmaps, sweep_k.{png,csv,md}, report.html) land in --workdir; a killed run resumes. The rules
(mask specs, modes, the failure taxonomy) are documented in rhead_jax/ablation.py.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rhead_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (local path or gs://...); resumable.")
flags.DEFINE_string("scores", None, "Head-score file {\"L-H\": [scores]} (a sweep's head_scores.json).")
flags.DEFINE_string("mask", None, "Heads to mask: top:K | random:K | list:L-H,L-H,... | none (default top:20).")
flags.DEFINE_integer("seed", None, "Seed of random:K (shorthand for --seeds S).")
flags.DEFINE_list("seeds", None, "Seeds of random:K, comma-separated; results are averaged over them.")
flags.DEFINE_list("sweep_k", None, "Numbers of masked heads, e.g. 0,5,10,20: top-k vs k random heads.")
flags.DEFINE_string("task", None, "niah (default) | qa:PATH | cot:PATH.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py or a bare <name>.py).",
                                lock_config=True)

def _ints(values, flag: str) -> list[int] | None:
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise flags.Error(f"--{flag} takes comma-separated integers, got {','.join(values)}") from None


def main(argv):
    del argv
    from rhead_jax import ablation

    config = FLAGS.config
    if config is None:
        raise flags.Error("--config is required, e.g. --config smollm2_135m.py")
    if FLAGS.seed is not None and FLAGS.seeds is not None:
        raise flags.Error("give --seed or --seeds, not both")
    seeds = [FLAGS.seed] if FLAGS.seed is not None else _ints(FLAGS.seeds, "seeds")
    config = ablation.validate_config(ablation.with_overrides(
        config, scores=FLAGS.scores, mask=FLAGS.mask, seeds=seeds, sweep_k=_ints(FLAGS.sweep_k, "sweep_k"),
        task=FLAGS.task))
    workdir = FLAGS.workdir or cli.default_workdir(config, "ablate")
    logging.info("workdir: %s", workdir)
    ablation.run_ablation(config, workdir)


if __name__ == "__main__":
    from rhead_jax.ablation import wrap_config_argv

    sys.argv = wrap_config_argv(sys.argv)
    app.run(main)
