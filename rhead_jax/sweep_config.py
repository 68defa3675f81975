"""The sweep's configuration schema: every knob has one home and a comment.

Files in configs/ start from `default_config()` and set values; `validate()` refuses keys that
are not in this schema, listing the valid ones.
"""
from __future__ import annotations

import ml_collections

from rhead_jax.needle.grid import paper_depths, paper_lengths


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        path="default",      # HF checkpoint dir, a .gguf file, or "default" (embedded SmolLM2-135M-Instruct)
        dtype="float32",     # "float32" or "bfloat16" params/activations; softmax is always fp32
        chat=True,           # wrap prompts in the tokenizer's chat template (instruct/chat models)
        name="",             # label used in logs and summaries; "" = the checkpoint dir name
    ))
    c.needles = ""           # JSONL of {needle, question, real_needle}; "" = the bundled default set
    c.haystack = ""          # a .txt file or a directory of .txt files; "" = bundled Areopagitica
    c.sweep = ml_collections.ConfigDict(dict(
        # tuples: config_flags overrides them from the command line, --config.sweep.lengths="(500,1000)"
        lengths=(500, 1000, 2000),   # context lengths in tokens
        depths=(0, 50, 100),         # needle depths in percent (0-100)
        faithful=False,              # reproduce every detection QUIRK of ORIGINAL.md
        max_new_tokens=50,           # decode-step cap (the original's 50)
        batch_size=8,                # instances of one length decoded together (the data axis)
        share_prefix=True,           # prefill the common haystack prefix once per grid
        prefill_chunk=1024,          # tokens per prefill call: bounds activation memory
        q_chunk=512,                 # attention query tile
        k_chunk=512,                 # attention key tile (cache sizes are multiples of it)
        pad_multiple=64,             # prompt / prefill widths rounded up to this: fewer recompiles
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=1,                      # devices along the instance (batch) axis; -1 = the rest
        model=1,                     # devices along heads / MLP
        expert=1,                    # devices along MoE experts
    ))
    return c


def paper_grid(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's grid (ORIGINAL.md §1): 20 lengths 1K-50K x 10 depths x the needles."""
    c.sweep.lengths = tuple(paper_lengths())
    c.sweep.depths = tuple(paper_depths())
    return c


def _paths(d, prefix=""):
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, ml_collections.ConfigDict):
            out |= _paths(v, key + ".")
    return out


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    valid = _paths(default_config())
    unknown = sorted(_paths(c) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
    s = c.sweep
    if not s.lengths or not s.depths:
        raise ValueError("config.sweep.lengths and config.sweep.depths must be non-empty")
    if any(not 0 <= d <= 100 for d in s.depths):
        raise ValueError(f"config.sweep.depths are percentages in [0, 100], got {list(s.depths)}")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
    return c
