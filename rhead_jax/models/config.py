"""Model configuration: one keyword-only dataclass for the Llama-like decoder family.

`ModelConfig.from_hf(config_dict)` reads a Hugging Face `config.json` in either layout
(transformers 5: `rope_parameters`, `dtype`, `head_dim: null`; 4.x: `rope_theta`,
`rope_scaling`, `torch_dtype`) and REFUSES any field that would change the computation and that
we do not implement, naming the field. Fields known to be irrelevant to a forward pass are
listed in `_IGNORED_FIELDS`; everything else must be understood. The pieces it reads beyond the
Llama fields (the rope as `RopeConfig`, sliding windows, Gemma's fields) and `ConfigError` are
rhead_jax.models.hf_config's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rhead_jax.models.hf_config import (_GEMMA3_TEXT_DEFAULTS, _GEMMA_FIELDS, ConfigError, RopeConfig, _gemma,
                                        _rope_from_hf, _sliding_windows, _text_config)

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "yi") + GEMMA_TYPES + ("gemma3",)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of one Llama-like decoder.

    Attributes:
      vocab_size, hidden_size (d), intermediate_size (f), num_layers (L).
      num_heads: query heads (H). num_kv_heads: key/value heads (K); H % K == 0 (GQA group G = H // K).
      head_dim: D.
      rms_norm_eps: RMSNorm epsilon.
      max_position_embeddings: the model's context limit; longer inputs are refused.
      rope: rotary settings.
      qkv_bias: q/k/v projections carry biases (Qwen1.5/Qwen2). o_bias/mlp_bias: Llama's flags.
      qk_norm: per-head RMSNorm on q and k before rope (Qwen3, Gemma 3).
      sliding_window: per-layer window (None = full attention on that layer); keys with
        q_pos - k_pos >= window are masked, as transformers does. A layer's KIND is local (a
        window) or global (None).
      local_rope: the rope of local layers when it differs from `rope` (Gemma 3: local theta
        10,000 unscaled, global `rope` 1e6 with linear scaling); None: every layer uses `rope`.
      norm_plus_one: Gemma's RMSNorm, x * (1 + w) computed in fp32 and then cast (every norm,
        q/k norms included); Llama's casts x first and multiplies by w.
      sandwich_norms: Gemma 2/3's extra norms: post-attention (on the attention output, before
        the residual add) and post-feed-forward; the MLP's input norm is then
        `pre_feedforward_layernorm`.
      activation: the MLP's gated activation, one of ACTIVATIONS ("gelu_tanh": GeGLU).
      embed_scale: embeddings times sqrt(hidden_size), the factor cast to the compute dtype
        first (as transformers does: 55.4256 becomes 55.5 in bf16 for d = 3072).
      query_pre_attn_scalar: attention scale is query_pre_attn_scalar ** -0.5 (None: head_dim).
      attn_softcap, final_softcap: tanh soft-capping, cap * tanh(s / cap), of the scaled
        attention scores (before the mask) and of the final logits (Gemma 2).
      num_experts, num_experts_per_tok: sparse MoE MLP (Mixtral) when num_experts > 0.
      tie_word_embeddings: lm_head shares the embedding matrix (SmolLM2).
      dtype: parameter/activation dtype name ("float32" or "bfloat16"); softmax is always fp32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: tuple[int | None, ...] | None = None
    local_rope: RopeConfig | None = None
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.sliding_window is not None and len(self.sliding_window) != self.num_layers:
            raise ConfigError("sliding_window must give one entry per layer")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")

    @property
    def attn_scale(self) -> float:
        """The softmax scale: head_dim ** -0.5, or query_pre_attn_scalar ** -0.5 (Gemma 2/3)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def windows(self) -> tuple[int | None, ...]:
        """[L] each layer's window (None: global)."""
        return self.sliding_window or (None,) * self.num_layers

    @property
    def ropes(self) -> tuple[RopeConfig, ...]:
        """The distinct ropes: (rope,) or (rope, local_rope); `rope_kinds` indexes it."""
        return (self.rope,) if self.local_rope is None else (self.rope, self.local_rope)

    @property
    def rope_kinds(self) -> tuple[int, ...]:
        """[L] index into `ropes` of each layer's rope (1: a local layer with its own rope)."""
        if self.local_rope is None:
            return (0,) * self.num_layers
        return tuple(int(w is not None) for w in self.windows)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, dtype: str | None = None) -> "ModelConfig":
        return _from_hf(dict(hf), dtype=dtype)


# Fields that never change a single forward pass (training, generation defaults, bookkeeping).
_IGNORED_FIELDS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "model_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "torch_dtype", "dtype", "use_cache", "initializer_range", "attention_dropout", "hidden_dropout",
    "embd_pdrop", "resid_pdrop", "pretraining_tp", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "tokenizer_class", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_return_dict", "is_encoder_decoder", "chunk_size_feed_forward",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "prefix", "task_specific_params",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "finetuning_task",
    "pruned_heads", "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k",
    "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "typical_p",
    "early_stopping", "num_return_sequences", "bad_words_ids", "diversity_penalty",
    "num_beam_groups", "remove_invalid_values", "forced_bos_token_id", "forced_eos_token_id",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "encoder_no_repeat_ngram_size", "output_scores", "return_dict_in_generate", "tf_legacy_loss",
    "use_bfloat16", "chat_template", "quantization_config_ignored", "pad_vocab_size_multiple",
    "use_mup", "is_llama_config", "tp_plan", "base_model_tp_plan", "base_model_pp_plan",
    "max_window_layers",  # only read together with use_sliding_window / layer_types
    "model_name", "sliding_window_pattern",
})

# Fields we read (possibly only to check they are benign).
_HANDLED_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "hidden_act",
    "tie_word_embeddings", "sliding_window", "use_sliding_window", "layer_types",
    "num_local_experts", "num_experts_per_tok", "partial_rotary_factor",
})


def _from_hf(hf: dict, *, dtype: str | None) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "gemma3":
        hf = _text_config(hf)
        mt = "gemma3_text"
    if mt == "gemma3_text":  # what the config.json leaves out, transformers takes from its defaults
        hf = {**_GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _GEMMA3_TEXT_DEFAULTS}}
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported architecture: model_type={mt!r} (field 'model_type'); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    known = _IGNORED_FIELDS | _HANDLED_FIELDS
    if mt == "mixtral":
        known = known | {"num_local_experts", "num_experts_per_tok"}
    if mt in GEMMA_TYPES:
        known = known | _GEMMA_FIELDS
    unknown = sorted(k for k in hf if k not in known)
    # Mistral/Mixtral configs may carry 'rope_scaling': null etc.: null values never change anything.
    unknown = [k for k in unknown if hf[k] is not None]
    if unknown:
        raise ConfigError(
            f"config field(s) {unknown} are not understood by rhead_jax for model_type={mt!r}; they may "
            "change the computation, so the model is refused. If a field is harmless, add it to "
            "rhead_jax.models.config._IGNORED_FIELDS.")
    act = hf.get("hidden_act", "silu")
    if mt not in GEMMA_TYPES and act not in ("silu", "swish"):
        raise ConfigError(f"unsupported activation hidden_act={act!r}; only 'silu' is implemented")
    if hf.get("quantization_config") is not None:
        raise ConfigError("quantized checkpoints (field 'quantization_config') are not supported")
    num_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // num_heads
    num_layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = mt == "qwen2" or attention_bias
    num_experts = int(hf.get("num_local_experts", 0) or 0) if mt == "mixtral" else 0
    if dtype is None:
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        dtype = {"float16": "bfloat16"}.get(dtype, dtype)  # no fp16 path: bf16 has the range
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"unsupported dtype {dtype!r}; use float32 or bfloat16")
    gemma = _gemma(hf, num_layers) if mt in GEMMA_TYPES else {}
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
        num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope=None if gemma else _rope_from_hf(hf), qkv_bias=qkv_bias, o_bias=attention_bias and mt != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=mt == "qwen3",
        sliding_window=None if gemma else _sliding_windows(hf, num_layers),
        num_experts=num_experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 0) or 0) if num_experts else 0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", mt in GEMMA_TYPES)), dtype=dtype, model_type=mt)
    return ModelConfig(**{**kw, **gemma})
