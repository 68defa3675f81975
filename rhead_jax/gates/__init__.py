"""DuoAttention-style gates: one alpha in [0, 1] per KV head, trained with the model frozen.

    python -m rhead_jax.gates --config smollm2_135m.py --workdir W

Every KV head's attention output becomes alpha * full + (1 - alpha) * streaming (sink + recent
keys), and the gates are trained to keep the final hidden states of the model on synthetic
multi-passkey prompts while an L1 penalty pushes them to 0 (Xiao et al., "DuoAttention", ICLR 2025,
arXiv 2410.10819). High alpha = the head needs the full KV cache (a retrieval head).

Modules, by concept:
  attention.py  full and streaming attention from shared scores, chunked, O(T) memory under autodiff
  model.py      the gated decoder (and the model's own hidden states), from the decoder's pieces
  data.py       the synthetic multi-passkey prompts, a function of (seed, step)
  train.py      loss, optimizer, the jitted step on the engine's mesh, orbax checkpoints, the run
  report.py     gates.json and loss.png

Files in the workdir: full_attention_heads.tsv (DuoAttention's format, read by
rhead_jax.rankings), gates.json (gates [L][K], summaries, the config), loss.jsonl (one record per
step), loss.png, gates_config.json (the pinned config), checkpoints/ (orbax).
"""
