"""Gemma-3-27B (128K context; Gemma 3 (5 local : 1 global layers)) — the paper's detection grid (ORIGINAL.md §1: 20 lengths
1K-50K x 10 depths x needles). Local layers keep a windowed KV cache.

Run on a TPU VM: python -m rhead_jax.sweep --config gemma3_27b.py --config.model.path=/path/to/gemma-3-27b-pt --workdir gs://...
Plan first: python -m rhead_jax.dryrun --config gemma3_27b.py --smallest v5e --context 131072
"""
from rhead_jax.config import default_config, paper_grid


def get_config():
    c = paper_grid(default_config())
    c.model.path = "checkpoints/gemma-3-27b-pt"   # a local HF directory (config.json + *.safetensors)
    c.model.name = "gemma-3-27b-pt"
    c.model.dtype = "bfloat16"
    c.model.chat = False   # a base model
    c.sweep.batch_size = 8
    c.sweep.prefill_chunk = 4096
    c.mesh.data = -1
    c.mesh.model = 8
    c.mesh.expert = 1
    return c
