"""Tiny random Hugging Face models of every supported family, built offline from config objects.

Each is saved with `save_pretrained` (safetensors) so tests exercise the real import path.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)

# name -> (config class, model class, overrides)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM",
               dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama2_linear": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_key_value_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                   "factor": 4.0})),
    "llama2_dynamic": ("LlamaConfig", "LlamaForCausalLM",
                       dict(max_position_embeddings=16, rope_parameters={
                           "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})),
    "yarn": ("LlamaConfig", "LlamaForCausalLM",
             dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64})),
    "yi": ("LlamaConfig", "LlamaForCausalLM",
           dict(num_attention_heads=8, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 5e6})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    # Qwen2's sliding window from max_window_layers: layer 0 global, layers 1-2 local
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5,
                                                             max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # Gemma: head_dim != hidden / heads, tied embeddings; windows of 5 (not dividing the tests'
    # prefill chunk of 8; 24-token contexts are ~5 windows), soft-caps small enough to bite
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, hidden_act="gelu_pytorch_tanh",
                                                      tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=24,
                    attn_logit_softcapping=4.0, final_logit_softcapping=6.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, num_hidden_layers=5, sliding_window=5, sliding_window_pattern=3,
                    query_pre_attn_scalar=24, tie_word_embeddings=True,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def make_tiny(name: str, directory: Path, seed: int = 0) -> Path:
    """Build family `name` with random weights into `directory` and return it."""
    cfg_cls, model_cls, over = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **over})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger-than-init weights make attention sharp, like a trained model's
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_torch(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
