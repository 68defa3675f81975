"""Analysis of head-score files (Wu et al. 2024, Fig. 3 and §3 properties) and of one sweep's per-test results.

The library behind `python -m rhead_jax.analyze` (the command: rhead_jax/analyze.py).

Inputs are head-score files in the original format, `{"<layer>-<head>": [score_test_1, ...], ...}`
(0-based layer and query head, one list per head, all of the same length). A head's retrieval score is
the mean of its list; a mean > 0.1 (`scoring.RETRIEVAL_THRESHOLD`) marks a retrieval head.

Writes into DIR:
  summary.json                {"<file name>": {"buckets", "layers", "heads", "tests", "retrieval_heads", "top"}}
  <stem>_pie.png              share of heads per score bucket (paper Fig. 3)
  <stem>_heatmap.png          layer x head mean scores, one colour scale 0..max over all files
  pairs.json                  per pair (--pair, or detected from the file names: a base model and its
                              -Chat / -Instruct, Mistral and Mixtral): top-k overlap, Spearman correlation
  provenance.json             the input files (path, bytes, sha256, git blob id, notes next to them), the
                              command, the shared colour scale, the cross-model top-k overlap
  dynamic.json                (--results) activation rate per head, always-on vs context-specific heads
  dynamic_activation.png      (--results) activation rate per head, sorted
  report.html                 everything above in one self-contained page (rhead_jax.report)

`load_head_scores`, `file_summary`, `bucket_shares`, `spearman`, `top_overlap`, `compare_pair`,
`dynamic_activation` compute; `analyze` runs them all and writes the files above. A file the user
gave that cannot be used (missing, not JSON, a malformed head key, ...) raises
rhead_jax.errors.UserError naming the file and the fix. The figures and the page come from
rhead_jax.report; the vocabulary both use (BUCKETS, parse_head) is rhead_jax.scoring's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from rhead_jax import io
from rhead_jax.errors import UserError
from rhead_jax.report import plots, write_report
from rhead_jax.report.provenance import file_record, run_record
from rhead_jax.scoring import (BUCKET_EDGES, BUCKETS, RETRIEVAL_THRESHOLD, head_means, parse_head,
                               retrieval_heads, top_heads)

ALWAYS_ON_THRESHOLD = 0.9


# ----------------------------------------------------------------------------------------------- loading
FORMAT_HINT = ('a head-score file is a JSON object {"<layer>-<head>": [score, ...], ...} '
               "such as a sweep's head_scores.json")


def _read_json(path: str | os.PathLike, what: str):
    try:
        return io.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found: check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory: give the JSON file in it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); {FORMAT_HINT}") from None


def load_head_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read one `{"L-H": [scores]}` file and check its keys and that its lists have one common length."""
    data = _read_json(path, "head-score file")
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object; {FORMAT_HINT}")
    for key, v in data.items():
        try:
            parse_head(key)
        except ValueError:
            raise UserError(f"{path}: head key {key!r} is not '<layer>-<head>' (0-based integers, e.g. '12-3'); "
                            f"{FORMAT_HINT}") from None
        if not isinstance(v, list):
            raise UserError(f"{path}: head {key!r} has {type(v).__name__} {v!r:.40}, not a list of scores; "
                            f"{FORMAT_HINT}")
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise UserError(f"{path}: heads have lists of different lengths {sorted(lengths)}; every head needs "
                        "one score per test")
    return data


def shape_of(head_scores: dict[str, list[float]]) -> tuple[int, int]:
    """(layers, heads) = 1 + the largest layer and head index among the keys."""
    idx = np.array([parse_head(k) for k in head_scores])
    return int(idx[:, 0].max()) + 1, int(idx[:, 1].max()) + 1


def mean_matrix(head_scores: dict[str, list[float]]) -> np.ndarray:
    """[L, H] float array of mean scores (NaN where a key is missing)."""
    L, H = shape_of(head_scores)
    out = np.full((L, H), np.nan)
    for key, m in head_means(head_scores).items():
        out[parse_head(key)] = m
    return out


# ---------------------------------------------------------------------------------------------- per file
def bucket_of(mean: float) -> str:
    """Fig. 3 bucket of one mean score. Scores are non-negative; a mean <= 0 counts as '=0'."""
    if mean <= BUCKET_EDGES[0]:
        return BUCKETS[0]
    if mean <= BUCKET_EDGES[1]:
        return BUCKETS[1]
    if mean <= BUCKET_EDGES[2]:
        return BUCKETS[2]
    return BUCKETS[3]


def bucket_counts(means: Iterable[float]) -> dict[str, int]:
    counts = {b: 0 for b in BUCKETS}
    for m in means:
        counts[bucket_of(m)] += 1
    return counts


def bucket_shares(means: Iterable[float]) -> dict[str, float]:
    """Percentages 0-100 of heads per bucket (they sum to 100)."""
    counts = bucket_counts(means)
    total = sum(counts.values())
    return {b: (100.0 * c / total if total else 0.0) for b, c in counts.items()}


def file_summary(head_scores: dict[str, list[float]], top_k: int = 20) -> dict:
    """The summary.json entry of one file."""
    means = head_means(head_scores)
    L, H = shape_of(head_scores)
    return {
        "buckets": bucket_shares(means.values()),
        "layers": L,
        "heads": H,
        "tests": len(next(iter(head_scores.values()))),
        "retrieval_heads": len(retrieval_heads(head_scores)),
        "top": [[k, float(v)] for k, v in top_heads(head_scores, top_k)],
    }


# ------------------------------------------------------------------------------------------------- pairs
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (scipy.stats.rankdata). NaN if
    either side is constant (scipy.stats.spearmanr would warn and return NaN too).

    The correlation of the ranks is written out rather than taken from scipy.stats.spearmanr: that
    one agrees to ~1e-16 but not bit for bit, and pairs.json keeps its exact digits (and symmetry)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = stats.rankdata(a), stats.rankdata(b)  # method="average": ties share the mean of their ranks
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db / denom) if denom > 0 else float("nan")


def top_overlap(a: dict[str, list[float]], b: dict[str, list[float]], k: int = 20) -> tuple[int, list[str]]:
    """|top-k(A) ∩ top-k(B)| and the common heads, in A's order."""
    top_a = [h for h, _ in top_heads(a, k)]
    top_b = {h for h, _ in top_heads(b, k)}
    common = [h for h in top_a if h in top_b]
    return len(common), common


def compare_pair(a: dict[str, list[float]], b: dict[str, list[float]], k: int = 20,
                 name_a: str = "a", name_b: str = "b") -> dict:
    """Top-k overlap and Spearman correlation of all heads' means (the paper's 'intrinsic' property)."""
    if set(a) != set(b):
        raise UserError(f"{name_a} {shape_of(a)} and {name_b} {shape_of(b)} do not have the same heads: "
                        "--pair compares two files of one architecture")
    k = min(k, len(a))
    n, common = top_overlap(a, b, k)
    ma, mb = head_means(a), head_means(b)
    keys = sorted(a, key=parse_head)
    rho = spearman([ma[h] for h in keys], [mb[h] for h in keys])
    return {"a": name_a, "b": name_b, "k": k, "overlap": n, "overlap_frac": n / k if k else 0.0,
            "spearman": None if math.isnan(rho) else rho, "common": common}


VARIANT_SUFFIXES = ("-chat", "-instruct", "-it", "_chat", "_instruct")


def detect_pairs(data: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs of files the paper compares, from their names: a base model and its -Chat / -Instruct
    variant (Qwen1.5-14B.json, Qwen1.5-14B-Chat.json), and Mistral and Mixtral. Only files with the same
    heads are paired."""
    stems = {Path(n).stem.lower(): n for n in data}
    found = []
    for stem, name in stems.items():
        for suf in VARIANT_SUFFIXES:
            if stem.endswith(suf) and stem[: -len(suf)] in stems:
                found.append((stems[stem[: -len(suf)]], name))
    found += [(a, b) for a in data if "mistral" in a.lower() for b in data if "mixtral" in b.lower()]
    return [(a, b) for a, b in found if set(data[a]) == set(data[b])]


def overlap_matrix(data: dict[str, dict], k: int = 20) -> dict:
    """Top-k overlap of every two files ({"k", "files", "matrix"}; None where the heads differ)."""
    names = list(data)
    tops = {n: {h for h, _ in top_heads(data[n], k)} for n in names}
    matrix = [[len(tops[a] & tops[b]) if set(data[a]) == set(data[b]) else None for b in names] for a in names]
    return {"k": k, "files": names, "matrix": matrix}


# --------------------------------------------------------------------------------------- dynamic activation
RESULT_FIELDS = ("scores", "needle_index", "length", "depth")


def load_results(path: str | os.PathLike) -> list[dict]:
    """A sweep's results.jsonl: one JSON object per line with at least RESULT_FIELDS."""
    try:
        lines = io.as_path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"results file {path} not found: give a sweep's results.jsonl to --results") from None
    except IsADirectoryError:
        raise UserError(f"results file {path} is a directory: give the results.jsonl in it") from None
    except UnicodeDecodeError as e:
        raise UserError(f"results file {path} is not text ({e}): give a sweep's results.jsonl") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e}); --results takes a sweep's "
                            "results.jsonl (one JSON object per line)") from None
        missing = [k for k in RESULT_FIELDS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise UserError(f"{path} line {n} lacks {', '.join(missing)}: --results takes a sweep's results.jsonl")
        out.append(rec)
    if not out:
        raise UserError(f"{path} has no records: --results takes a sweep's results.jsonl")
    return out


def _group_rates(active: np.ndarray, labels: list, heads: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """{head: {label: activation rate of that head over the tests with that label}}."""
    out = {f"{l}-{h}": {} for l, h in heads}
    labels_arr = np.array([str(x) for x in labels])
    for lab in _sorted_labels(set(labels)):
        sel = labels_arr == str(lab)
        for l, h in heads:
            out[f"{l}-{h}"][str(lab)] = float(active[sel, l, h].mean())
    return out


def _sorted_labels(labels) -> list:
    return sorted(labels, key=lambda x: (isinstance(x, str), x))


def dynamic_activation(results: list[dict], always_on: float = ALWAYS_ON_THRESHOLD,
                       threshold: float = RETRIEVAL_THRESHOLD) -> dict:
    """Activation analysis of one sweep (paper §3, 'dynamically activated').

    A head is active in a test when its per-test score is > 0. Over the kept tests (ROUGE gate; a record
    without `kept` counts as kept) every head gets an activation rate; retrieval heads (mean over kept
    tests > `threshold`) are 'always-on' when their rate is >= `always_on`, else 'context-specific'.
    Rates are also broken down by needle, context length and depth for the retrieval heads.
    """
    kept = [r for r in results if r.get("kept", True)]
    if not results:
        raise ValueError("no results")
    L, H = np.asarray(results[0]["scores"], dtype=float).shape
    base = {"tests": len(results), "kept": len(kept), "layers": int(L), "heads": int(H),
            "threshold": threshold, "always_on_threshold": always_on}
    if not kept:
        return {**base, "activation": {}, "mean": {}, "retrieval": [], "always_on": [], "context_specific": [],
                "by_needle": {}, "by_length": {}, "by_depth": {}}
    scores = np.stack([np.asarray(r["scores"], dtype=float) for r in kept])  # [T, L, H]
    active = scores > 0
    rate = active.mean(axis=0)
    mean = scores.mean(axis=0)
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    retrieval = sorted(((l, h) for l, h in all_heads if mean[l, h] > threshold),
                       key=lambda lh: (-mean[lh], lh))
    by = {name: _group_rates(active, [r[field] for r in kept], retrieval)
          for name, field in (("needle", "needle_index"), ("length", "length"), ("depth", "depth"))}
    heads_out = []
    for l, h in retrieval:
        key = f"{l}-{h}"
        heads_out.append({"head": key, "mean": float(mean[l, h]), "activation": float(rate[l, h]),
                          "class": "always-on" if rate[l, h] >= always_on else "context-specific",
                          "by_needle": by["needle"][key], "by_length": by["length"][key],
                          "by_depth": by["depth"][key]})

    ret_mask = np.zeros((L, H), bool)
    for lh in retrieval:
        ret_mask[lh] = True

    def groups(field: str) -> dict:
        out = {}
        values = [r[field] for r in results]
        for lab in _sorted_labels(set(values)):
            rows = np.array([r[field] == lab for r in kept])
            n_kept = int(rows.sum())
            a = active[rows]
            out[str(lab)] = {
                "tests": values.count(lab), "kept": n_kept,
                "mean_active_heads": float(a.sum(axis=(1, 2)).mean()) if n_kept else 0.0,
                "mean_active_retrieval_heads": float(a[:, ret_mask].sum(axis=1).mean()) if n_kept else 0.0,
                "retrieval_heads_active_ever": int(a[:, ret_mask].any(axis=0).sum()) if n_kept else 0,
            }
        return out

    return {
        **base,
        "activation": {f"{l}-{h}": float(rate[l, h]) for l, h in all_heads},
        "mean": {f"{l}-{h}": float(mean[l, h]) for l, h in all_heads},
        "retrieval": heads_out,
        "always_on": [d["head"] for d in heads_out if d["class"] == "always-on"],
        "context_specific": [d["head"] for d in heads_out if d["class"] == "context-specific"],
        "by_needle": groups("needle_index"),
        "by_length": groups("length"),
        "by_depth": groups("depth"),
    }


# ------------------------------------------------------------------------------------------ orchestration
def _resolve_pair_name(name: str, loaded: dict[str, str]) -> str:
    """A --pair entry names a given file by path or by basename."""
    if name in loaded.values():
        return next(b for b, p in loaded.items() if p == name)
    if name in loaded:
        return name
    base = os.path.basename(name)
    if base in loaded and os.path.exists(name) and os.path.samefile(name, loaded[base]):
        return base
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


def analyze(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, results: str | None = None,
            pairs: Iterable | None = None, top_k: int = 20, always_on: float = ALWAYS_ON_THRESHOLD,
            report: bool = True, shared_scale: bool = True) -> dict:
    """Run every analysis and write all outputs; returns {"summary", "pairs", "dynamic", "data", "provenance"}.

    pairs: None or empty = detected from the file names (`detect_pairs`). shared_scale: one colour scale
    (0 to the largest mean over all files) for every heatmap, so equal colours mean equal scores."""
    if not files:
        raise UserError("give at least one head-score JSON file")
    paths: dict[str, str] = {}
    for f in files:
        name = os.path.basename(str(f))
        if name in paths:
            raise UserError(f"two input files share the name {name!r} ({paths[name]}, {f}): outputs are named "
                            "after the file name, so copy or link one under another name")
        paths[name] = str(f)
    data = {name: load_head_scores(p) for name, p in paths.items()}
    # every input is read and checked before anything is written: a bad file or pair fails fast
    named = [(_resolve_pair_name(a, paths), _resolve_pair_name(b, paths)) for a, b in parse_pairs(pairs or ())]
    pairs_source = "given (--pair)" if named else "detected from the file names"
    named = named or detect_pairs(data)
    pair_rows = [compare_pair(data[na], data[nb], top_k, na, nb) for na, nb in named]
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
    vmax = max(max(m.values()) for m in means.values()) if shared_scale else None
    above_one = {name: sorted(((h, float(v)) for h, v in m.items() if v > 1.0), key=lambda x: -x[1])
                 for name, m in means.items()}
    for name, hs in data.items():
        entry = file_summary(hs, top_k)
        summary[name] = entry
        shown[name] = {**entry, "scale_max": vmax, "above_one": above_one[name]}
        stem = Path(name).stem
        plots.plot_pie(entry, name, out / f"{stem}_pie.png")
        plots.plot_heatmap(mean_matrix(hs), f"{name} ({entry['layers']}x{entry['heads']})",
                           out / f"{stem}_heatmap.png", top=entry["top"], vmax=vmax)
    io.atomic_write_json(out / "summary.json", summary, indent=1, end="\n")
    io.atomic_write_json(out / "pairs.json", pair_rows, indent=1, end="\n")
    overlap = overlap_matrix(data, top_k)
    prov = {"files": [file_record(p) for p in paths.values()], "results": file_record(results) if results else None,
            "run": run_record(), "pairs": pairs_source,
            "colour_scale": {"shared": bool(shared_scale), "max": vmax}, "above_one": above_one,
            "overlap": overlap}
    io.atomic_write_json(out / "provenance.json", prov, indent=1, end="\n")

    if dynamic is not None:
        io.atomic_write_json(out / "dynamic.json", dynamic, indent=1, end="\n")
        plots.plot_dynamic(dynamic, out / "dynamic_activation.png",
                           f"{os.path.basename(os.path.dirname(os.path.abspath(results))) or results}: "
                           f"head activation over {dynamic['kept']} kept tests")
    if report:
        from rhead_jax.report.sections import analysis_sections, analysis_provenance
        write_report(out, shown, pair_rows, dynamic, sections=analysis_sections(prov, pairs_source, top_k),
                     provenance=analysis_provenance(prov))
    return {"summary": summary, "pairs": pair_rows, "dynamic": dynamic, "data": data, "provenance": prov}
