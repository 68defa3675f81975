"""An ablation's numbers: group means over seeds, the top-k vs random table, text summaries (the
report's sections are in rhead_jax.ablation.report)."""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from rhead_jax.ablation.heads import Group
from rhead_jax.ablation.taxonomy import CATEGORIES

def group_summary(group: Group, run_summaries: dict[str, dict]) -> dict:
    """Mean (and std over seeds) of a group's runs."""
    sums = [run_summaries[r.label] for r in group.runs]
    accs = [s["accuracy"] for s in sums]
    out = {"spec": group.spec.text, "kind": group.spec.kind, "k": group.spec.k,
           "runs": [r.label for r in group.runs],
           "seeds": [r.seed for r in group.runs] if group.spec.kind == "random" else None,
           "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "accuracy_by_run": {r.label: s["accuracy"] for r, s in zip(group.runs, sums)},
           "tests": sum(s["tests"] for s in sums)}
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


def sweep_k_table(ks: Sequence[int], groups: dict[str, dict], seeds: Sequence[int]) -> dict:
    """Accuracy against the number of masked heads: top-k and random-k (mean, std, per seed)."""
    rows = []
    for k in sorted(set(ks)):
        if k == 0:
            g = groups["none"]
            rows.append({"k": 0, "top": g["accuracy"], "random": g["accuracy"], "random_std": 0.0,
                         "random_by_seed": {str(s): g["accuracy"] for s in seeds}})
            continue
        top, rnd = groups[f"top:{k}"], groups[f"random:{k}"]
        rows.append({"k": k, "top": top["accuracy"], "random": rnd["accuracy"], "random_std": rnd["accuracy_std"],
                     "random_by_seed": {str(r.split("-seed")[-1]): a for r, a in rnd["accuracy_by_run"].items()}})
    return {"k": [r["k"] for r in rows], "top": [r["top"] for r in rows], "random": [r["random"] for r in rows],
            "random_std": [r["random_std"] for r in rows], "seeds": list(seeds), "rows": rows}


def sweep_k_csv(table: dict) -> str:
    seeds = [str(s) for s in table["seeds"]]
    lines = ["k,top_accuracy,random_accuracy_mean,random_accuracy_std," + ",".join(f"random_seed{s}" for s in seeds)]
    for r in table["rows"]:
        lines.append(f"{r['k']},{r['top']:.4f},{r['random']:.4f},{r['random_std']:.4f},"
                     + ",".join(f"{r['random_by_seed'][s]:.4f}" for s in seeds))
    return "\n".join(lines) + "\n"


def sweep_k_markdown(table: dict, metric: str = "accuracy") -> str:
    lines = [f"| heads masked (k) | top-k retrieval heads {metric} | k random non-retrieval heads {metric} "
             f"(mean ± std over {len(table['seeds'])} seed{'s' if len(table['seeds']) != 1 else ''}) |",
             "|---:|---:|---:|"]
    for r in table["rows"]:
        lines.append(f"| {r['k']} | {100 * r['top']:.1f} | {100 * r['random']:.1f} ± {100 * r['random_std']:.1f} |")
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
