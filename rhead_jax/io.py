"""Workdir file I/O: local paths or gs:// (through etils.epath, the file API orbax uses).

Every result file is written atomically, so a killed process leaves either the old file or the
new one, never half of one: on a local filesystem to a temporary sibling first, then renamed over
the target (a POSIX rename is atomic); on an object store (gs://, s3://: a rename there is a copy
and a delete, not atomic) in one upload to the final name, which the store publishes only when it
is complete, then read back and compared (write-then-verify). A full disk ends the write with a
UserError (one `error:` line) and no partial file. Readers that need more (a torn copy made by
another tool) validate content: rhead_jax.results_store checksums its batch files.
"""
from __future__ import annotations

import errno
import json
import os
import re
import uuid
from typing import Any

from etils import epath

from rhead_jax.errors import UserError


def as_path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_object_store(path: str | os.PathLike) -> bool:
    """gs://, s3://, ... (anything with a URI scheme): no atomic rename there."""
    return bool(_URI.match(os.fspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` (replacing any old file) so that readers see the old or the new file
    whole: locally a temporary sibling renamed over it, on an object store one upload then a
    read-back check (OSError when it differs). No space left: UserError, no file left behind."""
    path = as_path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_object_store(path):
            _write_object(path, raw)
            return
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(raw)
            tmp.replace(path)  # atomic on POSIX (overwrites)
        except BaseException:  # a full disk, a signal: no temporary left behind
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise UserError(f"no space left to write {path} ({os.strerror(e.errno)}); free space on that "
                            "filesystem or use another --workdir, then run the same command again to resume") from None
        raise


def _write_object(path: epath.Path, raw: bytes) -> None:
    """One upload to the final name (an object becomes visible only once its upload is complete),
    then read back: a stored object that differs is deleted and reported (OSError)."""
    path.write_bytes(raw)
    back = path.read_bytes() if path.exists() else b""
    if back != raw:
        path.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"{path}: the stored object ({len(back)} bytes) differs from the {len(raw)} bytes "
                      "written; run the same command again to rewrite it")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, end: str = "", **dump_kw) -> None:
    """json.dumps(obj, **dump_kw) + end (e.g. "\\n" for a final newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, **dump_kw) + end)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(as_path(path).read_text())
