"""Benchmarks: each prints ratios against a baseline run in the same invocation (never timed tests)."""
from __future__ import annotations

import sys


def int_items(text: str, flag: str, *, sep: str | None = None, parts: tuple[int, ...] = (1,), form: str = "") -> list:
    """The comma-separated items of a benchmark flag: ints (sep None), or tuples of `parts` ints
    joined by sep ("9x576", "40@1856"). A bad value ends the run with one `error:` line naming the
    flag and the form (exit 2)."""
    try:
        items = [int(t) if sep is None else tuple(int(v) for v in t.split(sep)) for t in text.split(",")]
        if sep is not None and any(len(t) not in parts for t in items):
            raise ValueError
        return items
    except ValueError:
        print(f"error: {flag} {text!r}: give {form or 'comma-separated integers'}", file=sys.stderr)
        sys.exit(2)
