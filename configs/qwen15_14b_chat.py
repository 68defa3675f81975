"""Qwen1.5-14B-Chat — the paper's detection grid (ORIGINAL.md §1: 20 lengths 1K-50K x 10 depths x needles).

Run on a TPU VM: python -m rhead_jax.sweep --config qwen15_14b_chat.py --config.model.path=/path/to/Qwen1.5-14B-Chat --workdir gs://...
"""
from rhead_jax.config import default_config, paper_grid


def get_config():
    c = paper_grid(default_config())
    # a 32K-context model: the paper lengths it can hold (+ 50 generated tokens)
    c.sweep.lengths = tuple(n for n in c.sweep.lengths if n <= 32768 - 50)
    c.model.path = "checkpoints/Qwen1.5-14B-Chat"   # a local HF directory (config.json + *.safetensors)
    c.model.name = "Qwen1.5-14B-Chat"
    c.model.dtype = "bfloat16"
    c.model.chat = True
    c.sweep.batch_size = 8
    c.sweep.prefill_chunk = 4096
    c.mesh.data = -1
    c.mesh.model = 8
    c.mesh.expert = 1
    return c
