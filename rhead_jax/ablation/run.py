"""`run_ablation`: the grid (or a QA / CoT task) with heads masked, one run per head set, on the engine.

Workdir layout (local or gs://, every file written atomically):
  runs/<task>/<mode>-<phase>/<run label>/   one ResultStore per masked-head set: sweep_config.json
                                            (pinned; a different setting is refused) + batches/
  results.json                              this invocation's summary (schema in rhead_jax.ablation)
  heatmap_<group>.png                       Fig. 1 style: context length x depth, colour = score
  sweep_k.png / sweep_k.csv / sweep_k.md    accuracy vs number of masked heads, top vs random
  report.html                               the figures and tables (rhead_jax.report)
A run's batches are reused by any later invocation that asks for the same run (same heads, mode,
phase and grid), so `--sweep_k` after `--mask top:20` recomputes nothing for top:20. With several
rankings (`--scores NAME:PATH,...`) the baseline and the random runs are run once for all of them,
and the top:K@NAME runs of rankings that mask the same heads are one run (Run.store).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from absl import logging
from tqdm.auto import tqdm

from rhead_jax import config as config_lib
from rhead_jax import io, qa
from rhead_jax.ablation.heads import (MaskSpec, Run, build_head_mask, calibration_means, check_scores, load_rankings,
                                      main_spec, phase_masks, plan_groups)
from rhead_jax.models.decoder import MEAN_MODES
from rhead_jax.ablation.results import format_summary, group_summary, sweep_k_csv, sweep_k_markdown, \
    sweep_k_table
from rhead_jax.ablation.report import report_intro, report_meta, report_provenance, report_sections
from rhead_jax.ablation.taxonomy import CATEGORIES
from rhead_jax.ablation.tasks import make_task, parse_task
from rhead_jax.engine import Engine
from rhead_jax.errors import UserError
from rhead_jax.rankings import check_ranking_shape
from rhead_jax.report import plot_fig1_heatmap, plot_sweep_k, write_report
from rhead_jax.report.provenance import file_record, run_record
from rhead_jax.scoring import head_means


def with_overrides(config, **overrides):
    """A copy of `config` with the `config.ablation` fields named by the keyword arguments that are
    not None replaced (scores, mask, seeds, sweep_k, task, baseline)."""
    c = config.copy_and_resolve_references()
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in c.ablation:
            raise UserError(f"unknown ablation override {k!r}; valid: {', '.join(c.ablation.keys())}")
        c.ablation[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    return c


def validate(c):
    """The schema's checks (rhead_jax.config.validate) plus the mask spec and the task syntax."""
    config_lib.validate(c)
    MaskSpec.parse(c.ablation.mask)
    parse_task(c.ablation.task)
    return c


def _run_json(config, task, run: Run) -> str:
    """What a run's results depend on: pinned in its ResultStore (a mismatch is refused). A top:K@NAME
    run is stored by its head set (Run.store), so its heads are pinned sorted: any ranking's order fits."""
    heads = sorted(run.heads) if run.spec.ranking else run.heads
    return json.dumps({"model": config.model.to_dict(), "task": task.tag, **task.pinned(),
                       "mask": {"mode": config.mask.mode, "phase": config.mask.phase,
                                **({"calibration": config.mask.calibration} if config.mask.mode in MEAN_MODES else {})},
                       "run": run.store, "heads": [list(h) for h in heads]}, sort_keys=True, indent=1)


def _provenance(config, task, score_data, runs, ranks=None, group_size: int = 1) -> dict:
    """What the numbers depend on (no time stamps: results.json stays byte-identical on a rerun)."""
    prov: dict[str, Any] = {
        "model": {"name": config.model.name, "path": config.model.path, "dtype": config.model.dtype},
        "scores": None, "needles": config.needles or "(bundled default needles)",
        "haystack": config.haystack or "(bundled Areopagitica)",
        "max_new_tokens": {"niah": config.sweep.max_new_tokens, "qa": config.ablation.qa_max_new_tokens,
                           "cot": config.ablation.cot_max_new_tokens}[task.kind],
        "faithful": config.sweep.faithful,
        "batch_size": getattr(task, "batch_size", config.sweep.batch_size)}
    if score_data is not None:
        rec = file_record(config.ablation.scores)
        rec.pop("modified", None)
        means = head_means(score_data)
        heads = sorted({tuple(h) for r in runs.values() for h in r.heads})
        prov["scores"] = {**rec, "tests": len(next(iter(score_data.values())))}
        prov["masked_head_scores"] = {f"{l}-{h}": float(means.get(f"{l}-{h}", 0.0)) for l, h in heads}
    elif ranks:
        prov["rankings"] = []
        for r in ranks.values():
            rec = file_record(r.path)
            rec.pop("modified", None)
            prov["rankings"].append({"ranking": r.name, "kind": r.kind, "shape": list(r.shape), **rec})
        first = next(iter(ranks.values())).per_query(group_size)
        heads = sorted({tuple(h) for r in runs.values() for h in r.heads})
        prov["masked_head_scores_ranking"] = next(iter(ranks))
        prov["masked_head_scores"] = {f"{l}-{h}": float(first[l, h]) for l, h in heads}
    if task.kind == "niah":
        by_len: dict[int, list[int]] = {}
        for i in task.instances:
            by_len.setdefault(int(i.length), []).append(int(i.num_prompt_tokens))
        prov["prompt_tokens"] = {str(L): [min(v), max(v)] for L, v in sorted(by_len.items())}
    return prov


def run_ablation(config, workdir: str, *, model=None, scores: str | None = None, mask: str | None = None,
                 seeds: Sequence[int] | None = None, sweep_k: Sequence[int] | None = None,
                 task: str | None = None, baseline: bool | None = None) -> dict:
    """Run (or resume) an ablation into `workdir`; returns the results.json object.

    Keyword arguments that are not None replace the config.ablation fields of the same name.
    With config.mesh asking for several devices, runs are sharded like the sweep's; on several
    hosts every process runs the same batches and process 0 alone writes files.
    """
    t0 = time.time()
    config = validate(with_overrides(config, scores=scores, mask=mask, seeds=seeds, sweep_k=sweep_k,
                                     task=task, baseline=baseline))
    a = config.ablation
    kind, task_path = parse_task(a.task)
    main = MaskSpec.parse(a.mask)
    ks = sorted(set(a.sweep_k))
    need = main.needs_scores or any(k > 0 for k in ks)
    score_data, ranks = load_rankings(a.scores) if (a.scores or need) else (None, {})  # before the model
    if kind != "niah":
        qa.load_tasks(task_path, kind)

    engine = Engine(config, model)
    name, is_writer = engine.name, engine.is_writer
    L, H, K = engine.cfg.num_layers, engine.cfg.num_heads, engine.cfg.num_kv_heads
    if score_data is not None:
        check_scores(score_data, L, H, a.scores)
        scores = score_data
    else:
        for r in ranks.values():
            check_ranking_shape(r, L, H, K)
        scores = ranks or None
    main = main_spec(main, scores)
    groups = plan_groups(main, seeds=list(a.seeds), sweep_k=ks, baseline=a.baseline, scores=scores,
                         num_layers=L, num_heads=H, threshold=a.threshold, group_size=H // K)
    the_task = make_task(engine)

    runs: dict[str, Run] = {}
    for g in groups:
        for r in g.runs:
            runs.setdefault(r.label, r)
    unique: dict[str, Run] = {}  # one run per store: rankings that mask the same heads share it
    for r in runs.values():
        unique.setdefault(r.store, r)
    root = io.as_path(workdir)
    run_root = root / "runs" / the_task.tag / f"{config.mask.mode}-{config.mask.phase}"
    stores = {st: engine.store(str(run_root / st), _run_json(config, the_task, r)) for st, r in unique.items()}
    means = None
    if config.mask.mode in MEAN_MODES and any(r.heads for r in unique.values()):
        means = calibration_means(engine, the_task.prompts(), config.mask.mode, config.mask.calibration)
    sizes = [len(b) for b in the_task.batches]
    nb = len(sizes)
    todo = {st: [b for b in range(nb) if not stores[st].done(b)] for st in unique}
    n_todo = sum(len(v) for v in todo.values())
    logging.info("%s: %d run(s) (%d distinct) x %d batches (%d tests each); %d batches to run, %d already done",
                 name, len(runs), len(unique), nb, sum(sizes), n_todo, len(unique) * nb - n_todo)

    total = len(unique) * sum(sizes)
    bar = tqdm(total=total, initial=total - sum(sizes[b] for v in todo.values() for b in v),
               desc=f"ablate {name}", unit="test")
    store_records = {}
    for st, run in unique.items():
        head_mask = build_head_mask(engine.cfg, run.heads, means) if run.heads else None
        prefill_mask, decode_mask = phase_masks(head_mask, config.mask.phase)
        per_batch = engine.run_batches(
            stores[st], sizes, lambda b: the_task.run(b, prefill_mask, decode_mask, st),  # noqa: B023
            desc=f"ablate {run.label}", bar=bar)
        store_records[st] = the_task.records([r for rs in per_batch for r in rs])
    bar.close()
    run_records = {lbl: store_records[r.store] for lbl, r in runs.items()}
    run_sums = {lbl: the_task.summarize(recs) for lbl, recs in run_records.items()}
    order = {"none": 0, "top": 1, "random": 2, "list": 3}
    groups = sorted(groups, key=lambda g: (g.spec.k, order[g.spec.kind]))  # none, top:5, random:5, top:10, ...
    group_sums = {g.spec.text: group_summary(g, run_sums, run_records) for g in groups}
    main_g = group_sums[main.text]
    results: dict[str, Any] = {
        "model": name, "task": a.task,
        "mask": {"spec": main.text, "mode": config.mask.mode, "phase": config.mask.phase},
        "scores": a.scores or None, "retrieval_threshold": a.threshold, "seeds": list(a.seeds),
        "accuracy": main_g["accuracy"], "accuracy_std": main_g["accuracy_std"], "tests": main_g["tests"],
        "metrics": main_g["metrics"], "masked_heads": main_g["masked_heads"],
    }
    if kind == "niah":
        results["accuracy_by_cell"] = main_g["accuracy_by_cell"]
        results["categories"] = main_g["categories"]
        results["grid"] = {"lengths": sorted(set(config.sweep.lengths)), "depths": sorted(set(config.sweep.depths)),
                           "needles": len({i.needle_index for i in the_task.instances})}
        results["taxonomy"] = {"extraction_ngram": a.extraction_ngram, "categories": list(CATEGORIES),
                               "rules": "see rhead_jax/ablation/taxonomy.py (module docstring)"}
    results["baseline"] = group_sums.get("none")
    results["groups"] = group_sums
    names = [n for n in ranks if n]
    if names:
        results["rankings"] = [{"name": r.name, "path": r.path, "kind": r.kind, "shape": list(r.shape)}
                               for r in ranks.values()]
        results["random_pool"] = (f"heads scoring <= {a.threshold} in the first ranking, {names[0]}")
    results["sweep_k"] = sweep_k_table(ks, group_sums, list(a.seeds), names) if ks else None
    results["runs"] = {lbl: {"spec": r.spec.text, "seed": r.seed, "heads": [list(h) for h in r.heads],
                             **({"store": r.store} if r.store != lbl else {}),
                             **run_sums[lbl], "instances": run_records[lbl]} for lbl, r in runs.items()}
    results["provenance"] = _provenance(config, the_task, score_data, runs, ranks, H // K)

    files: dict[str, Path] = {}
    if is_writer:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            metric = "accuracy (%)" if kind != "qa" else "F1 (%)"
            if kind == "niah":
                for g in groups:
                    gs = group_sums[g.spec.text]
                    f = tmp / f"heatmap_{g.spec.slug}.png"
                    seeds_txt = f", {len(g.runs)} seeds" if len(g.runs) > 1 else ""
                    plot_fig1_heatmap(gs["accuracy_by_cell"], f,
                                      f"{name}: {g.spec.text} masked ({config.mask.mode}/{config.mask.phase}"
                                      f"{seeds_txt})\naccuracy {100 * gs['accuracy']:.1f}")
                    files[f.name] = f
            if results["sweep_k"]:
                f = tmp / "sweep_k.png"
                plot_sweep_k(results["sweep_k"], f, f"{name} on {the_task.tag}: heads masked "
                             f"({config.mask.mode}/{config.mask.phase})", metric=metric)
                files[f.name] = f
                for fname, text in (("sweep_k.csv", sweep_k_csv(results["sweep_k"])),
                                    ("sweep_k.md", sweep_k_markdown(results["sweep_k"]))):
                    (tmp / fname).write_text(text)
                    files[fname] = tmp / fname
            results["files"] = sorted(files) + ["results.json", "report.html"]
            report = write_report(tmp / "report", {}, extra_sections=report_sections(results, files),
                                  title=f"Retrieval-head ablation: {name}", meta=report_meta(results),
                                  intro=report_intro(results),
                                  provenance=report_provenance(results, run_record()))
            for fname, f in files.items():
                io.atomic_write_bytes(root / fname, f.read_bytes())
            io.atomic_write_bytes(root / "report.html", report.read_bytes())
        io.atomic_write_text(root / "results.json", json.dumps(results, indent=1))
    print(format_summary(results), flush=True)
    logging.info("ablation done in %.1fs", time.time() - t0)
    return results
