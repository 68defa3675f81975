"""rhead_jax: find, score and ablate retrieval heads in long-context language models (JAX/Flax).

Where to start reading:
1. `rhead_jax.engine`: the one engine under every command (the model on its mesh, the plan of a
   needle grid, the shared prefix, batches generated with masks and capture, atomic results).
2. `rhead_jax.models`: the decoder as a pure function (`decoder.forward`), attention with capture
   and head masks (`attention`), prefill and the decode loop (`generate`).
3. `rhead_jax.scoring`: the retrieval score of one head, lifted over heads, layers and tests with
   `vmap`; `rhead_jax.detection` turns the engine's output into the original's files.
The commands (`sweep`, `ablate`, `analyze`, `detectors`, `gates`, `mixedkv`, `dryrun`) are thin
absl entry points over these; docs/architecture.md draws the layers.

The rooms, top (commands) to bottom (base); imports point down only, and no two modules import
each other (tests/test_layers.py):

  commands   sweep.py, ablate.py, analyze.py: thin absl entry points
  features   detection.py (copy scores) and rounds.py (stop when the ranking is stable), ablation/
             (masking), analysis/ (files, buckets, rankings compared, dynamic activation),
             detectors/, gates/, mixedkv/, dryrun/ (each also a command: its __main__ or cli.py)
  engine     engine.py -> prefix.py (the shared prefix and its branches), batches.py (batches of one
             length), host_memory.py (freed host memory back to the system), runner.py (jitted
             programs on a mesh), plan.py (the needle grid, no jax), results_store.py (atomic
             per-batch results, resume), captures.py, compilation.py
  base       models/ (config, hf_config, cache, layers, decoder, attention, generate, mixed_cache,
             mixed), needle/ (haystack, needles, prompts, spans, ROUGE) and
             scoring.py, which import nothing of ours but errors (needle/ also jsonl.py, the one
             reader of the JSONL files users give); checkpoints/ (safetensors, GGUF,
             orbax), sharding.py, report/ (figures, HTML), rankings.py (any ranking file in one
             shape), stability.py, diagnosis.py, qa.py, config.py (THE config schema), presets.py,
             cli.py, errors.py, jsonl.py, io.py
"""
