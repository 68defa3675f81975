"""The one command-line shape of every command: `--config` (a file or a shipped name, overridden
with `--config.a.b=value`), `--workdir`, the multi-host flags, `--debug`, and `run(main)`, which
turns a user's mistake into one line `error: ...` and exit status 2 (`--debug` keeps the traceback).

    from rhead_jax import cli
    cli.define_config_flag()
    cli.define_workdir_flags()

    def main(argv):
        config = cli.get_config()
        ...

    if __name__ == "__main__":
        cli.run(main)
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from rhead_jax import config as config_lib
from rhead_jax.errors import UserError

FLAGS = flags.FLAGS
USER_ERRORS = (UserError, ValueError, FileNotFoundError, flags.Error)
_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=|$)")

flags.DEFINE_bool("debug", False, "On a user error, show the Python traceback instead of one `error:` line.")


def define_config_flag() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file: a path, or a shipped name such as "
                                    "smollm2_135m.py or yi34b (rhead_jax.configs).", lock_config=True)


def define_workdir_flags() -> None:
    """--workdir and the multi-host flags of the commands that run the model (sweep, ablate)."""
    flags.DEFINE_string("workdir", None, "Output directory (local path or gs://...); resumable.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods: "
                      "every host runs the same command; settings come from the TPU environment).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a TPU "
                        "environment, e.g. two local processes); implies --distributed.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
    """`--config yi34b.py` / `--config=yi34b` -> the shipped file's path; unknown overrides refused.

    config_flags would load a missing file or set an unknown key with a traceback; both are
    checked here first, against the one schema (rhead_jax.config)."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, config_lib.resolve_config_path(argv[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + config_lib.resolve_config_path(a[len("--config="):])
        m = _OVERRIDE.match(a)
        if m:
            config_lib.check_keys([m.group(1)])
        out.append(a)
        i += 1
    return out


def overridden_keys(argv: Sequence[str] | None = None) -> set[str]:
    """The dotted config keys set on the command line (`--config.a.b=value` -> "a.b")."""
    return {m.group(1) for a in (sys.argv if argv is None else argv) if (m := _OVERRIDE.match(a))}


def get_config():
    """The validated config of `--config` (after its command-line overrides)."""
    config = FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config smollm2_135m.py")
    return config_lib.validate(config)


def config_path() -> str | None:
    return FLAGS["config"].config_filename if FLAGS["config"].present else None


def default_workdir(config, what: str) -> str:
    name = config.model.name or Path(str(config.model.path)).name or "default"
    return os.path.join("workdir", f"{what}_{name}")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() per the --distributed / --coordinator_address flags."""
    if FLAGS.coordinator_address:
        import jax

        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        import jax

        jax.distributed.initialize()


def _fail(e: BaseException) -> None:
    msg = str(e).strip().strip('"') or type(e).__name__
    print(f"error: {msg.splitlines()[0] if isinstance(e, flags.Error) else ' '.join(msg.split())}",
          file=sys.stderr, flush=True)
    sys.exit(2)


def _debug_requested(argv: Sequence[str]) -> bool:
    return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None,
        rewrite: Callable[[list[str]], list[str]] | None = None) -> None:
    """absl's app.run with bare config names resolved and user errors as one `error:` line."""
    argv = list(sys.argv if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        argv = resolve_config_argv(rewrite(argv) if rewrite else argv)
    except USER_ERRORS as e:
        if debug:
            raise
        _fail(e)

    def guarded(args):
        try:
            return main(args)
        except USER_ERRORS as e:
            if FLAGS.debug:
                raise
            _fail(e)

    def parse(args):
        try:
            return FLAGS(args)
        except flags.Error as e:  # a bad flag or override value: absl would print its usage text
            if debug:
                raise
            _fail(e)

    app.run(guarded, argv=argv, flags_parser=parse)
