"""What each head copied, step by step, on one self-contained page (docs/explore.md).

    python -m rhead_jax.explore WORKDIR --out DIR [--tests KEY,KEY] [--heads L-H,L-H]
        [--top_heads 16] [--zero_heads 4] [--max_tests 60] [--debug]

WORKDIR: a finished sweep's --workdir, run with --config.sweep.save_captures=True (a sweep without
captures is refused with one `error:` line naming that flag). Writes DIR/explore.html (inline script
and styles, nothing fetched; open it from disk or a static host) and prints its size and what it
holds. The work is rhead_jax.exploration's; a bad input prints one `error:` line and exits with
status 2 (rhead_jax.cli).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from rhead_jax import cli
from rhead_jax.errors import UserError

FLAGS = flags.FLAGS
USAGE = "python -m rhead_jax.explore WORKDIR --out DIR [--tests KEY,...] [--heads L-H,...]"


def _define_flags() -> None:
    """Defined when the command runs, not on import (tests import this module)."""
    from rhead_jax import exploration as ex

    flags.DEFINE_string("out", None, "Output directory (explore.html is written there).")
    flags.DEFINE_list("tests", [], "Test keys to put on the page (results.jsonl's, e.g. L500_D50_N0); default: all, "
                                   "at most --max_tests evenly spaced over the grid.")
    flags.DEFINE_list("heads", [], "Heads (LAYER-HEAD, e.g. 18-6) whose step-by-step captures go on the page; default: "
                                   "the --top_heads best by mean score and --zero_heads zero-score heads.")
    flags.DEFINE_integer("top_heads", ex.TOP_HEADS, "Default heads: this many best by mean retrieval score.")
    flags.DEFINE_integer("zero_heads", ex.ZERO_HEADS, "Default heads: and this many heads that never copy, for contrast.")
    flags.DEFINE_integer("max_tests", ex.MAX_TESTS, "Without --tests: at most this many tests, evenly spaced.")


def main(argv: Sequence[str]) -> None:
    from rhead_jax import exploration as ex

    args = list(argv[1:])
    if len(args) != 1:
        raise UserError(f"give one sweep workdir ({'none' if not args else len(args)} given): {USAGE}")
    if not FLAGS.out:
        raise UserError(f"--out is required (the output directory): {USAGE}")
    if FLAGS.top_heads < 0 or FLAGS.zero_heads < 0:
        raise UserError(f"--top_heads and --zero_heads must be 0 or more, got {FLAGS.top_heads} and {FLAGS.zero_heads}")
    data = ex.page_data(args[0], tests=FLAGS.tests, heads=FLAGS.heads, top_heads=FLAGS.top_heads,
                        zero_heads=FLAGS.zero_heads, max_tests=FLAGS.max_tests)
    path = ex.write_page(data, FLAGS.out)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB): {len(data['tests'])} of {data['all_tests']} tests, "
          f"{len(data['chosen_heads'])} of {data['layers'] * data['heads']} heads step by step ({data['heads_why']})")


def run() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
