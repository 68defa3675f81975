"""An ablation's numbers: group means over seeds, the top-k vs random table, text summaries (the
report's sections are in rhead_jax.ablation.report)."""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from rhead_jax.ablation.heads import Group
from rhead_jax.ablation.taxonomy import CATEGORIES
from rhead_jax.stability import bootstrap_means, intervals


def accuracy_interval(scores: Sequence[float]) -> list[float] | None:
    """The 95% percentile bootstrap interval of the mean of per-test scores (the tests resampled
    with replacement, as rhead_jax.stability resamples them for head scores); None without tests."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return None
    lo, hi = intervals(bootstrap_means(s[:, None]))[0]
    return [float(lo), float(hi)]


def group_summary(group: Group, run_summaries: dict[str, dict], records: dict[str, list[dict]] | None = None) -> dict:
    """Mean (and std over seeds) of a group's runs; with the runs' per-test records, the 95%
    bootstrap interval of that mean over the group's tests (pooled over its seeds)."""
    sums = [run_summaries[r.label] for r in group.runs]
    accs = [s["accuracy"] for s in sums]
    out = {"spec": group.spec.text, "kind": group.spec.kind, "k": group.spec.k,
           "runs": [r.label for r in group.runs],
           "seeds": [r.seed for r in group.runs] if group.spec.kind == "random" else None,
           "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "accuracy_by_run": {r.label: s["accuracy"] for r, s in zip(group.runs, sums)},
           "tests": sum(s["tests"] for s in sums)}
    if records is not None:
        out["accuracy_interval"] = accuracy_interval([r["score"] for run in group.runs for r in records[run.label]])
    if group.spec.kind == "random":
        out["masked_heads"] = [[list(h) for h in r.heads] for r in group.runs]
    else:
        out["masked_heads"] = [list(h) for h in group.runs[0].heads]
    metrics = collections.defaultdict(list)
    for s in sums:
        for k, v in s["metrics"].items():
            metrics[k].append(v)
    out["metrics"] = {k: float(np.mean(v)) for k, v in metrics.items()}
    if "accuracy_by_cell" in sums[0]:
        cells = collections.defaultdict(list)
        for s in sums:
            for c in s["accuracy_by_cell"]:
                cells[(c["length"], c["depth"])].append(c["accuracy"])
        out["accuracy_by_cell"] = [{"length": L, "depth": d, "accuracy": float(np.mean(v))}
                                   for (L, d), v in sorted(cells.items())]
        out["categories"] = {c: sum(s["categories"][c] for s in sums) for c in CATEGORIES}
    return out


def sweep_k_table(ks: Sequence[int], groups: dict[str, dict], seeds: Sequence[int],
                  rankings: Sequence[str] = ()) -> dict:
    """Accuracy against the number of masked heads: top-k (of each ranking: `by_ranking`, when the
    rankings are named) and random-k (mean, std, min, max, per seed); `baseline`: the unmasked run."""
    names = list(rankings)
    rows = []
    for k in sorted(set(ks)):
        if k == 0:
            acc = groups["none"]["accuracy"]
            row = {"k": 0, "top": acc, "random": acc, "random_std": 0.0, "random_min": acc, "random_max": acc,
                   "random_by_seed": {str(s): acc for s in seeds}}
            if names:
                row["by_ranking"] = {n: acc for n in names}
            rows.append(row)
            continue
        rnd = groups[f"random:{k}"]
        accs = list(rnd["accuracy_by_run"].values())
        by = {n: groups[f"top:{k}@{n}"]["accuracy"] for n in names}
        by_interval = {n: groups[f"top:{k}@{n}"].get("accuracy_interval") for n in names}
        row = {"k": k, "top": by[names[0]] if names else groups[f"top:{k}"]["accuracy"], "random": rnd["accuracy"],
               "random_std": rnd["accuracy_std"], "random_min": float(min(accs)), "random_max": float(max(accs)),
               "random_by_seed": {str(r.split("-seed")[-1]): a for r, a in rnd["accuracy_by_run"].items()}}
        if names:
            row["by_ranking"], row["by_ranking_interval"] = by, by_interval
        rows.append(row)
    out = {"k": [r["k"] for r in rows], "top": [r["top"] for r in rows], "random": [r["random"] for r in rows],
           "random_std": [r["random_std"] for r in rows], "random_min": [r["random_min"] for r in rows],
           "random_max": [r["random_max"] for r in rows], "seeds": list(seeds),
           "baseline": groups["none"]["accuracy"] if "none" in groups else None, "rows": rows}
    if names:
        out["rankings"] = names
        out["by_ranking"] = {n: [r["by_ranking"][n] for r in rows] for n in names}
    return out


def sweep_k_csv(table: dict) -> str:
    seeds = [str(s) for s in table["seeds"]]
    names = table.get("rankings")
    tops = [f"top_{n}_accuracy" for n in names] if names else ["top_accuracy"]
    lines = ["k," + ",".join(tops) + ",random_accuracy_mean,random_accuracy_std,"
             + ",".join(f"random_seed{s}" for s in seeds) + ",random_min,random_max"]
    for r in table["rows"]:
        top = [r["by_ranking"][n] for n in names] if names else [r["top"]]
        lines.append(f"{r['k']}," + ",".join(f"{x:.4f}" for x in top) + f",{r['random']:.4f},{r['random_std']:.4f},"
                     + ",".join(f"{r['random_by_seed'][s]:.4f}" for s in seeds)
                     + f",{r['random_min']:.4f},{r['random_max']:.4f}")
    return "\n".join(lines) + "\n"


def sweep_k_markdown(table: dict, metric: str = "accuracy") -> str:
    n_seeds = len(table["seeds"])
    seeds_txt = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    names = table.get("rankings")
    if not names:
        lines = [f"| heads masked (k) | top-k retrieval heads {metric} | k random non-retrieval heads {metric} "
                 f"(mean ± std over {seeds_txt}) |", "|---:|---:|---:|"]
        for r in table["rows"]:
            lines.append(f"| {r['k']} | {100 * r['top']:.1f} | {100 * r['random']:.1f} ± {100 * r['random_std']:.1f} |")
        return "\n".join(lines) + "\n"
    base = table.get("baseline")
    shown = any((r.get("by_ranking_interval") or {}).get(n) for r in table["rows"] for n in names)
    lines = [f"{metric} (%) with the top-k query heads of each ranking masked"
             + (" [95% bootstrap interval over its tests]" if shown else "") + ", and k random heads "
             f"(mean ± std [min–max] over {seeds_txt})"
             + (f"; no head masked: {100 * base:.1f}" if base is not None else ""), "",
             "| k | " + " | ".join(names) + " | random |", "|---:|" + "---:|" * (len(names) + 1)]
    for r in table["rows"]:
        rnd = (f"{100 * r['random']:.1f} ± {100 * r['random_std']:.1f} [{100 * r['random_min']:.1f}–"
               f"{100 * r['random_max']:.1f}]")
        cells = []
        for n in names:
            iv = (r.get("by_ranking_interval") or {}).get(n)
            cells.append(f"{100 * r['by_ranking'][n]:.1f}" + (f" [{100 * iv[0]:.1f}–{100 * iv[1]:.1f}]" if iv else ""))
        lines.append(f"| {r['k']} | " + " | ".join(cells) + f" | {rnd} |")
    return "\n".join(lines) + "\n"


def format_summary(results: dict) -> str:
    m = results["mask"]
    lines = [f"== ablation of {results['model']} on {results['task']} (mask mode {m['mode']}, phase {m['phase']}) =="]
    for g in results["groups"].values():
        std = f" ± {100 * g['accuracy_std']:.1f}" if g["kind"] == "random" and len(g["runs"]) > 1 else ""
        cats = ""
        if "categories" in g:
            cats = "  [" + ", ".join(f"{c} {g['categories'][c]}" for c in CATEGORIES if g["categories"][c]) + "]"
        lines.append(f"{g['spec']:>14}: accuracy {100 * g['accuracy']:.1f}{std} over {g['tests']} tests{cats}")
    if results.get("sweep_k"):
        lines.append(sweep_k_markdown(results["sweep_k"]).rstrip())
    return "\n".join(lines)
