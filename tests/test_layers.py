"""The package's imports point down only, and no two modules import each other (even lazily).

An AST walk of rhead_jax/ (every `import`, at module level or inside a function): each room (a
top-level module or subpackage) sits in one layer of LAYERS, and a room imports only rooms of its
own layer or below; the bottom rooms (models, needle, scoring, jsonl) import nothing of ours but errors
(needle also the JSONL reader);
the module graph has no cycle (graphlib names one when it finds it). A new room fails here until
it is placed in a layer.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rhead_jax"

# bottom to top (docs/architecture.md, rhead_jax/__init__.py)
LAYERS = {
    "base": {"errors", "jsonl", "io", "models", "needle", "scoring", "sharding", "presets", "config", "cli", "checkpoints",
             "diagnosis", "stability", "rankings", "qa", "report"},
    "engine": {"engine", "prefix", "batches", "host_memory", "runner", "plan", "results_store", "compilation",
               "captures"},
    "features": {"detection", "rounds", "ablation", "analysis", "detectors", "gates", "mixedkv", "dryrun", "exploration"},
    "commands": {"sweep", "ablate", "analyze", "explore"},
}
BOTTOM = {"models": {"errors"}, "needle": {"errors", "jsonl"}, "jsonl": {"errors"}, "scoring": set()}   # what they may import of ours
# the model layer's modules, bottom to top (rhead_jax/models/__init__.py): each imports only modules below it
MODELS = ("hf_config", "config", "rope", "kernels", "attention", "cache", "layers", "windowed", "decoder", "generate",
          "mixed_cache", "mixed")


def module_imports(package: Path) -> dict[str, set[str]]:
    """{module: {modules of the package it imports}} (dotted names; a package is its __init__)."""
    name = package.name
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(target: str) -> str | None:
        while target and target not in files:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] == name and (r := resolve(t)) and r != mod:
                    out.add(r)
    return graph


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def check(package: Path, layers: dict[str, set[str]], bottom: dict[str, set[str]]) -> list[str]:
    """Every violation, as readable lines (empty: the package is layered and acyclic)."""
    graph = module_imports(package)
    rank = {r: i for i, (_, rooms) in enumerate(layers.items()) for r in rooms}
    names = list(layers)
    problems = []
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        problems.append(f"import circle: {' -> '.join(e.args[1])}")
    for mod, deps in sorted(graph.items()):
        a = room(mod)
        if a is None:
            continue
        if a not in rank:
            problems.append(f"{mod}: room {a!r} is in no layer of LAYERS; place it")
            continue
        for dep in sorted(deps):
            b = room(dep)
            if b is None or b == a:
                continue
            if b in rank and rank[b] > rank[a]:
                problems.append(f"{mod} ({names[rank[a]]}) imports {dep} ({names[rank[b]]}): imports point down")
            if a in bottom and b not in bottom[a]:
                problems.append(f"{mod} imports {dep}: {a} imports nothing of ours but {sorted(bottom[a]) or 'nothing'}")
    return problems


def test_imports_point_down_and_have_no_circle():
    problems = check(ROOT, LAYERS, BOTTOM)
    assert not problems, "\n".join(problems)


def test_the_model_layers_modules_point_down():
    """Inside rhead_jax.models, a module imports only the modules below it in MODELS; a new module
    fails here until it is placed."""
    graph = module_imports(ROOT)
    rank = {f"{ROOT.name}.models.{m}": i for i, m in enumerate(MODELS)}
    mods = {m for m in graph if m.startswith(f"{ROOT.name}.models.")}
    assert mods == set(rank), f"place in MODELS: {sorted(mods - set(rank))}; gone: {sorted(set(rank) - mods)}"
    upward = sorted(f"{m} imports {d}" for m in mods for d in graph[m] if d in rank and rank[d] >= rank[m])
    assert not upward, upward


def test_every_layered_room_exists():
    rooms = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in ROOT.glob("*/__init__.py")}
    placed = set().union(*LAYERS.values())
    assert placed <= rooms, f"LAYERS names rooms that are gone: {sorted(placed - rooms)}"


@pytest.mark.parametrize("case", ["circle", "upward", "lazy_circle", "bottom"])
def test_the_check_sees_violations(tmp_path, case):
    """Each kind of violation is found (a check that found nothing would pass vacuously)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "sub/__init__.py", "errors.py", "low.py", "high.py", "sub/a.py", "sub/b.py"):
        (pkg / f).write_text("")
    layers = {"base": {"errors", "low", "sub"}, "top": {"high"}}
    bottom = {}
    if case == "circle":
        (pkg / "sub/a.py").write_text("from pkg.sub import b\n")
        (pkg / "sub/b.py").write_text("from pkg.sub.a import x\n")
        expected = "import circle"
    elif case == "lazy_circle":
        (pkg / "sub/a.py").write_text("from .b import y\n")
        (pkg / "sub/b.py").write_text("def f():\n    import pkg.sub.a\n")
        expected = "import circle"
    elif case == "upward":
        (pkg / "low.py").write_text("from pkg import errors\n\ndef f():\n    from pkg.high import g\n")
        expected = "pkg.low (base) imports pkg.high (top)"
    else:
        (pkg / "low.py").write_text("from pkg.sub import a\n")
        bottom = {"low": {"errors"}}
        expected = "low imports nothing of ours but ['errors']"
    problems = check(pkg, layers, bottom)
    assert len(problems) == 1 and expected in problems[0], problems
    (pkg / "extra.py").write_text("")
    assert any("room 'extra' is in no layer" in p for p in check(pkg, layers, bottom))
