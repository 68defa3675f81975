"""Analysis of head-score files (Wu et al. 2024, Fig. 3 and §3 properties), of one sweep's per-test results,
and the comparison of any head rankings (every detector's head-score JSON, DuoAttention-style gate TSVs).

The library behind `python -m rhead_jax.analyze` (the command: rhead_jax/analyze.py). By concept:

  headscores.py   reading head-score files, the [L, H] mean matrix, Fig. 3 buckets, the per-file summary
  compare.py      pairs of files (top-k overlap, Spearman), every two rankings per query / KV head
  dynamic.py      a sweep's results.jsonl: activation rate per head, always-on vs context-specific
  run.py          `analyze`: runs them all and writes the files below (and the report)

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
                              head: Spearman, top-k overlap for each k (`compare.compare_rankings`)
  rankings_{query,kv}.png     (two or more inputs) those numbers as rankings x rankings heat maps
  provenance.json             the input files (path, bytes, sha256, git blob id, notes next to them), the
                              command, the shared colour scale, the cross-model top-k overlap, the labels
  dynamic.json                (--results) activation rate per head, always-on vs context-specific heads
  dynamic_activation.png      (--results) activation rate per head, sorted
  stability.json              per head-score file: 95% bootstrap intervals of every head's mean, the heads
                              whose interval contains 0.1, top-k frequency over resamples, the convergence
                              curve (rhead_jax.stability); stability_convergence.png, <stem>_intervals.png
  report.html                 everything above in one self-contained page (rhead_jax.report)

A file the user gave that cannot be used (missing, not JSON, a malformed head key, a malformed gate
file, a gate file of no model present, ...) raises rhead_jax.errors.UserError naming the file and the
fix. The figures and the page come from rhead_jax.report; the vocabulary both use (BUCKETS,
parse_head) is rhead_jax.scoring's.
"""
from rhead_jax.analysis.compare import (compare_pair, compare_rankings, detect_pairs, expected_overlap,
                                        model_group_size, overlap_matrix, spearman, top_overlap)
from rhead_jax.analysis.dynamic import dynamic_activation, load_results
from rhead_jax.analysis.headscores import (bucket_counts, bucket_of, bucket_shares, file_summary, load_head_scores,
                                           mean_matrix, shape_of)
from rhead_jax.analysis.run import analyze

# the library's public names, as `rhead_jax.analysis.<name>` (the notebook and users' code call them so)
__all__ = ["analyze", "load_head_scores", "shape_of", "mean_matrix", "bucket_of", "bucket_counts", "bucket_shares",
           "file_summary", "spearman", "top_overlap", "compare_pair", "detect_pairs", "overlap_matrix",
           "expected_overlap", "model_group_size", "compare_rankings", "load_results", "dynamic_activation"]
