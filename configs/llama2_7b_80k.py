"""llama-2-7b-80k — the paper's detection grid (ORIGINAL.md §1: 20 lengths 1K-50K x 10 depths x needles).

Run on a TPU VM: python -m rhead_jax.sweep --config llama2_7b_80k.py --config.model.path=/path/to/llama-2-7b-80k --workdir gs://...
"""
from rhead_jax.config import default_config, paper_grid


def get_config():
    c = paper_grid(default_config())
    c.model.path = "checkpoints/llama-2-7b-80k"   # a local HF directory (config.json + *.safetensors)
    c.model.name = "llama-2-7b-80k"
    c.model.dtype = "bfloat16"
    c.model.chat = False
    c.sweep.batch_size = 8
    c.sweep.prefill_chunk = 4096
    c.mesh.data = -1
    c.mesh.model = 1
    c.mesh.expert = 1
    return c
