"""Every figure of the reports, drawn with matplotlib's Agg backend into PNG files (dpi 110).

  plot_pie(summary_entry, title, path)         share of heads per score bucket (paper Fig. 3)
  plot_heatmap(means, title, path, top=(), vmax=None, kinds=None)
                                               layer x head mean scores, the `top` heads outlined; one
                                               colour scale 0..vmax (shared across files when given);
                                               a hybrid model's local / global layers marked
  plot_dynamic(dynamic, path, title="")        activation rate per head, and per context length
  plot_rank_matrix(matrix, path, title="")     rankings x rankings: Spearman and top-k overlap heat maps
  plot_fig1_heatmap(cells, path, title="")     nominal context length x needle depth accuracy (paper Fig. 1)
  plot_sweep_k(table, path, title="", ...)     accuracy vs number of masked heads: top-k of each ranking
                                               vs random (mean, min-max band) and the unmasked baseline
  plot_convergence(entries, path, title="")    mean top-k overlap of n random tests with all tests, per file
  plot_intervals(entry, path, title="")        the top heads' means with their 95% bootstrap intervals

matplotlib is imported on the first plot (`_plt`), not with this module.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from rhead_jax.scoring import BUCKETS, parse_head

# one colour per Fig. 3 bucket, in BUCKETS order (the pie charts and the HTML report's swatches)
BUCKET_COLORS = dict(zip(BUCKETS, ("#d9d9d9", "#9ecae1", "#3182bd", "#e6550d")))
# Fig. 1's colormap (the needle-in-a-haystack test's red -> yellow -> green)
FIG1_COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ head-score analysis
def plot_pie(summary_entry: dict, title: str, path: str | os.PathLike) -> None:
    plt = _plt()
    shares = [summary_entry["buckets"][b] for b in BUCKETS]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    wedges, _texts, autotexts = ax.pie(
        shares, colors=[BUCKET_COLORS[b] for b in BUCKETS], startangle=90, counterclock=False,
        autopct=lambda p: f"{p:.1f}%" if p >= 3 else "", pctdistance=0.72,
        wedgeprops={"linewidth": 1, "edgecolor": "white"})
    for t in autotexts:
        t.set_fontsize(9)
    ax.legend(wedges, [f"{b}: {s:.1f}%" for b, s in zip(BUCKETS, shares)], title="mean score",
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.axis("equal")
    _save(plt, fig, path)


def plot_heatmap(means: np.ndarray, title: str, path: str | os.PathLike,
                 top: Sequence[Sequence] = (), vmax: float | None = None, *,
                 label: str = "mean retrieval score", xlabel: str = "head",
                 kinds: Sequence[str] | None = None) -> None:
    """Layer (rows, 0 at top) x head (columns) mean scores; the `top` heads are outlined. The colour
    scale runs from 0 to `vmax` (default: this file's largest mean), so that several files drawn with
    one vmax are comparable colour for colour; cells above 1 are hatched. `label` names the colour
    bar, `xlabel` the columns (gate files: "KV head"). `kinds` ([L] "local" / "global", a hybrid
    model's layers, rhead_jax.report.kinds): a strip left of the rows marks each layer L or G, and the
    global layers' rows are framed; a model of one kind is drawn without them."""
    plt = _plt()
    L, H = means.shape
    fig, ax = plt.subplots(figsize=(min(8.0, max(4.5, 0.16 * H + 2.4)), min(6.5, max(3.5, 0.15 * L + 1.4))))
    if vmax is None:
        vmax = float(np.nanmax(means)) if np.isfinite(means).any() else 0.0
    vmax = max(float(vmax), 1e-9)
    im = ax.imshow(means, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax, interpolation="nearest")
    for l, h in zip(*np.nonzero(np.nan_to_num(means) > 1.0)):
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, hatch="xxx", edgecolor="#2b8cbe",
                                   linewidth=0))
    for key, _ in top:
        l, h = parse_head(key)
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="#1f9e89", linewidth=1.2))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    step = max(1, int(math.ceil(H / 16)))
    ax.set_xticks(range(0, H, step))
    step = max(1, int(math.ceil(L / 20)))
    ax.set_yticks(range(0, L, step))
    ax.tick_params(labelsize=8)
    if kinds is not None and len(set(kinds)) > 1:
        _mark_kinds(plt, fig, ax, list(kinds), H)
    fig.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.03)
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


KIND_COLORS = {"global": "#08519c", "local": "#c6dbef"}


def _mark_kinds(plt, fig, ax, kinds: list[str], H: int) -> None:
    """plot_heatmap's layer-kind marks: a strip of L/G cells left of the rows (the layer numbers move to
    its left), the global rows framed, and a legend under the plot."""
    from matplotlib.colors import ListedColormap
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    L = len(kinds)
    order = [k for k in KIND_COLORS if k in kinds]
    strip = make_axes_locatable(ax).append_axes("left", size=0.2, pad=0.04, sharey=ax)
    strip.imshow(np.array([[order.index(k)] for k in kinds]), aspect="auto", interpolation="nearest",
                 cmap=ListedColormap([KIND_COLORS[k] for k in order]), vmin=-0.5, vmax=len(order) - 0.5)
    if L <= 64:
        for l, k in enumerate(kinds):
            strip.text(0, l, k[0].upper(), ha="center", va="center", fontsize=6 if L > 32 else 7,
                       color="white" if k == "global" else "#08306b")
    strip.set_xticks([])
    strip.set_ylabel("layer")
    strip.tick_params(labelsize=8)
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelleft=False)
    for l, k in enumerate(kinds):
        if k == "global":
            ax.add_patch(plt.Rectangle((-0.5, l - 0.5), H, 1, fill=False, edgecolor=KIND_COLORS["global"],
                                       linewidth=1.0, linestyle="--"))
    n = {k: kinds.count(k) for k in order}
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=KIND_COLORS[k], edgecolor="#555") for k in order]
    ax.legend(handles, [f"{k[0].upper()}: {k} layer ({n[k]})" for k in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=len(order), fontsize=7, frameon=False, handlelength=1.0)


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
    _save(plt, fig, path)


def plot_rank_matrix(matrix: dict, path: str | os.PathLike, title: str = "") -> None:
    """One level of rhead_jax.analysis.compare.compare_rankings' matrix: rankings x rankings heat maps of the
    Spearman correlation (-1..1) and of the top-k overlap as a fraction of k (0..1), one panel per k;
    every cell carries its number, pairs that cannot be compared are grey."""
    plt = _plt()
    names = matrix["names"]
    panels = [("Spearman ρ", matrix["spearman"], -1.0, 1.0, "RdBu_r")]
    panels += [(f"top-{k} overlap / k", m, 0.0, 1.0, "viridis") for k, m in matrix["overlap"].items()]
    n = len(names)
    side = min(5.5, max(2.6, 0.55 * n + 1.6))
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 0.6, side + 0.5), squeeze=False)
    for ax, (name, m, lo, hi, cmap) in zip(axes[0], panels):
        grid = np.array([[np.nan if v is None else v for v in row] for row in m], float)
        cm = plt.get_cmap(cmap).with_extremes(bad="#e0e0e0")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
        for (i, j), v in np.ndenumerate(grid):
            txt = "—" if not np.isfinite(v) else f"{v:.2f}"
            dark = np.isfinite(v) and (abs(v) > 0.6 if lo < 0 else v < 0.45)
            ax.text(j, i, txt, ha="center", va="center", fontsize=8 if n <= 8 else 6,
                    color="white" if dark else "#222")
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------- ablation
def plot_fig1_heatmap(cells: Sequence[dict], path, title: str = "") -> None:
    """Fig. 1 style: context length (x) x needle depth (y), colour = score 0-100 (red-yellow-green)."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _plt()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = 100 * c["accuracy"]
    cmap = LinearSegmentedColormap.from_list("fig1", FIG1_COLORS)
    fig, ax = plt.subplots(figsize=(min(12.0, 3.6 + 0.75 * len(lengths)), min(8.0, 2.0 + 0.45 * len(depths))))
    im = ax.pcolormesh(grid, cmap=cmap, vmin=0, vmax=100, edgecolors="white", linewidth=1.0)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j + 0.5, i + 0.5, f"{v:.0f}", ha="center", va="center", fontsize=8, color="#222")
    ax.set_xticks(np.arange(len(lengths)) + 0.5)
    ax.set_xticklabels([str(L) for L in lengths], rotation=45 if len(lengths) > 8 else 0, fontsize=8)
    ax.set_yticks(np.arange(len(depths)) + 0.5)
    ax.set_yticklabels([f"{d:g}" for d in depths], fontsize=8)
    ax.invert_yaxis()  # depth 0 at the top, as in the paper
    ax.set_xlabel("context length (grid's nominal length, tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score (ROUGE-1 recall x 100)")
    _save(plt, fig, path)


def plot_sweep_k(table: dict, path, title: str = "", metric: str = "accuracy (%)") -> None:
    """Accuracy vs k: one line per ranking (`by_ranking`; else the one file's top-k retrieval heads)
    with its top-k heads masked, k random heads (mean over seeds; shaded: min to max over seeds), and
    the unmasked baseline (dotted) when the table has one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    k = np.asarray(table["k"])
    lines = table.get("by_ranking") or {"top-k retrieval heads masked": table["top"]}
    colors = plt.get_cmap("tab10").colors
    markers = "o^vD<>pP*X"
    palette = [c for i, c in enumerate(colors) if i != 0] if len(lines) > 1 else ["#d62728"]
    for i, (name, acc) in enumerate(lines.items()):
        ax.plot(k, 100 * np.asarray(acc), marker=markers[i % len(markers)], linestyle="-",
                color=palette[i % len(palette)], label=name if "by_ranking" not in table else f"top-k of {name}")
    n = len(table["seeds"])
    rnd = 100 * np.asarray(table["random"])
    label = f"k random heads (mean of {n} seeds, shaded: min–max)" if n > 1 else f"k random heads ({n} seed)"
    ax.plot(k, rnd, "s--", color="#1f77b4", label=label)
    if n > 1 and "random_min" in table:
        ax.fill_between(k, 100 * np.asarray(table["random_min"]), 100 * np.asarray(table["random_max"]),
                        color="#1f77b4", alpha=0.18, linewidth=0)
    if table.get("baseline") is not None:
        ax.axhline(100 * table["baseline"], color="#555", linestyle=":", linewidth=1.2, label="no head masked")
    ax.set_xlabel("number of masked query heads (k)")
    ax.set_ylabel(metric)
    ax.set_ylim(-3, 103)
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


def plot_accuracy_vs_kv(lines: Sequence[dict], path, title: str = "", metric: str = "accuracy (%)") -> None:
    """Accuracy vs KV-cache memory, one line per head choice (the mixed KV cache, rhead_jax.mixedkv).

    lines: [{label, x: [KV memory, % of the full cache], y: [accuracy 0-1], yerr: [std 0-1] or None,
    text: [point annotations] or None}]; a one-point line is drawn as a marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "osD^v<>ph*"
    for i, ln in enumerate(lines):
        order = np.argsort(ln["x"])
        x = np.asarray(ln["x"], float)[order]
        y = 100 * np.asarray(ln["y"], float)[order]
        style = markers[i % len(markers)] + ("-" if len(x) > 1 else "")
        if ln.get("yerr") is not None and np.any(np.asarray(ln["yerr"]) > 0):
            ax.errorbar(x, y, yerr=100 * np.asarray(ln["yerr"], float)[order], fmt=style, capsize=3, label=ln["label"])
        else:
            ax.plot(x, y, style, label=ln["label"], markersize=7)
        for xi, yi, t in zip(x, y, np.asarray(ln.get("text") or [""] * len(x), object)[order]):
            if t:
                ax.annotate(str(t), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KV cache memory (% of the full cache)")
    ax.set_ylabel(metric)
    ax.set_ylim(-3, 103)
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


# ------------------------------------------------------------------------------------------- stability
def plot_convergence(entries: dict, path, title: str = "") -> None:
    """How many tests settle the top k (rhead_jax.stability): per file, the mean overlap of the top k
    of n random tests with the top k of all tests, against n (log scale); dotted: k - 1."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    markers = "osD^v<>ph*X"
    ks = set()
    for i, (name, e) in enumerate(entries.items()):
        n = [int(x) for x in e["convergence"]]
        ax.plot(n, list(e["convergence"].values()), marker=markers[i % len(markers)], label=f"{name} ({e['tests']} tests)")
        ks.add(e["k"])
    for k in ks:
        ax.axhline(k - 1, color="#555", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("tests drawn at random (n)")
    ax.set_ylabel(f"mean top-{'/'.join(map(str, sorted(ks)))} overlap with all tests")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Convergence of the top-k ranking", fontsize=10)
    _save(plt, fig, path)


def plot_intervals(entry: dict, path, title: str = "", top: int = 20) -> None:
    """The `top` heads by mean score with their 95% bootstrap intervals (rhead_jax.stability); dashed:
    the retrieval threshold; heads whose interval contains it are drawn in orange."""
    plt = _plt()
    heads = list(entry["mean"])[:top]
    means = np.array([entry["mean"][h] for h in heads])
    ci = np.array([entry["ci"][h] for h in heads]).reshape(-1, 2)
    straddle = set(entry["straddle"])
    fig, ax = plt.subplots(figsize=(min(11.0, 2.0 + 0.38 * len(heads)), 3.6))
    x = np.arange(len(heads))
    unsure = np.array([h in straddle for h in heads], bool)
    for sel, color in ((~unsure, "#3182bd"), (unsure, "#e6550d")):
        if sel.any():
            ax.errorbar(x[sel], means[sel], yerr=[means[sel] - ci[sel, 0], ci[sel, 1] - means[sel]], fmt="o",
                        color=color, ecolor=color, capsize=3, markersize=4)
    ax.axhline(entry["threshold"], color="#555", linestyle="--", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(heads, rotation=90, fontsize=7)
    ax.set_ylabel("mean score, 95% interval")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path)
