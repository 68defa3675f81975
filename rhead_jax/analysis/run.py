"""`analyze`: every analysis of the given files, and the files it writes (listed in
rhead_jax.analysis); the entry point is rhead_jax/analyze.py."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from rhead_jax import io
from rhead_jax.analysis.compare import compare_pair, compare_rankings, detect_pairs, overlap_matrix
from rhead_jax.analysis.dynamic import ALWAYS_ON_THRESHOLD, dynamic_activation, load_results
from rhead_jax.analysis.headscores import file_summary, load_head_scores, mean_matrix, shape_of
from rhead_jax.errors import UserError
from rhead_jax.report import kinds, plots, write_report
from rhead_jax.report.provenance import file_record, run_record
from rhead_jax.report.trust import stability_sections, thin_section, write_stability
from rhead_jax.scoring import head_means


def _resolve_pair_name(name: str, loaded: dict[str, str]) -> str:
    """A --pair entry names a given file by its label, its path or its file name."""
    if name in loaded.values():
        return next(b for b, p in loaded.items() if p == name)
    if name in loaded:
        return name
    base = os.path.basename(name)
    for label, p in loaded.items():
        if base == os.path.basename(p) and (base == name or (os.path.exists(name) and os.path.samefile(name, p))):
            return label
    raise UserError(f"--pair {name!r} is not one of the input files {sorted(loaded)}: name two of them, "
                    "by path or by file name")


def parse_pairs(pairs: Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    """Pairs as ('a', 'b') tuples or 'a,b' strings."""
    out = []
    for p in pairs:
        items = [x for x in p.split(",")] if isinstance(p, str) else list(p)
        items = [x.strip() for x in items if x.strip()]
        if len(items) != 2:
            raise UserError(f"--pair needs two files (--pair A B or --pair A,B), got {p!r}")
        out.append((items[0], items[1]))
    return out


def _inputs(files: Sequence) -> dict[str, str]:
    """{label: path}: a file is `PATH` (label: its file name) or `NAME:PATH`."""
    from rhead_jax import rankings as rk

    paths: dict[str, str] = {}
    for f in files:
        name, path = rk.split_spec(str(f))
        label = name or os.path.basename(path)
        if label in paths:
            raise UserError(f"two input files share the name {label!r} ({paths[label]}, {path}): outputs are named "
                            "after the file name, so label them (NAME:PATH) or copy one under another name")
        paths[label] = path
    return paths


def _stem(label: str) -> str:
    """A file-name-safe stem of an input's label (its plots are <stem>_heatmap.png, ...)."""
    stem = Path(label).stem if label.endswith((".json", ".tsv")) else label
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem) or "input"


def _pad_head_sets(data: dict, paths: dict) -> dict:
    """QRHead head sets (.yaml: ranked lists, no shape) padded with 0 to the shape of the complete
    head-score files when those agree on it and cover the listed heads."""
    from rhead_jax import rankings as rk

    lists = [n for n in data if Path(paths[n]).suffix in rk.QRHEAD_SUFFIXES]
    shapes = {shape_of(v) for n, v in data.items() if n not in lists}
    if not lists or len(shapes) != 1:
        return data
    L, H = shapes.pop()
    return {n: rk.pad_head_scores(v, L, H) if n in lists and all(a <= b for a, b in zip(shape_of(v), (L, H))) else v
            for n, v in data.items()}


def analyze(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, results: str | None = None,
            pairs: Iterable | None = None, top_k: int = 20, always_on: float = ALWAYS_ON_THRESHOLD,
            report: bool = True, shared_scale: bool = True, group_size: int | None = None,
            overlap_k: Sequence | None = None, stability_json: bool = True) -> dict:
    """Run every analysis and write all outputs; returns {"summary", "pairs", "dynamic", "data", "provenance",
    "rankings", "stability"} (stability_json: write stability.json, rhead_jax.stability).

    files: head-score JSONs and gate TSVs, each `PATH` or `NAME:PATH` (the label of tables and plots;
    default: the file name). The per-file summary, buckets and pairs are the head-score files'; with two
    or more inputs, `compare_rankings` compares every two of them (rankings.json, <level> matrix
    plots) with `group_size` (None: inferred) and the top-k of `overlap_k` (default: [top_k]).
    pairs: None or empty = detected from the file names (`detect_pairs`). shared_scale: one colour scale
    (0 to the largest mean over all files) for every heatmap, so equal colours mean equal scores."""
    from rhead_jax import rankings as rk

    if not files:
        raise UserError("give at least one head-score JSON file (or gate TSV)")
    paths = _inputs(files)
    gates = {name: p for name, p in paths.items() if Path(p).suffix == ".tsv"}
    data = {name: load_head_scores(p) for name, p in paths.items() if name not in gates}
    data = _pad_head_sets(data, paths)
    ranks = [rk.Ranking(name, rk.read_gates_tsv(p), "kv", p) if name in gates
             else rk.Ranking(name, rk.head_score_array(data[name]), "query", p) for name, p in paths.items()]
    # every input is read and checked before anything is written: a bad file or pair fails fast
    named = [(_resolve_pair_name(a, paths), _resolve_pair_name(b, paths)) for a, b in parse_pairs(pairs or ())]
    bad = [n for pair in named for n in pair if n in gates]
    if bad:
        raise UserError(f"--pair compares head-score files; {bad[0]} is a gate file (every two inputs are compared "
                        "in rankings.json and the report's ranking comparison)")
    pairs_source = "given (--pair)" if named else "detected from the file names"
    named = named or detect_pairs(data)
    pair_rows = [compare_pair(data[na], data[nb], top_k, na, nb) for na, nb in named]
    cmp = compare_rankings(ranks, group_size, overlap_k or [top_k]) if len(ranks) > 1 else None
    dynamic = None
    if results:
        dynamic = dynamic_activation(load_results(results), always_on=always_on)
        dynamic["source"] = str(results)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise UserError(f"cannot create the output directory {out} ({e.strerror}): give another --out") from None
    summary, shown = {}, {}
    means = {name: head_means(hs) for name, hs in data.items()}
    vmax = max(max(m.values()) for m in means.values()) if shared_scale and means else None
    above_one = {name: sorted(((h, float(v)) for h, v in m.items() if v > 1.0), key=lambda x: -x[1])
                 for name, m in means.items()}
    for name, hs in data.items():
        entry = {**file_summary(hs, top_k), **kinds.kind_entry(paths[name], hs)}  # a hybrid model's layer kinds
        summary[name] = entry
        stem = _stem(name)
        shown[name] = {**entry, "scale_max": vmax, "above_one": above_one[name], "stem": stem}
        plots.plot_pie(entry, name, out / f"{stem}_pie.png")
        plots.plot_heatmap(mean_matrix(hs), f"{name} ({entry['layers']}x{entry['heads']})",
                           out / f"{stem}_heatmap.png", top=entry["top"], vmax=vmax, kinds=entry.get("layer_kinds"))
    for r in ranks:
        if r.kind == "kv":
            plots.plot_heatmap(r.scores, f"{r.name} ({r.shape[0]}x{r.shape[1]} KV heads)",
                               out / f"{_stem(r.name)}_gates.png", vmax=1.0, label="gate (clipped to [0, 1])",
                               xlabel="KV head")
    stab = write_stability(data, shown, out) if stability_json else None
    io.atomic_write_json(out / "summary.json", summary, indent=1, end="\n")
    io.atomic_write_json(out / "pairs.json", pair_rows, indent=1, end="\n")
    if cmp is not None:
        io.atomic_write_json(out / "rankings.json", cmp, indent=1, end="\n")
        for level, m in cmp["matrix"].items():
            plots.plot_rank_matrix(m, out / f"rankings_{level}.png",
                                   f"per {'query' if level == 'query' else 'KV'} head")
    overlap = overlap_matrix(data, top_k)
    prov = {"files": [file_record(p) for p in paths.values()], "results": file_record(results) if results else None,
            "run": run_record(), "pairs": pairs_source,
            "colour_scale": {"shared": bool(shared_scale), "max": vmax}, "above_one": above_one,
            "overlap": overlap, "labels": {name: p for name, p in paths.items()}}
    io.atomic_write_json(out / "provenance.json", prov, indent=1, end="\n")

    if dynamic is not None:
        io.atomic_write_json(out / "dynamic.json", dynamic, indent=1, end="\n")
        plots.plot_dynamic(dynamic, out / "dynamic_activation.png",
                           f"{os.path.basename(os.path.dirname(os.path.abspath(results))) or results}: "
                           f"head activation over {dynamic['kept']} kept tests")
    if report:
        from rhead_jax.report.sections import analysis_provenance, analysis_sections, ranking_sections
        sections = analysis_sections(prov, pairs_source, top_k) if data else []
        sections += ranking_sections(out, cmp, [(r.name, _stem(r.name)) for r in ranks if r.kind == "kv"])
        sections = thin_section(dynamic) + sections + (
            stability_sections(out, stab, {n: shown[n]["stem"] for n in stab}) if stab else [])
        write_report(out, shown, pair_rows, dynamic, sections=sections, provenance=analysis_provenance(prov))
    return {"summary": summary, "pairs": pair_rows, "dynamic": dynamic, "data": data, "provenance": prov,
            "rankings": cmp, "stability": stab}
