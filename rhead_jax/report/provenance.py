"""Where a report's inputs came from: files (path, size, checksums, notes next to them) and the run.

  file_record(path)                   {"path", "name", "bytes", "sha256", "git_blob", "modified"[, "notes"]}
  run_record(argv=None)               {"generated", "command", "rhead_jax", "python", "jax"?, "host"}
  provenance_html(files, run, items)  the report's Provenance section: a table of the files, the run
                                      and any (label, HTML) items the caller adds (grid, dtype, ...)

`git_blob` is `git hash-object`'s id of the file (so a file can be matched to a commit of its source);
a README.md or PROVENANCE.md in the file's directory is named as its notes. Paths may be gs://.
"""
from __future__ import annotations

import datetime
import hashlib
import html
import os
import platform
import sys
from typing import Sequence

NOTES = ("README.md", "PROVENANCE.md")


def _e(x) -> str:
    return html.escape(str(x))


def file_record(path: str | os.PathLike) -> dict:
    """Checksums and size of one input file (read once)."""
    from rhead_jax import io

    p = io.as_path(path)
    data = p.read_bytes()
    rec = {"path": str(path), "name": p.name, "bytes": len(data),
           "sha256": hashlib.sha256(data).hexdigest(),
           "git_blob": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    try:
        rec["modified"] = datetime.datetime.fromtimestamp(os.stat(path).st_mtime).isoformat(timespec="seconds")
    except (OSError, TypeError, ValueError):  # gs:// paths have no local stat
        pass
    notes = [str(p.parent / n) for n in NOTES if (p.parent / n).exists()]
    if notes:
        rec["notes"] = notes
    return rec


def run_record(argv: Sequence[str] | None = None) -> dict:
    """The command and the software that wrote the report."""
    from importlib import metadata

    try:
        version = metadata.version("rhead_jax")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    rec = {"generated": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(sys.argv if argv is None else argv),
           "rhead_jax": version, "python": platform.python_version(), "host": platform.node()}
    if "jax" in sys.modules:
        rec["jax"] = sys.modules["jax"].__version__
    return rec


def provenance_html(files: Sequence[dict], run: dict | None = None,
                    items: Sequence[tuple[str, str]] = ()) -> str:
    """A table of input files, then label: value lines (values are HTML) for the run and the caller's items."""
    from rhead_jax.report.html import table

    out = []
    if files:
        rows = [[f'<code>{_e(f["path"])}</code>', f'{f["bytes"]:,}', f'<code>{f["sha256"][:16]}</code>',
                 f'<code>{f["git_blob"][:12]}</code>', _e(f.get("modified", "")),
                 "<br>".join(f"<code>{_e(n)}</code>" for n in f.get("notes", [])) or "—"]
                for f in files]
        out.append(table(["input file", "bytes", "sha256 (first 16)", "git blob", "modified", "notes next to it"],
                         rows, left=(0, 4, 5)))
    lines = list(items)
    if run:
        lines += [("command", f'<code>{_e(run["command"])}</code>'),
                  ("software", _e(f'rhead_jax {run["rhead_jax"]}, python {run["python"]}'
                                  + (f', jax {run["jax"]}' if run.get("jax") else ""))),
                  ("generated", _e(f'{run["generated"]} on {run["host"]}'))]
    if lines:
        out.append(table(["", ""], [[f"<b>{_e(k)}</b>", f'<div class="wrap">{v}</div>'] for k, v in lines],
                         left=(0, 1)))
    return "".join(out)
