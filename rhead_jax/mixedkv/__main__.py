"""Mixed KV cache on the needle grid: accuracy vs KV memory per head choice (rhead_jax.mixedkv).

    python -m rhead_jax.mixedkv --config smollm2_135m.py --heads copy:WD/head_scores.json,random,none,all \
        --full_fraction 0.1,0.25,0.5 --workdir /tmp/mixedkv
    python -m rhead_jax.mixedkv --config smollm2_135m.py --heads gates:full_attention_heads.tsv --seeds 0 \
        --config.mixedkv.lengths='(2000,)' --config.mixedkv.sink=64 --config.mixedkv.recent=256

Same config files, overrides, workdir and multi-host flags as rhead_jax.sweep; the flags below override
`config.mixedkv.*`. The grid is config.mixedkv.lengths / depths, or config.sweep's when those are empty.
Outputs (results.json, table.md, accuracy_vs_kv.png) land in --workdir; a killed run resumes.
"""
from __future__ import annotations

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.define_workdir_flags()
flags.DEFINE_list("heads", None, "Head choices, comma-separated: NAME:PATH (a head-score .json or gate .tsv ranking), "
                  "random, none, all (default: config.mixedkv.heads).")
flags.DEFINE_list("full_fraction", None, "Fractions of KV heads kept full, e.g. 0.1,0.25,0.5.")
flags.DEFINE_list("seeds", None, "Seeds of the random choice, e.g. 0,1,2.")
flags.adopt_module_key_flags(cli)


def _numbers(values, flag: str, kind):
    if values is None:
        return None
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise flags.Error(f"--{flag} takes comma-separated {kind.__name__}s, got {','.join(values)}") from None


def main(argv):
    del argv
    fractions = _numbers(FLAGS.full_fraction, "full_fraction", float)
    seeds = _numbers(FLAGS.seeds, "seeds", int)
    config = cli.get_config()
    from rhead_jax.mixedkv import run_mixedkv
    from rhead_jax.mixedkv.run import check_grid_overrides

    check_grid_overrides(config, cli.overridden_keys())
    cli.maybe_initialize_distributed()
    workdir = FLAGS.workdir or cli.default_workdir(config, "mixedkv")
    logging.info("workdir: %s", workdir)

    run_mixedkv(config, workdir, heads=FLAGS.heads, full_fraction=fractions, seeds=seeds)


if __name__ == "__main__":
    cli.run(main)
