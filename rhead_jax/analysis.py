"""Analysis of head-score files (Wu et al. 2024, Fig. 3 and §3 properties), of one sweep's per-test results,
and the comparison of any head rankings (every detector's head-score JSON, DuoAttention-style gate TSVs).

The library behind `python -m rhead_jax.analyze` (the command: rhead_jax/analyze.py).

Inputs are head-score files in the original format, `{"<layer>-<head>": [score_test_1, ...], ...}`
(0-based layer and query head, one list per head, all of the same length), and gate files (a .tsv:
one row per layer, one gate per KV head; rhead_jax.rankings). Each input is `PATH` or `NAME:PATH`
(NAME labels it; default: the file name). A head's retrieval score is the mean of its list; a mean
> 0.1 (`scoring.RETRIEVAL_THRESHOLD`) marks a retrieval head.

Writes into DIR:
  summary.json                {"<label>": {"buckets", "layers", "heads", "tests", "retrieval_heads", "top"}}
                              (head-score files only)
  <stem>_pie.png              share of heads per score bucket (paper Fig. 3)
  <stem>_heatmap.png          layer x head mean scores, one colour scale 0..max over all files
  <stem>_gates.png            (gate files) layer x KV head gates, 0..1
  pairs.json                  per pair (--pair, or detected from the file names: a base model and its
                              -Chat / -Instruct, Mistral and Mixtral): top-k overlap, Spearman correlation
  rankings.json               (two or more inputs) every two rankings compared per query head and per KV
                              head: Spearman, top-k overlap for each k (`compare_rankings`)
  rankings_{query,kv}.png     (two or more inputs) those numbers as rankings x rankings heat maps
  provenance.json             the input files (path, bytes, sha256, git blob id, notes next to them), the
                              command, the shared colour scale, the cross-model top-k overlap, the labels
  dynamic.json                (--results) activation rate per head, always-on vs context-specific heads
  dynamic_activation.png      (--results) activation rate per head, sorted
  stability.json              per head-score file: 95% bootstrap intervals of every head's mean, the heads
                              whose interval contains 0.1, top-k frequency over resamples, the convergence
                              curve (rhead_jax.stability); stability_convergence.png, <stem>_intervals.png
  report.html                 everything above in one self-contained page (rhead_jax.report)

`load_head_scores`, `file_summary`, `bucket_shares`, `spearman`, `top_overlap`, `compare_pair`,
`topk_probability`, `expected_overlap`, `compare_rankings`, `dynamic_activation` compute; `analyze` runs
them all and writes the files above. A file the user gave that cannot be used (missing, not JSON, a
malformed head key, a malformed gate file, a gate file of no model present, ...) raises
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
from rhead_jax.report import kinds, plots, write_report
from rhead_jax.report.provenance import file_record, run_record
from rhead_jax.report.trust import stability_sections, thin_section, write_stability
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
    """Read one `{"L-H": [scores]}` file and check its keys and that its lists have one common length.
    LOCOS's released files (its envelope) and QRHead's head sets (.yaml) are read too
    (rhead_jax.rankings.unwrap_released / read_qrhead_head_set)."""
    from rhead_jax import rankings as rk

    if Path(path).suffix in rk.QRHEAD_SUFFIXES:
        return rk.read_qrhead_head_set(path)
    data = rk.unwrap_released(_read_json(path, "head-score file"))
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


# --------------------------------------------------------------------------- rankings of any detector
def topk_probability(values: np.ndarray, k: int) -> np.ndarray:
    """P(head in the top k) when the heads tied at the k-th score are drawn uniformly at random:
    1 above the k-th score, (k - heads above) / heads tied at it, 0 below (same shape as values)."""
    v = np.asarray(values, np.float64).ravel()
    if k <= 0:
        return np.zeros(v.shape)
    if k >= v.size:
        return np.ones(v.shape)
    cut = np.sort(v)[::-1][k - 1]
    above, tied = v > cut, v == cut
    return np.where(above, 1.0, np.where(tied, (k - above.sum()) / tied.sum(), 0.0))


def expected_overlap(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Top-k overlap of two score arrays of one shape: the expected number of shared heads when ties at
    each cut are broken at random (an integer when no tie straddles a cut; gates clipped to 1 often
    do), the chance level k^2 / N, and how many heads tie at each cut."""
    pa, pb = topk_probability(a, k), topk_probability(b, k)
    n = pa.size

    def ties(p):
        return int(((p > 0) & (p < 1)).sum())

    ov = float(pa @ pb)
    return {"k": int(k), "overlap": ov, "frac": ov / k if k else 0.0, "chance": k * k / n if n else 0.0,
            "ties": [ties(pa), ties(pb)]}


def model_group_size(model: str) -> int:
    """G = query heads / KV heads of a model: a preset name (rhead_jax.presets, e.g. Mistral-7B-v0.2, or a
    configs/ stem: smollm2_135m), a HF config.json, or a checkpoint directory holding one."""
    from rhead_jax import presets

    p = Path(str(model))
    cfg_path = p / "config.json" if p.is_dir() else p
    if cfg_path.is_file():
        cfg = _read_json(cfg_path, "model config")
        if not isinstance(cfg, dict) or "num_attention_heads" not in cfg:
            raise UserError(f"model config {cfg_path} has no num_attention_heads: give a HF config.json")
    else:
        try:
            cfg = presets.preset_hf_config(str(model))
        except KeyError:
            raise UserError(f"--model {model!r}: neither a config.json, a checkpoint directory nor a preset "
                            f"({', '.join(presets.preset_names())})") from None
    h = int(cfg["num_attention_heads"])
    k = int(cfg.get("num_key_value_heads") or h)
    if h % k:
        raise UserError(f"model {model}: {h} query heads are not a multiple of {k} KV heads")
    return h // k


def compare_rankings(ranks: Sequence, group_size: int | None = None, ks: Sequence = (20,)) -> dict:
    """Every two rankings (rhead_jax.rankings.Ranking), per query head and per KV head where their
    shapes allow (rankings.comparable): Spearman correlation of all heads' scores and top-k overlap
    (`expected_overlap`) for each k of `ks` (integers, or percentages of the level's heads: '25%').

    Per KV head, a query ranking is the max over the KV head's query heads: a KV head matters as soon
    as one of the heads that read its cache retrieves (and this is what DuoAttention's per-KV gates
    decide: keep the cache or not). Per query head, a KV ranking is repeated over its group, so its
    heads tie in groups of G: Spearman uses average ranks, the overlap the expected value over ties.

    Returns rankings.json's object: {"group_size", "k", "rankings": [{name, path, kind, layers, heads,
    group_size}], "pairs": [{a, b, levels: {level: {heads, group_size, spearman, overlap: [{k_spec, k,
    overlap, frac, chance, ties}]}}, note}], "matrix": {level: {names, spearman, overlap: {k_spec: ...}}}}.
    A KV ranking that can be compared with none of the others is refused (its model is not there)."""
    from rhead_jax import rankings as rk

    ks = [str(k) for k in ks]
    for k in ks:  # syntax first
        rk.resolve_k(k, 1)
    groups = rk.group_sizes(ranks, group_size)
    pairs = []
    partners = {r.name: 0 for r in ranks}
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            levels, note = rk.comparable(a, b, groups[a.name], groups[b.name])
            row = {"a": a.name, "b": b.name, "levels": {}, "note": note}
            for level, g in levels.items():
                sa, sb = a.at(level, g or 1).ravel(), b.at(level, g or 1).ravel()
                rho = spearman(sa, sb)
                row["levels"][level] = {
                    "heads": int(sa.size), "group_size": g, "spearman": None if math.isnan(rho) else rho,
                    "overlap": [{"k_spec": k, **expected_overlap(sa, sb, rk.resolve_k(k, sa.size))} for k in ks]}
            if levels:
                partners[a.name] += 1
                partners[b.name] += 1
            pairs.append(row)
    if len(ranks) > 1:
        for r in ranks:
            if r.kind == "kv" and not partners[r.name]:
                shapes = ", ".join(f"{o.name} {o.shape[0]}x{o.shape[1]}" for o in ranks if o is not r)
                g = groups[r.name]
                raise UserError(f"gate file {r.path or r.name} ({r.shape[0]} layers x {r.shape[1]} KV heads) matches "
                                f"none of the other rankings ({shapes}): a head-score file of its model has "
                                f"{r.shape[0]} layers and {r.shape[1]} x G query heads"
                                + (f" (G = {g} given)" if g else "") + "; check the files or --group_size")
    matrix = {}
    for level in rk.LEVELS:
        names = [r.name for r in ranks if any(level in p["levels"] and r.name in (p["a"], p["b"]) for p in pairs)]
        if not names:
            continue
        idx = {n: i for i, n in enumerate(names)}
        sp = [[1.0 if a == b else None for b in names] for a in names]
        ov = {k: [[1.0 if a == b else None for b in names] for a in names] for k in ks}
        for p in pairs:
            lv = p["levels"].get(level)
            if lv is None:
                continue
            i, j = idx[p["a"]], idx[p["b"]]
            sp[i][j] = sp[j][i] = lv["spearman"]
            for o in lv["overlap"]:
                ov[o["k_spec"]][i][j] = ov[o["k_spec"]][j][i] = o["frac"]
        matrix[level] = {"names": names, "spearman": sp, "overlap": ov}
    return {"group_size": group_size, "k": ks,
            "rankings": [{"name": r.name, "path": r.path, "kind": r.kind, "layers": r.shape[0], "heads": r.shape[1],
                          "group_size": groups[r.name]} for r in ranks],
            "pairs": pairs, "matrix": matrix}


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
