"""Masking ablations of retrieval heads (Wu et al. 2024, Fig. 1 and §4; ORIGINAL.md §7).

`python -m rhead_jax.ablate` is a thin absl entry point over `run_ablation`. The package, by concept:

  heads.py      mask specs (top:K, top:K@NAME, random:K, list:..., none), head-score files and
                rankings (--scores NAME:PATH,...), the [L, H] mask, runs (one head set) and groups
                (a spec over its seeds)
  tasks.py      what is measured: the needle grid (niah) or a QA / CoT task file, on the engine
  taxonomy.py   the paper's failure taxonomy of one needle answer
  results.py    group means, the top-k vs random table, text summaries
  report.py     the report page's sections: groups, captions, example answers, provenance
  run.py        run_ablation: plan the runs, run them resumably, write results.json and the figures

results.json (accuracies are fractions 0-1; a "group" is one spec, e.g. random:20, over its seeds):
  model, task, mask {spec, mode, phase}, scores, retrieval_threshold, seeds
  rankings, random_pool        (several rankings, --scores NAME:PATH,...) [{name, path, kind, shape}]; the
                               rule the random heads were drawn by
  accuracy, accuracy_std       the --mask group: mean over its runs (std over seeds; 0 otherwise)
  tests                        tests in that group, summed over its runs
  metrics                      niah {rouge1_recall}; qa {em, f1}; cot {accuracy}
  masked_heads                 [[layer, head], ...] (top: best first); random: one such list per seed
  accuracy_by_cell             niah: [{length, depth, accuracy}] (mean over needles and seeds)
  categories                   niah: {correct, incomplete, wrong_extraction, hallucination, empty} counts
  grid, taxonomy               niah: {lengths, depths, needles}; {extraction_ngram, categories, rules}
  baseline                     the "none" group (or null when not run)
  groups                       {spec: {spec, kind, k, runs, seeds, accuracy, accuracy_std, accuracy_by_run,
                               tests, accuracy_interval (95% bootstrap over the group's tests, pooled over
                               seeds), masked_heads, metrics[, accuracy_by_cell, categories]}}
  sweep_k                      null, or {k, top, random, random_std, random_min, random_max, seeds, baseline,
                               rows: [{k, top, random, random_std, random_min, random_max, random_by_seed
                               [, by_ranking, by_ranking_interval]}][, rankings, by_ranking {name: [accuracy per k]}]} (k = 0 is
                               the unmasked baseline; top: the first ranking's)
  runs                         {run label: {spec, seed, heads[, store], tests, accuracy, metrics, ...,
                               instances}} (store: the runs/ directory when it is not the label: top:K@NAME);
                               niah instances: {key, length, depth, needle_index, response, generated,
                               rouge1_recall, score, category, content_recall, answer_fragment, haystack_copy,
                               copied_words};
                               qa/cot instances: {key, index, question, answer, response, generated,
                               em, f1 | prediction, correct, score}
  provenance                   {model {name, path, dtype}, scores {path, name, bytes, sha256, git_blob, tests} | null,
                               [rankings [{ranking, kind, shape, path, name, bytes, sha256, git_blob}],
                               masked_head_scores_ranking,] masked_head_scores {"L-H": mean}, needles,
                               haystack, max_new_tokens, faithful, batch_size[, prompt_tokens {nominal length: [min, max] real prompt tokens}]}
                               (no time stamps: a rerun writes the same bytes)
  files                        the files written next to results.json
"""
from rhead_jax.ablation.heads import (Group, Head, MaskSpec, Run, build_head_mask, check_heads, check_scores,
                                      head_key, load_rankings, load_scores, main_spec, parse_head, parse_mask_spec,
                                      phase_masks, plan_groups, random_pool, resolve_heads)
from rhead_jax.ablation.results import format_summary, group_summary, sweep_k_table
from rhead_jax.ablation.run import run_ablation, validate, with_overrides
from rhead_jax.ablation.taxonomy import CATEGORIES, FAILURES, classify_response
from rhead_jax.ablation.tasks import TASKS, NiahTask, TextTask, parse_task

__all__ = ["CATEGORIES", "FAILURES", "Group", "Head", "MaskSpec", "NiahTask", "Run", "TASKS", "TextTask",
           "build_head_mask", "check_heads", "check_scores", "classify_response", "format_summary",
           "group_summary", "head_key", "load_rankings", "load_scores", "main_spec", "parse_head",
           "parse_mask_spec", "parse_task", "phase_masks", "plan_groups", "random_pool", "resolve_heads",
           "run_ablation", "sweep_k_table",
           "validate", "with_overrides"]
