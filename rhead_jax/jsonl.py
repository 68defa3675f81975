"""The JSONL files a user gives (needles, QA and CoT tasks, a sweep's results.jsonl): one JSON
object per line, blank lines skipped. A line that is not such an object is a UserError naming the
file, the line and the fix. Imports only rhead_jax.errors, so every room (needle/ too) may use it.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence

from rhead_jax.errors import UserError


def objects(lines: Iterable[str], *, where: str, fields: Sequence[str] = (), fix: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `lines`, each a JSON object holding
    `fields`; where: how a message names the file (e.g. "needles file /x.jsonl"); fix: what the
    user should do, ending each message."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}, line {n}: not valid JSON ({e.msg} at column {e.colno}); {fix}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}, line {n}: expected a JSON object, got {type(rec).__name__}; {fix}")
        missing = [k for k in fields if k not in rec]
        if missing:
            raise UserError(f"{where}, line {n}: missing field(s) {', '.join(missing)}; {fix}")
        yield n, rec
