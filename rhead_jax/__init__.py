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
"""
