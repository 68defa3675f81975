"""`run_mixedkv`: the needle grid with a mixed KV cache, one run per head set, on the engine.

Workdir layout (local or gs://, every file written atomically):
  runs/<run label>/      one ResultStore per head set (sweep_config.json pins what its results depend
                         on; a different setting is refused) + batches/
  results.json           this invocation's summary (schema in rhead_jax.mixedkv)
  accuracy_vs_kv.png     accuracy vs KV memory, one line per head choice
  table.md               the printed table
A run's batches are reused by any later invocation that asks for the same head set and grid.
"""
from __future__ import annotations

import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import config as config_lib
from rhead_jax import io
from rhead_jax.batches import grid_batches
from rhead_jax.engine import Engine
from rhead_jax.errors import UserError
from rhead_jax.mixedkv.heads import MixedRun, parse_choices, plan_runs
from rhead_jax.mixedkv.runner import MeasuredRunner, MixedRunner, mixed_layout
from rhead_jax.models.cache import init_cache
from rhead_jax.models.mixed import cache_nbytes
from rhead_jax.needle.rouge import rouge1_recall
from rhead_jax.report.plots import plot_accuracy_vs_kv
from rhead_jax.report.provenance import file_record

FIELDS = ("heads", "full_fraction", "seeds")


def check_grid_overrides(config, overridden: set[str]) -> None:
    """Refuse a command-line `config.sweep.lengths/depths` that config.mixedkv's own grid would
    silently replace (the shipped smollm2_135m.py sets config.mixedkv.lengths)."""
    for key in ("lengths", "depths"):
        if f"sweep.{key}" in overridden and config.mixedkv[key] and f"mixedkv.{key}" not in overridden:
            raise UserError(f"--config.sweep.{key} has no effect here: config.mixedkv.{key}="
                            f"{tuple(config.mixedkv[key])} sets this command's grid; override "
                            f"--config.mixedkv.{key} instead")


def with_overrides(config, **overrides):
    """A copy of `config` with the config.mixedkv fields named by the keyword arguments that are not
    None replaced (heads, full_fraction, seeds), and config.sweep's grid replaced by
    config.mixedkv.lengths / depths when those are set."""
    c = config.copy_and_resolve_references()
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in FIELDS:
            raise UserError(f"unknown mixedkv override {k!r}; valid: {', '.join(FIELDS)}")
        c.mixedkv[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    config_lib.validate(c)
    if c.mixedkv.lengths:
        c.sweep.lengths = tuple(c.mixedkv.lengths)
    if c.mixedkv.depths:
        c.sweep.depths = tuple(c.mixedkv.depths)
    return c


class MixedNiah:
    """The needle grid (config.sweep's, after `with_overrides`), generated with a runner per head set."""

    def __init__(self, engine: Engine):
        self.engine, self.config = engine, engine.config
        self.instances = engine.plan_needles()
        self.batch_size, self.batches = grid_batches(self.instances, self.config.sweep.batch_size)
        self.spec = engine.spec(capture=False)
        self._jits: dict[Any, dict] = {}   # compiled programs per layout, shared by the runs that have it

    def runner(self, run: MixedRun):
        """The plain Runner for a run with every head full ('all': exactly the engine's programs), else
        a MixedRunner of the run's layout."""
        e = self.engine
        if run.full.all():
            return MeasuredRunner(e.cfg, e.model.params, e.mesh)
        m = self.config.mixedkv
        layout, tables = mixed_layout(e.cfg, run.full, e.mesh, sink=m.sink, recent=m.recent)
        return MixedRunner(e.cfg, e.model.params, e.mesh, layout, tables, jits=self._jits.setdefault(layout, {}))

    def pinned(self, run: MixedRun) -> str:
        c = self.config
        return json.dumps({"model": c.model.to_dict(), "needles": c.needles, "haystack": c.haystack,
                           "sweep": c.sweep.to_dict(), "batch_size_used": self.batch_size,
                           "sink": c.mixedkv.sink, "recent": c.mixedkv.recent, "run": run.label,
                           "full_heads": run.heads}, sort_keys=True, indent=1)

    def run(self, b: int, runner, label: str) -> list[dict]:
        batch = [self.instances[i] for i in self.batches[b]]
        shared = self.engine.shared_prefix(self.instances, self.spec, label=label, runner=runner)
        out = self.engine.generate([i.prompt_ids for i in batch], self.spec, batch_size=self.batch_size, shared=shared,
                                   keys=[i.key for i in batch], runner=runner)
        rows, size, nbytes = runner.last_cache
        full = cache_nbytes(jax.eval_shape(lambda: init_cache(self.engine.cfg, rows, size)))
        results = []
        for r, inst in enumerate(batch):
            generated = out.generated(r)
            response = self.engine.decode(generated)
            results.append({
                "key": inst.key, "length": inst.length, "depth": inst.depth, "needle_index": inst.needle_index,
                "prompt_tokens": inst.num_prompt_tokens, "generated": generated, "response": response,
                "rouge1_recall": rouge1_recall(inst.answer, response), "kv_bytes": nbytes // rows,
                "full_kv_bytes": full // rows})
        return results


def _by(records, key) -> dict:
    groups = collections.defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(sorted(groups.items()))


def run_summary(records: Sequence[dict]) -> dict:
    """Accuracy (mean ROUGE-1 recall, 0-1) overall, per length and per cell; KV bytes per instance."""
    acc = lambda rs: float(np.mean([r["rouge1_recall"] for r in rs]))  # noqa: E731
    return {"tests": len(records), "accuracy": acc(records),
            "accuracy_by_length": {str(L): acc(rs) for L, rs in _by(records, lambda r: r["length"]).items()},
            "accuracy_by_cell": [{"length": L, "depth": d, "accuracy": acc(rs), "tests": len(rs)}
                                 for (L, d), rs in _by(records, lambda r: (r["length"], r["depth"])).items()],
            "kv_bytes_per_instance": {str(L): int(np.mean([r["kv_bytes"] for r in rs]))
                                      for L, rs in _by(records, lambda r: r["length"]).items()},
            "full_kv_bytes_per_instance": {str(L): int(np.mean([r["full_kv_bytes"] for r in rs]))
                                           for L, rs in _by(records, lambda r: r["length"]).items()},
            "kv_fraction": float(sum(r["kv_bytes"] for r in records) / sum(r["full_kv_bytes"] for r in records))}


def group_summaries(runs: Sequence[MixedRun], sums: dict[str, dict]) -> list[dict]:
    """One row per (choice, fraction): the mean over its runs (random: seeds; std over them)."""
    groups: dict[tuple, list[MixedRun]] = {}
    for r in runs:
        groups.setdefault((r.choice.name, r.fraction), []).append(r)
    out = []
    for (name, fraction), rs in groups.items():
        accs = [sums[r.label]["accuracy"] for r in rs]
        lengths = list(sums[rs[0].label]["accuracy_by_length"])
        out.append({
            "choice": name, "kind": rs[0].choice.kind, "fraction": fraction,
            "full_kv_heads": int(rs[0].full.sum()), "kv_heads": int(rs[0].full.size),
            "runs": [r.label for r in rs], "seeds": [r.seed for r in rs if r.seed is not None],
            "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)) if len(accs) > 1 else 0.0,
            "accuracy_by_length": {L: float(np.mean([sums[r.label]["accuracy_by_length"][L] for r in rs]))
                                   for L in lengths},
            "kv_bytes_per_instance": sums[rs[0].label]["kv_bytes_per_instance"],
            "kv_fraction": float(np.mean([sums[r.label]["kv_fraction"] for r in rs]))})
    return out


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.2f}"


def format_table(results: dict) -> str:
    """The printed table (markdown): one row per (choice, fraction)."""
    lengths = [str(L) for L in results["grid"]["lengths"]]
    longest = lengths[-1]
    head = (["choice", "full fraction", "full KV heads", f"KV / instance at {longest} (MiB)", "KV (% of full)",
             "accuracy (%)"] + [f"acc. {L}" for L in lengths])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in results["groups"]:
        acc = f"{100 * g['accuracy']:.1f}"
        if g["seeds"] and len(g["seeds"]) > 1:
            acc += f" ± {100 * g['accuracy_std']:.1f} ({len(g['seeds'])} seeds)"
        frac = "-" if g["fraction"] is None else f"{g['fraction']:g}"
        row = [g["choice"], frac, f"{g['full_kv_heads']}/{g['kv_heads']}", _mib(g["kv_bytes_per_instance"][longest]),
               f"{100 * g['kv_fraction']:.1f}", acc] + [f"{100 * g['accuracy_by_length'][L]:.1f}" for L in lengths]
        lines.append("| " + " | ".join(row) + " |")
    full = results["full_kv_bytes_per_instance"]
    lines.append("")
    lines.append("full KV cache per instance (MiB): " + ", ".join(f"{L}: {_mib(full[L])}" for L in lengths)
                 + f"; streaming heads keep sink {results['sink']} + recent {results['recent']} positions")
    return "\n".join(lines)


def plot_lines(results: dict) -> list[dict]:
    lines: dict[str, dict] = {}
    for g in results["groups"]:
        ln = lines.setdefault(g["choice"], {"label": g["choice"], "x": [], "y": [], "yerr": [], "text": []})
        ln["x"].append(100 * g["kv_fraction"])
        ln["y"].append(g["accuracy"])
        ln["yerr"].append(g["accuracy_std"])
        ln["text"].append("" if g["fraction"] is None else f"{g['fraction']:g}")
        if g["kind"] == "random":
            n = len(g["seeds"])
            ln["label"] = f"random ({n} seeds, mean ± std)" if n > 1 else f"random (seed {g['seeds'][0]})"
        elif g["kind"] == "none":
            ln["label"] = "none (all streaming)"
        elif g["kind"] == "all":
            ln["label"] = "all (full cache)"
    return list(lines.values())


def run_mixedkv(config, workdir: str, *, model=None, heads: Sequence[str] | None = None,
                full_fraction: Sequence[float] | None = None, seeds: Sequence[int] | None = None) -> dict:
    """Run (or resume) the evaluation into `workdir`; returns the results.json object."""
    t0 = time.time()
    config = with_overrides(config, heads=heads, full_fraction=full_fraction, seeds=seeds)
    m = config.mixedkv
    choices = parse_choices(m.heads)           # ranking files read before the model loads
    engine = Engine(config, model)
    cfg, name = engine.cfg, engine.name
    runs = plan_runs(choices, m.full_fraction, m.seeds, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                     group_size=cfg.group_size)
    task = MixedNiah(engine)
    root = io.as_path(workdir)
    stores = {r.label: engine.store(str(root / "runs" / r.label), task.pinned(r)) for r in runs}
    sizes = [len(b) for b in task.batches]
    todo = {r.label: [b for b in range(len(sizes)) if not stores[r.label].done(b)] for r in runs}
    n_todo = sum(len(v) for v in todo.values())
    logging.info("%s: %d run(s) x %d batches (%d tests each), grid lengths %s x depths %s; %d batches to run, "
                 "%d already done", name, len(runs), len(sizes), sum(sizes), list(config.sweep.lengths),
                 list(config.sweep.depths), n_todo, len(runs) * len(sizes) - n_todo)
    total = len(runs) * sum(sizes)
    bar = tqdm(total=total, initial=total - sum(sizes[b] for v in todo.values() for b in v),
               desc=f"mixedkv {name}", unit="test")
    sums, records = {}, {}
    for run in runs:
        runner = task.runner(run) if todo[run.label] else None
        per_batch = engine.run_batches(stores[run.label], sizes, lambda b: task.run(b, runner, run.label),  # noqa: B023
                                       desc=f"mixedkv {run.label}", bar=bar)
        records[run.label] = [r for rs in per_batch for r in rs]
        sums[run.label] = run_summary(records[run.label])
    bar.close()
    groups = group_summaries(runs, sums)
    lengths = sorted({int(i.length) for i in task.instances})
    full_bytes = {str(L): sums[runs[0].label]["full_kv_bytes_per_instance"][str(L)] for L in lengths}
    results: dict[str, Any] = {
        "model": name,
        "grid": {"lengths": lengths, "depths": sorted({int(i.depth) for i in task.instances}),
                 "needles": len({i.needle_index for i in task.instances}), "tests": len(task.instances)},
        "sink": m.sink, "recent": m.recent, "full_fractions": [float(f) for f in m.full_fraction],
        "seeds": list(m.seeds), "kv_heads": {"layers": cfg.num_layers, "per_layer": cfg.num_kv_heads,
                                             "group_size": cfg.group_size},
        "choices": [{"name": c.name, "kind": c.kind, "source": c.source,
                     "ranking_kind": None if c.ranking is None else c.ranking.kind} for c in choices],
        "full_kv_bytes_per_instance": full_bytes,
        "groups": groups,
        "runs": {r.label: {"choice": r.choice.name, "fraction": r.fraction, "seed": r.seed, "full_heads": r.heads,
                           **sums[r.label], "instances": records[r.label]} for r in runs},
        "provenance": {"model": {"name": config.model.name, "path": config.model.path, "dtype": config.model.dtype},
                       "needles": config.needles or "(bundled default needles)",
                       "haystack": config.haystack or "(bundled Areopagitica)",
                       "max_new_tokens": config.sweep.max_new_tokens, "batch_size": task.batch_size,
                       "rankings": {}},
    }
    for c in choices:
        if c.source is not None:
            rec = file_record(c.source)
            rec.pop("modified", None)
            results["provenance"]["rankings"][c.name] = rec
    table = format_table(results)
    if engine.is_writer:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "accuracy_vs_kv.png"
            depths = "/".join(map(str, results["grid"]["depths"]))
            plot_accuracy_vs_kv(plot_lines(results), png,
                                f"{name}: mixed KV cache (sink {m.sink} + recent {m.recent})\nneedles at "
                                f"{'/'.join(map(str, lengths))} tokens, depths {depths}%", metric="ROUGE-1 recall (%)")
            results["files"] = ["accuracy_vs_kv.png", "table.md", "results.json"]
            io.atomic_write_bytes(root / "accuracy_vs_kv.png", png.read_bytes())
        io.atomic_write_text(root / "table.md", table + "\n")
        io.atomic_write_text(root / "results.json", json.dumps(results, indent=1))
    print(table, flush=True)
    logging.info("mixedkv done in %.1fs", time.time() - t0)
    return results

