"""Yi-6B-200K — the paper's detection grid (ORIGINAL.md §1: 20 lengths 1K-50K x 10 depths x needles).

Run on a TPU VM: python -m rhead_jax.sweep --config yi_6b_200k.py --config.model.path=/path/to/Yi-6B-200K --workdir gs://...
"""
from rhead_jax.config import default_config, paper_grid


def get_config():
    c = paper_grid(default_config())
    c.model.path = "checkpoints/Yi-6B-200K"   # a local HF directory (config.json + *.safetensors)
    c.model.name = "Yi-6B-200K"
    c.model.dtype = "bfloat16"
    c.model.chat = False
    c.sweep.batch_size = 8
    c.sweep.prefill_chunk = 4096
    c.mesh.data = -1
    c.mesh.model = 1
    c.mesh.expert = 1
    return c
