"""setup.py's keyword arguments, read by running it with `setuptools.setup` replaced (no build)."""
from __future__ import annotations

import functools
import re
import runpy
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def setup_kwargs() -> dict:
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def requirement_name(req: str) -> str:
    """'etils[epath]>=1' -> 'etils' (PEP 503 normalized: lowercase, runs of -_. as '-')."""
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()
