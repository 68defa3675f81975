"""setup.py declares every third-party package that rhead_jax imports (torch hides missing ones).

The runtime half of this check is in .ci/run: it runs the sweep, an ablation and the analysis in a
venv with only `pip install -e .` (no torch, no test extras) before the test suite.
"""
from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

from tests.helpers.setup_meta import ROOT, requirement_name, setup_kwargs

# imported by a dependency at run time, not by our code: each with the path that needs it
RUNTIME_ONLY = {"jinja2": "transformers' apply_chat_template (every chat-model prompt)"}


def imported_top_level(package: Path) -> dict[str, set[str]]:
    """{top-level module: {files importing it}} for absolute imports anywhere in `package`."""
    out: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return out


def third_party(modules) -> dict[str, str]:
    """module -> its distribution's normalized name (stdlib and rhead_jax dropped)."""
    dists = importlib.metadata.packages_distributions()
    out = {}
    for m in modules:
        if m in sys.stdlib_module_names or m == "rhead_jax":
            continue
        assert m in dists, f"{m} is imported by rhead_jax but installed by no distribution here"
        out[m] = requirement_name(dists[m][0])
    return out


def test_every_import_is_declared():
    declared = {requirement_name(r) for r in setup_kwargs()["install_requires"]}
    used = imported_top_level(ROOT / "rhead_jax")
    missing = {m: sorted(used[m]) for m, dist in third_party(used).items() if dist not in declared}
    assert not missing, f"imported but not in setup.py install_requires: {missing}"


def test_runtime_only_dependencies_are_declared():
    declared = {requirement_name(r) for r in setup_kwargs()["install_requires"]}
    assert set(RUNTIME_ONLY) <= declared, {k: v for k, v in RUNTIME_ONLY.items() if k not in declared}


def test_the_scan_sees_imports(tmp_path):
    """The scanner finds nested and from-imports (a scan that found nothing would pass vacuously)."""
    (tmp_path / "m.py").write_text("import os\nfrom jinja2 import Template\n\ndef f():\n    import numpy.linalg\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        found = imported_top_level(tmp_path)
    finally:
        ROOT = old
    assert set(found) == {"os", "jinja2", "numpy"}
    assert third_party(found) == {"jinja2": "jinja2", "numpy": "numpy"}


def test_the_test_venv_has_the_extras_of_the_slow_tests():
    """`make test` (CI) builds its venv with the extras the real-weight tests need, so they run instead
    of skipping: `test` (pytest, accelerate) and `gemma3` (Gemma-3-270M's GGUF, tests/test_real_gemma3.py,
    tests/test_gguf_gemma3.py); each is an extra of setup.py."""
    import re

    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed-test:", 1)[1].split("\n\n", 1)[0]
    extras = re.search(r"-e '\.\[([a-z0-9,]+)\]'", recipe)
    assert extras, recipe
    installed = set(extras.group(1).split(","))
    assert {"test", "gemma3"} <= installed, installed
    assert installed <= set(setup_kwargs()["extras_require"]), installed
