"""Per-device memory of the sweep step on a TPU slice, without weights or TPUs (rhead_jax.dryrun).

    python -m rhead_jax.dryrun --config yi34b.py --topology v5p-64 [--context 50000] [--json]
    python -m rhead_jax.dryrun --config mixtral_8x7b.py --smallest v5e --context 31947
    python -m rhead_jax.dryrun --config yi34b.py --topology v5p-64 --mesh data=-1,model=8 --config.sweep.batch_size=4

The step's settings come from the config (--config.sweep.* overrides them), the model's shapes from
its config.json or preset (--preset / --hf_config override them); see rhead_jax/dryrun/cli.py.
"""
from absl import flags

from rhead_jax import cli
from rhead_jax.dryrun import cli as dryrun_cli

dryrun_cli.define_flags()
flags.adopt_module_key_flags(cli)          # --help lists --config, --debug
flags.adopt_module_key_flags(dryrun_cli)   # and the dry-run flags

if __name__ == "__main__":
    cli.run(dryrun_cli.main, rewrite=dryrun_cli.refuse_moved_flags)
