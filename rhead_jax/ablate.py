"""Masking ablation of retrieval heads: the needle grid (or a QA / CoT task) with heads masked.

    python -m rhead_jax.ablate --config smollm2_135m.py --scores wd/head_scores.json --mask top:20
    python -m rhead_jax.ablate --config smollm2_135m.py --scores wd/head_scores.json --mask random:20 --seeds 0,1,2
    python -m rhead_jax.ablate --config smollm2_135m.py --mask list:16-19,11-15
    python -m rhead_jax.ablate --config smollm2_135m.py --scores S.json --sweep_k 0,5,10,20 --seeds 0,1,2
    python -m rhead_jax.ablate --config smollm2_135m.py --scores S.json --task qa:my_qa.jsonl
    python -m rhead_jax.ablate --config smollm2_135m.py --workdir W2 --sweep_k 5,10,20 --seeds 0,1,2 \
        --scores copy:W/head_scores.json,mass:W/head_scores_mass.json,duo:G/full_attention_heads.tsv
    ... --config.mask.mode=uniform --config.mask.phase=decode     # the original's ablation

Same config files, overrides, workdir and multi-host flags as rhead_jax.sweep; the flags below
override `config.ablation.*`. Outputs (results.json, Fig. 1 style heatmaps, sweep_k.{png,csv,md},
report.html) land in --workdir; a killed run resumes. Several rankings (`--scores NAME:PATH,...`,
head-score JSONs and gate TSVs) are ablated in one run: top:k@NAME for each ranking and k, next to
one baseline and one set of random runs (drawn from the first ranking's non-retrieval heads). The rules (mask specs, modes, the failure
taxonomy) are documented in the rhead_jax.ablation package.
"""
from __future__ import annotations

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.define_workdir_flags()
flags.DEFINE_string("scores", None, "Head-score file {\"L-H\": [scores]} (a sweep's head_scores.json), or "
                    "several rankings NAME:PATH,NAME:PATH,... (head-score JSONs, gate TSVs).")
flags.DEFINE_string("mask", None, "Heads to mask: top:K | top:K@NAME | random:K | list:L-H,L-H,... | none "
                    "(default top:20).")
flags.DEFINE_integer("seed", None, "Seed of random:K (shorthand for --seeds S).")
flags.DEFINE_list("seeds", None, "Seeds of random:K, comma-separated; results are averaged over them.")
flags.DEFINE_list("sweep_k", None, "Numbers of masked heads, e.g. 0,5,10,20: top-k vs k random heads.")
flags.DEFINE_string("task", None, "niah (default) | qa:PATH | cot:PATH.")


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

    if FLAGS.seed is not None and FLAGS.seeds is not None:
        raise flags.Error("give --seed or --seeds, not both")
    seeds = [FLAGS.seed] if FLAGS.seed is not None else _ints(FLAGS.seeds, "seeds")
    config = cli.get_config()
    sweep_k = _ints(FLAGS.sweep_k, "sweep_k")
    cli.maybe_initialize_distributed()
    workdir = FLAGS.workdir or cli.default_workdir(config, "ablate")
    logging.info("workdir: %s", workdir)
    # run_ablation puts the flags into config.ablation and validates before it loads the model
    ablation.run_ablation(config, workdir, scores=FLAGS.scores, mask=FLAGS.mask, seeds=seeds, sweep_k=sweep_k,
                          task=FLAGS.task)


if __name__ == "__main__":
    cli.run(main)
