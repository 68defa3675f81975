"""Tiny random models that use SmolLM2's real tokenizer (vocab 49152), for sweep-level tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from rhead_jax.checkpoints.gguf_import import default_model_dir

GQA = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)


def make_tiny_smol(directory: Path, *, moe: bool = False, gemma3: bool = False, seed: int = 0, sharpen: bool = True,
                   **config) -> Path:
    """Save a random llama (or Mixtral with `moe`, or a Gemma 3 text model with `gemma3`: local and
    global layers) with SmolLM2's tokenizer files into `directory`.

    `config` overrides the GQA shape above; `sharpen` redraws the matrices with std 0.1 so that
    attention actually picks keys.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in default_model_dir().iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, directory / f.name)
    common = {**GQA, **config}
    torch.manual_seed(seed)
    if moe:
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
        model = transformers.MixtralForCausalLM(cfg)
    elif gemma3:
        cfg = transformers.Gemma3TextConfig(**{"head_dim": 16, "sliding_window": 48, "sliding_window_pattern": 2,
                                               "query_pre_attn_scalar": 16, **common})
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{"tie_word_embeddings": True, **common})
        model = transformers.LlamaForCausalLM(cfg)
    if sharpen:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory
