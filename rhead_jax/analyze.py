"""Analysis of head-score files (paper Fig. 3, §3), of one sweep's per-test results, and the comparison
of any head rankings (every detector's head-score JSON, DuoAttention-style gate TSVs): the command.

    python -m rhead_jax.analyze [NAME:]FILE [[NAME:]FILE ...] --out DIR [--results results.jsonl]
        [--pair a.json b.json] [--pair a.json,b.json] [--top_k 20] [--always_on 0.9]
        [--overlap_k 20,25%,50%] [--group_size G | --model MODEL] [--noshared_scale] [--debug]

FILE: a head-score JSON {"L-H": [scores]} (head_scores.json, head_scores_<detector>.json, the published
ones) or a gate .tsv (layers x KV heads); NAME labels it (default: the file name). Without --pair,
pairs of head-score files are detected from the file names (a base model and its -Chat / -Instruct,
Mistral and Mixtral). Every heatmap shares one colour scale unless --noshared_scale. With two or more
files every two of them are compared (Spearman, top-k overlap for each k of --overlap_k) per query
head and per KV head, where the group size G (query heads per KV head) is given (--group_size, or
--model: a preset name, a configs/ stem, a config.json) or inferred from a gate file and a
head-score file of the same depth (rhead_jax.analysis.compare.compare_rankings).

Writes summary.json, pairs.json, provenance.json, stability.json (per head-score file: 95% bootstrap
intervals, uncertain heads, top-k frequency, convergence curve; rhead_jax.stability),
<stem>_{pie,heatmap,intervals}.png, stability_convergence.png, <stem>_gates.png (gate files),
(two or more files) rankings.json and rankings_{query,kv}.png, (--results) dynamic.json and
dynamic_activation.png, and report.html into DIR, then prints a compact table. The work and the
output formats are in rhead_jax/analysis/; a bad input prints one `error:` line and exits with
status 2 (rhead_jax.cli).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from rhead_jax import cli
from rhead_jax.analysis import analyze
from rhead_jax.analysis.compare import model_group_size
from rhead_jax.analysis.dynamic import ALWAYS_ON_THRESHOLD
from rhead_jax.errors import UserError
from rhead_jax.report import kinds

FLAGS = flags.FLAGS
USAGE = "python -m rhead_jax.analyze [NAME:]a.json [[NAME:]b.tsv ...] --out DIR"


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


def _define_flags() -> None:
    """Defined when the command runs, not on import (tests and notebooks import this module)."""
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_string("results", None, "A sweep's results.jsonl for the dynamic-activation analysis.")
    flags.DEFINE_multi_string("pair", [], "Two input files to compare: --pair A B or --pair A,B (repeatable); "
                                          "by path or file name.")
    flags.DEFINE_bool("shared_scale", True, "One colour scale (0 to the largest mean of all files) for every heatmap.")
    flags.DEFINE_integer("top_k", 20, "Number of top heads in summary.json and in the pair overlap.")
    flags.DEFINE_float("always_on", ALWAYS_ON_THRESHOLD,
                       "A retrieval head active in at least this fraction of kept tests is 'always-on'.")
    flags.DEFINE_list("overlap_k", None, "Top-k sizes of the ranking comparison: integers or percentages of the "
                                         "heads compared, e.g. 20,25%,50% (default: --top_k).")
    flags.DEFINE_integer("group_size", None, "Query heads per KV head of the files' model (default: --model's, "
                                             "or inferred from a gate file and a head-score file).")
    flags.DEFINE_string("model", None, "The files' model, for its group size: a preset name (Mistral-7B-v0.2), "
                                       "a configs/ stem (smollm2_135m), a config.json or a checkpoint directory.")


def format_table(summary: dict, pairs: Sequence[dict] = (), dynamic: dict | None = None, n_top: int = 5) -> str:
    """The compact text table printed by the CLI."""
    name_w = max([len("file")] + [len(n) for n in summary])
    head = (f"{'file':<{name_w}}  {'LxH':>7}  {'tests':>5}  {'=0':>5}  {'(0,.1]':>6}  {'(.1,.5]':>7}  "
            f"{'>.5':>5}  {'#ret':>4}  top {n_top}")
    lines = [head, "-" * len(head)]
    for name, e in summary.items():
        b = e["buckets"]
        top = " ".join(f"{h}:{s:.2f}" if s <= 1 else f"{h}:{s:.3f}(>1)" for h, s in e["top"][:n_top])
        lines.append(f"{name:<{name_w}}  {e['layers']:>3}x{e['heads']:<3}  {e['tests']:>5}  {b['=0']:>5.1f}  "
                     f"{b['(0,0.1]']:>6.1f}  {b['(0.1,0.5]']:>7.1f}  {b['>0.5']:>5.1f}  "
                     f"{e['retrieval_heads']:>4}  {top}")
        if "by_kind" in e:   # a hybrid model (rhead_jax.report.kinds)
            lines.append(f"{'':<{name_w}}  by layer kind: {kinds.format_kinds(e['by_kind'])}")
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


def format_rankings(cmp: dict) -> str:
    """The ranking comparison as text: one line per comparable pair and level."""
    ks = cmp["k"]
    names = [f"{p['a']} vs {p['b']}" for p in cmp["pairs"]]
    w = max([len("rankings")] + [len(n) for n, p in zip(names, cmp["pairs"]) if p["levels"]])
    head = f"{'rankings':<{w}}  {'level':<5}  {'heads':>5}  {'G':>2}  {'Spearman':>8}  " + "  ".join(
        f"{'top-' + k:>22}" for k in ks)
    lines = ["ranking comparison (per KV head: query rankings by max over the group; per query head: KV rankings "
             "repeated; overlap: expected with ties at the cut broken at random, * = ties; chance = k^2/N)",
             head, "-" * len(head)]
    skipped = []
    for name, p in zip(names, cmp["pairs"]):
        if not p["levels"]:
            skipped.append(name)
            continue
        for level, lv in p["levels"].items():
            g = "?" if lv["group_size"] is None else lv["group_size"]
            rho = "n/a" if lv["spearman"] is None else f"{lv['spearman']:.3f}"
            cells = []
            for o in lv["overlap"]:
                star = "*" if any(o["ties"]) else ""
                cell = f"{o['overlap']:.1f}/{o['k']}{star} ({o['frac']:.0%}, ch {o['chance']:.1f})"
                cells.append(f"{cell:>22}")
            lines.append(f"{name:<{w}}  {level:<5}  {lv['heads']:>5}  {g:>2}  {rho:>8}  "
                         + "  ".join(cells) + (f"  ({p['note']})" if p["note"] else ""))
    if skipped:
        lines.append(f"not compared (other models' shapes; rankings.json says why): {', '.join(skipped)}")
    return "\n".join(lines)


def format_stability(stab: dict) -> str:
    """One line per file of stability.json: tests for k-1 of the top k, retrieval heads as a range."""
    lines = ["stability (95% bootstrap intervals over tests; stability.json):"]
    for name, e in stab.items():
        if not e["tests"]:
            lines.append(f"  {name}: no tests")
            continue
        k, need = e["k"], e["tests_for_overlap"].get(str(e["k"] - 1))
        lo, hi = e["retrieval_heads_range"]
        lines.append(f"  {name}: {need} random tests find {k - 1} of the top {k} (mean); retrieval heads "
                     f"{e['retrieval_heads']} [{lo}, {hi}], {len(e['straddle'])} with 0.1 in their interval; top: "
                     + ", ".join(f"{h} {e['mean'][h]:.2f} [{e['ci'][h][0]:.2f}, {e['ci'][h][1]:.2f}]"
                                 for h in e["top_k"][:3]))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    files = list(argv[1:])
    if not files:
        raise UserError(f"give at least one head-score JSON file (or gate TSV): {USAGE}")
    if not FLAGS.out:
        raise UserError(f"--out is required (the output directory): {USAGE}")
    if FLAGS.top_k < 0:
        raise UserError(f"--top_k must be 0 or more, got {FLAGS.top_k}")
    if FLAGS.group_size is not None and FLAGS.model:
        raise UserError("give --group_size or --model, not both")
    group_size = model_group_size(FLAGS.model) if FLAGS.model else FLAGS.group_size
    res = analyze(files, FLAGS.out, results=FLAGS.results, pairs=FLAGS.pair, top_k=FLAGS.top_k,
                           always_on=FLAGS.always_on, shared_scale=FLAGS.shared_scale, group_size=group_size,
                           overlap_k=FLAGS.overlap_k)
    print(format_table(res["summary"], res["pairs"], res["dynamic"]))
    if res["rankings"] is not None:
        print(format_rankings(res["rankings"]))
    if res["stability"]:
        print(format_stability(res["stability"]))
    print(f"wrote {os.path.join(FLAGS.out, 'report.html')}")


def run() -> None:
    _define_flags()
    cli.run(main, rewrite=rewrite_pair_argv)


if __name__ == "__main__":
    run()
