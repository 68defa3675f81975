"""A mixed KV cache (full retrieval heads + streaming heads) on the needle grid: accuracy vs memory.

`python -m rhead_jax.mixedkv` is a thin absl entry point (`__main__.py`) over `run_mixedkv`. By concept:

  heads.py    which KV heads stay full: rankings (copy scores, gates), random, none, all; fractions
  runner.py   MixedRunner: the engine's programs over rhead_jax.models.mixed_cache's cache, on a mesh
  run.py      run_mixedkv: one resumable run per head set, results.json, the table and the plot

results.json (accuracies are mean ROUGE-1 recall, 0-1; bytes are the batch cache arrays' nbytes / rows):
  model, grid {lengths, depths, needles, tests}, sink, recent, full_fractions, seeds,
  kv_heads {layers, per_layer, group_size},
  choices    [{name, kind, source (file) | null, ranking_kind (query | kv) | null}]
  full_kv_bytes_per_instance   {length: bytes of the plain [L, B, K, S, D] cache per row}
  groups     [{choice, kind, fraction (null: none / all), full_kv_heads, kv_heads, runs, seeds, accuracy,
               accuracy_std (over seeds), accuracy_by_length, kv_bytes_per_instance {length: bytes},
               kv_fraction (KV bytes / the full cache's, over all instances)}]
  runs       {label: {choice, fraction, seed, full_heads [[layer, kv_head], ...], tests, accuracy,
               accuracy_by_length, accuracy_by_cell, kv_bytes_per_instance, full_kv_bytes_per_instance,
               kv_fraction, instances [{key, length, depth, needle_index, prompt_tokens, generated,
               response, rouge1_recall, kv_bytes, full_kv_bytes}]}}
  provenance {model, needles, haystack, max_new_tokens, batch_size, rankings {name: file record}}
  files
"""
from rhead_jax.mixedkv.heads import (HeadChoice, MixedRun, full_heads, num_full, parse_choices, plan_runs,
                                     top_full)
from rhead_jax.mixedkv.run import run_mixedkv, with_overrides
from rhead_jax.mixedkv.runner import MeasuredRunner, MixedRunner, mesh_groups, mixed_layout

__all__ = ["HeadChoice", "MeasuredRunner", "MixedRun", "MixedRunner", "full_heads", "mesh_groups", "mixed_layout",
           "num_full", "parse_choices", "plan_runs", "run_mixedkv", "top_full", "with_overrides"]
