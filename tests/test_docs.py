"""Every `python -m rhead_jax.<command> ...` in README.md and docs/ names a command, flags and
`--config.` keys that exist, so the docs cannot drift from the code.

Commands are read from fenced code blocks (lines joined at a trailing backslash; a line starting
with `...` continues the previous command) and from inline code spans (which may wrap). Each
command's flags are its absl flags, read in a subprocess per command (commands define flags at
import, and several define the same names); `--noFLAG` is accepted for boolean flags; `--config.a.b`
is checked against `config.valid_keys()` and a bare `--config NAME` against the shipped configs.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rhead_jax import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"python -m (rhead_jax(?:\.[A-Za-z_]+)+)")
_FLAG = re.compile(r"(?:^|[\s\[(])--([A-Za-z_][A-Za-z0-9_.]*)(=\S*)?")
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_SPAN = re.compile(r"`([^`]+)`")


def commands_in(text: str) -> list[tuple[str, str]]:
    """[(module, the command's text after the module)] of every rhead_jax command in markdown."""
    found = []
    for block in _FENCE.findall(text):
        module = None
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            m = _COMMAND.search(line)
            if m:
                module = m.group(1)
                found.append((module, line[m.end():]))
            elif line.startswith("...") and module:
                found.append((module, line[3:]))
    prose = _FENCE.sub("", text)
    for span in _SPAN.findall(prose):
        span = " ".join(span.split())
        for m, rest in zip(_COMMAND.finditer(span), re.split(_COMMAND.pattern, span)[2::2]):
            found.append((m.group(1), rest))
    return found


@functools.lru_cache(maxsize=None)
def command_flags(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(all flag names, boolean flag names) a command defines; a missing command fails here."""
    code = (
        "import importlib, importlib.util, json, sys\n"
        f"m = {module!r}\n"
        "main = m + '.__main__'\n"
        "mod = importlib.import_module(main if importlib.util.find_spec(m).submodule_search_locations else m)\n"
        "getattr(mod, '_define_flags', lambda: None)()  # commands that define their flags when run\n"
        "from absl import flags\n"
        "fl = flags.FLAGS._flags()\n"
        "print(json.dumps([sorted(fl), sorted(n for n, f in fl.items() if f.boolean)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        raise AssertionError(f"python -m {module}: cannot import it:\n{proc.stderr[-2000:]}")
    names, booleans = json.loads(proc.stdout.strip().splitlines()[-1])
    return frozenset(names), frozenset(booleans)


def problems(module: str, rest: str) -> list[str]:
    """What in one documented command does not exist (empty when it is all real)."""
    names, booleans = command_flags(module)
    valid_keys = set(config_lib.valid_keys())
    out = []
    tokens = rest.replace("[", " ").replace("]", " ").split()
    for i, token in enumerate(tokens):
        m = _FLAG.match(token)
        if not m:
            continue
        flag = m.group(1)
        if flag.startswith("config."):
            key = flag[len("config."):]
            if key not in valid_keys:
                out.append(f"--config.{key}: no such config key")
        elif flag == "config" and i + 1 < len(tokens) and "=" not in token:
            value = tokens[i + 1]
            if not re.search(r"[<$*{]|WORKDIR", value):
                try:
                    config_lib.resolve_config_path(value)
                except Exception as e:  # noqa: BLE001 - any refusal is the finding
                    out.append(f"--config {value}: {e}")
        elif flag not in names and not (flag.startswith("no") and flag[2:] in booleans):
            out.append(f"--{flag}: not a flag of python -m {module}")
    return out


def documented_commands() -> list[tuple[str, str, str]]:
    return [(path.relative_to(ROOT).as_posix(), module, rest)
            for path in DOCS for module, rest in commands_in(path.read_text())]


def test_docs_show_commands():
    found = documented_commands()
    modules = {m for _, m, _ in found}
    assert {"rhead_jax.sweep", "rhead_jax.ablate", "rhead_jax.analyze", "rhead_jax.dryrun"} <= modules
    assert len(found) > 30


@pytest.mark.parametrize("path", [p.relative_to(ROOT).as_posix() for p in DOCS])
def test_documented_commands_exist(path):
    bad = [f"{module}{rest[:60]}: {p}" for where, module, rest in documented_commands() if where == path
           for p in problems(module, rest)]
    assert not bad, "\n".join(bad)


def test_a_misspelt_flag_or_key_is_caught():
    text = ("```bash\npython -m rhead_jax.ablate --config smollm2_135m.py --sweepk 0,5 \\\n"
            "    --config.sweep.lenghts='(500,)'\n... --config.mask.mode=uniform\n```\n"
            "and inline `python -m rhead_jax.dryrun --config nosuch.py\n--smallest v5e`.\n")
    found = commands_in(text)
    assert [m for m, _ in found] == ["rhead_jax.ablate", "rhead_jax.ablate", "rhead_jax.dryrun"]
    bad = [p for m, rest in found for p in problems(m, rest)]
    assert any(p.startswith("--sweepk:") for p in bad)
    assert any(p.startswith("--config.sweep.lenghts:") for p in bad)
    assert any(p.startswith("--config nosuch.py:") for p in bad)
    assert len(bad) == 3  # --config.mask.mode, --smallest and --config smollm2_135m.py exist


def test_a_missing_command_is_caught():
    with pytest.raises(AssertionError, match="cannot import"):
        command_flags("rhead_jax.nosuchcommand")
