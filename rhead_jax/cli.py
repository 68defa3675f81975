"""Shared command-line plumbing: --config files (ml_collections config_flags) and their lookup."""
from __future__ import annotations

import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from rhead_jax import sweep_config

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def define_config_flag() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py or a bare <name>.py).",
                                    lock_config=True)


def _resolve(value: str) -> str:
    path, sep, rest = value.partition(":")  # config_flags allows file.py:arg
    if not os.path.exists(path):
        for candidate in (REPO_CONFIGS / path, REPO_CONFIGS / f"{path}.py"):
            if candidate.exists():
                return str(candidate) + sep + rest
    return value


def resolve_config_argv(argv: list[str]) -> list[str]:
    """Rewrite `--config yi34b.py` / `--config=yi34b` to the file in the repo's configs/."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, _resolve(argv[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + _resolve(a[len("--config="):])
        out.append(a)
        i += 1
    return out


def get_config():
    config = flags.FLAGS.config
    if config is None:
        raise flags.Error("--config is required, e.g. --config configs/smollm2_135m.py")
    return sweep_config.validate(config)


def default_workdir(config, what: str) -> str:
    name = config.model.name or Path(str(config.model.path)).name or "default"
    return os.path.join("workdir", f"{what}_{name}")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() per the --distributed / --coordinator_address flags."""
    f = flags.FLAGS
    if f.coordinator_address:
        import jax

        jax.distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                                   process_id=f.process_id)
    elif f.distributed:
        import jax

        jax.distributed.initialize()
