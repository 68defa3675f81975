"""Analysis of head-score files (Wu et al. 2024, Fig. 3 and §3 properties) and of one sweep's per-test results.

    python -m rhead_jax.analyze a.json [b.json ...] --out DIR [--results results.jsonl]
        [--pair a.json b.json] [--pair a.json,b.json] [--top_k 20] [--always_on 0.9]

Inputs are head-score files in the original format, `{"<layer>-<head>": [score_test_1, ...], ...}`
(0-based layer and query head, one list per head, all of the same length). A head's retrieval score is
the mean of its list; a mean > 0.1 (`scoring.RETRIEVAL_THRESHOLD`) marks a retrieval head.

Writes into DIR:
  summary.json                {"<file name>": {"buckets", "layers", "heads", "tests", "retrieval_heads", "top"}}
  <stem>_pie.png              share of heads per score bucket (paper Fig. 3)
  <stem>_heatmap.png          layer x head mean scores
  pairs.json                  per --pair: top-k overlap and Spearman correlation of all heads' means
  dynamic.json                (--results) activation rate per head, always-on vs context-specific heads
  dynamic_activation.png      (--results) activation rate per head, sorted
  report.html                 everything above in one self-contained page (rhead_jax.report)

The library functions (`load_head_scores`, `file_summary`, `bucket_shares`, `spearman`, `top_overlap`,
`compare_pair`, `dynamic_activation`, `analyze`) do the work; `main` only parses flags.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rhead_jax.scoring import RETRIEVAL_THRESHOLD, head_means, retrieval_heads, top_heads

# Paper Fig. 3 buckets of a head's mean score; labels are the keys written to summary.json.
BUCKETS = ("=0", "(0,0.1]", "(0.1,0.5]", ">0.5")
BUCKET_EDGES = (0.0, RETRIEVAL_THRESHOLD, 0.5)
ALWAYS_ON_THRESHOLD = 0.9


# ----------------------------------------------------------------------------------------------- loading
def parse_head(key: str) -> tuple[int, int]:
    layer, head = key.split("-")
    return int(layer), int(head)


def load_head_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read one `{"L-H": [scores]}` file and check its lists have one common length."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of 'layer-head' -> list of scores")
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"{path}: heads have lists of different lengths {sorted(lengths)}")
    for key in data:
        parse_head(key)  # raises on a malformed key
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
def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values get the average of the ranks they span."""
    x = np.asarray(x, dtype=float)
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(n)
    ranks[order] = avg[group]
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks. NaN if either side is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
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
        raise ValueError(f"{name_a} {shape_of(a)} and {name_b} {shape_of(b)} do not have the same heads")
    k = min(k, len(a))
    n, common = top_overlap(a, b, k)
    ma, mb = head_means(a), head_means(b)
    keys = sorted(a, key=parse_head)
    rho = spearman([ma[h] for h in keys], [mb[h] for h in keys])
    return {"a": name_a, "b": name_b, "k": k, "overlap": n, "overlap_frac": n / k if k else 0.0,
            "spearman": None if math.isnan(rho) else rho, "common": common}


# --------------------------------------------------------------------------------------- dynamic activation
def load_results(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


# ------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


BUCKET_COLORS = ("#d9d9d9", "#9ecae1", "#3182bd", "#e6550d")


def plot_pie(summary_entry: dict, title: str, path: str | os.PathLike) -> None:
    plt = _plt()
    shares = [summary_entry["buckets"][b] for b in BUCKETS]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    wedges, _texts, autotexts = ax.pie(
        shares, colors=BUCKET_COLORS, startangle=90, counterclock=False,
        autopct=lambda p: f"{p:.1f}%" if p >= 3 else "", pctdistance=0.72,
        wedgeprops={"linewidth": 1, "edgecolor": "white"})
    for t in autotexts:
        t.set_fontsize(9)
    ax.legend(wedges, [f"{b}: {s:.1f}%" for b, s in zip(BUCKETS, shares)], title="mean score",
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.axis("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(means: np.ndarray, title: str, path: str | os.PathLike,
                 top: Sequence[Sequence] = ()) -> None:
    """Layer (rows, 0 at top) x head (columns) mean scores; the `top` heads are outlined."""
    plt = _plt()
    L, H = means.shape
    fig, ax = plt.subplots(figsize=(min(8.0, max(4.5, 0.16 * H + 2.4)), min(6.5, max(3.5, 0.15 * L + 1.4))))
    vmax = max(float(np.nanmax(means)) if np.isfinite(means).any() else 0.0, 1e-9)
    im = ax.imshow(means, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax, interpolation="nearest")
    for key, _ in top:
        l, h = parse_head(key)
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="#1f9e89", linewidth=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    step = max(1, int(math.ceil(H / 16)))
    ax.set_xticks(range(0, H, step))
    step = max(1, int(math.ceil(L / 20)))
    ax.set_yticks(range(0, L, step))
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, label="mean retrieval score", fraction=0.05, pad=0.03)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dynamic(dynamic: dict, path: str | os.PathLike, title: str = "") -> None:
    """Top: activation rate of every head active at least once, sorted; retrieval heads coloured by class.
    Bottom: activation rate of each retrieval head per context length."""
    plt = _plt()
    act = dynamic["activation"]
    classes = {d["head"]: d["class"] for d in dynamic["retrieval"]}
    shown = sorted((k for k, v in act.items() if v > 0), key=lambda k: (-act[k], parse_head(k)))
    colors = {"always-on": "#e6550d", "context-specific": "#3182bd"}
    rows = 2 if dynamic["retrieval"] else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4.2 * rows), squeeze=False)
    ax = axes[0, 0]
    if shown:
        ax.bar(range(len(shown)), [act[k] for k in shown], width=0.85,
               color=[colors.get(classes.get(k), "#bdbdbd") for k in shown])
        if len(shown) <= 80:
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels(shown, rotation=90, fontsize=7)
        else:
            ax.set_xlabel(f"{len(shown)} heads active in at least one kept test (sorted)")
    ax.axhline(dynamic["always_on_threshold"], color="k", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("activation rate (score > 0)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (*colors.values(), "#bdbdbd")]
    ax.legend(handles, ["always-on retrieval head", "context-specific retrieval head", "other head"],
              fontsize=8, loc="upper right")
    ax.set_title(title or f"Head activation over {dynamic['kept']} kept tests", fontsize=10)
    if rows == 2:
        ax = axes[1, 0]
        heads = [d["head"] for d in dynamic["retrieval"]]
        lengths = list(dynamic["retrieval"][0]["by_length"])
        grid = np.array([[d["by_length"][x] for x in lengths] for d in dynamic["retrieval"]]).T
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(lengths)))
        ax.set_yticklabels(lengths, fontsize=7)
        ax.set_ylabel("context length")
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels(heads, rotation=90, fontsize=7 if len(heads) <= 60 else 5)
        ax.set_xlabel("retrieval heads (by mean score)")
        fig.colorbar(im, ax=ax, label="activation rate", fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    raise ValueError(f"--pair {name!r} is not one of the input files {sorted(loaded)}")


def parse_pairs(pairs: Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    """Pairs as ('a', 'b') tuples or 'a,b' strings."""
    out = []
    for p in pairs:
        items = [x for x in p.split(",")] if isinstance(p, str) else list(p)
        items = [x.strip() for x in items if x.strip()]
        if len(items) != 2:
            raise ValueError(f"a pair needs two files, got {p!r}")
        out.append((items[0], items[1]))
    return out


def analyze(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, results: str | None = None,
            pairs: Iterable = (), top_k: int = 20, always_on: float = ALWAYS_ON_THRESHOLD,
            report: bool = True) -> dict:
    """Run every analysis and write all outputs; returns {"summary", "pairs", "dynamic", "data"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for f in files:
        name = os.path.basename(str(f))
        if name in paths:
            raise ValueError(f"two input files share the name {name!r} ({paths[name]}, {f})")
        paths[name] = str(f)
    data = {name: load_head_scores(p) for name, p in paths.items()}

    summary = {}
    for name, hs in data.items():
        entry = file_summary(hs, top_k)
        summary[name] = entry
        stem = Path(name).stem
        plot_pie(entry, name, out / f"{stem}_pie.png")
        plot_heatmap(mean_matrix(hs), f"{name} ({entry['layers']}x{entry['heads']})",
                     out / f"{stem}_heatmap.png", top=entry["top"])
    _write_json(out / "summary.json", summary)

    pair_rows = []
    for a, b in parse_pairs(pairs):
        na, nb = _resolve_pair_name(a, paths), _resolve_pair_name(b, paths)
        pair_rows.append(compare_pair(data[na], data[nb], top_k, na, nb))
    _write_json(out / "pairs.json", pair_rows)

    dynamic = None
    if results:
        dynamic = dynamic_activation(load_results(results), always_on=always_on)
        dynamic["source"] = str(results)
        _write_json(out / "dynamic.json", dynamic)
        plot_dynamic(dynamic, out / "dynamic_activation.png",
                     f"{os.path.basename(os.path.dirname(os.path.abspath(results))) or results}: "
                     f"head activation over {dynamic['kept']} kept tests")
    if report:
        from rhead_jax.report import write_report
        write_report(out, summary, pair_rows, dynamic)
    return {"summary": summary, "pairs": pair_rows, "dynamic": dynamic, "data": data}


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def format_table(summary: dict, pairs: Sequence[dict] = (), dynamic: dict | None = None, n_top: int = 5) -> str:
    """The compact text table printed by the CLI."""
    name_w = max([len("file")] + [len(n) for n in summary])
    head = (f"{'file':<{name_w}}  {'LxH':>7}  {'tests':>5}  {'=0':>5}  {'(0,.1]':>6}  {'(.1,.5]':>7}  "
            f"{'>.5':>5}  {'#ret':>4}  top {n_top}")
    lines = [head, "-" * len(head)]
    for name, e in summary.items():
        b = e["buckets"]
        top = " ".join(f"{h}:{s:.2f}" for h, s in e["top"][:n_top])
        lines.append(f"{name:<{name_w}}  {e['layers']:>3}x{e['heads']:<3}  {e['tests']:>5}  {b['=0']:>5.1f}  "
                     f"{b['(0,0.1]']:>6.1f}  {b['(0.1,0.5]']:>7.1f}  {b['>0.5']:>5.1f}  "
                     f"{e['retrieval_heads']:>4}  {top}")
    for p in pairs:
        rho = "n/a" if p["spearman"] is None else f"{p['spearman']:.3f}"
        lines.append(f"pair {p['a']} vs {p['b']}: top-{p['k']} overlap {p['overlap']}/{p['k']} "
                     f"({p['overlap_frac']:.0%}), Spearman {rho}")
    if dynamic is not None:
        lines.append(f"dynamic ({dynamic.get('source', '')}): {dynamic['kept']}/{dynamic['tests']} tests kept, "
                     f"{len(dynamic['retrieval'])} retrieval heads: {len(dynamic['always_on'])} always-on "
                     f"(>= {dynamic['always_on_threshold']:.0%} of kept tests), "
                     f"{len(dynamic['context_specific'])} context-specific")
        if dynamic["always_on"]:
            lines.append("  always-on: " + " ".join(dynamic["always_on"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def rewrite_pair_argv(argv: Sequence[str]) -> list[str]:
    """`--pair A B` (two values, as documented) -> `--pair=A,B` so absl can parse it."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a in ("--pair", "-pair") and i + 1 < len(argv):
            nxt = argv[i + 1]
            if "," not in nxt and i + 2 < len(argv) and not argv[i + 2].startswith("-"):
                out.append(f"--pair={nxt},{argv[i + 2]}")
                i += 3
            else:
                out.append(f"--pair={nxt}")
                i += 2
            continue
        out.append(a)
        i += 1
    return out


def _define_flags():
    from absl import flags
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_string("results", None, "A sweep's results.jsonl for the dynamic-activation analysis.")
    flags.DEFINE_multi_string("pair", [], "Two input files to compare: --pair A B or --pair A,B (repeatable); "
                                          "by path or file name.")
    flags.DEFINE_integer("top_k", 20, "Number of top heads in summary.json and in the pair overlap.")
    flags.DEFINE_float("always_on", ALWAYS_ON_THRESHOLD,
                       "A retrieval head active in at least this fraction of kept tests is 'always-on'.")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from absl import app, flags
    FLAGS = flags.FLAGS
    files = list(argv[1:])
    if not files:
        raise app.UsageError("give at least one head-score JSON file")
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    try:
        res = analyze(files, FLAGS.out, results=FLAGS.results, pairs=FLAGS.pair, top_k=FLAGS.top_k,
                      always_on=FLAGS.always_on)
    except ValueError as e:
        raise app.UsageError(str(e))
    print(format_table(res["summary"], res["pairs"], res["dynamic"]))
    print(f"wrote {os.path.join(FLAGS.out, 'report.html')}")


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main, argv=rewrite_pair_argv(sys.argv))


if __name__ == "__main__":
    run()
