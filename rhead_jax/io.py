"""Workdir file I/O: local paths or gs:// (through etils.epath, the file API orbax uses).

Every result file is written atomically: to a temporary sibling first, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary sibling renamed over it (replacing any old file)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)  # atomic on POSIX (overwrites); on GCS a finished object write is all-or-nothing


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, end: str = "", **dump_kw) -> None:
    """json.dumps(obj, **dump_kw) + end (e.g. "\\n" for a final newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, **dump_kw) + end)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(as_path(path).read_text())
