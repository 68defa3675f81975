"""A Hugging Face `config.json` in our terms: the pieces rhead_jax.models.config's
`ModelConfig.from_hf` reads beyond the plain Llama fields.

`RopeConfig` (the rotary embedding: HF's `rope_parameters` / `rope_scaling`, read by
`_rope_from_hf`), the sliding windows per layer (`_sliding_windows`: Mistral, Qwen2's
`max_window_layers`, `layer_types`), a Gemma 1/2/3 config's fields (`_gemma`, `_GEMMA_FIELDS`) and
a multimodal `gemma3` config's text_config with Gemma3TextConfig's defaults (`_text_config`).
`ConfigError` names a field rhead_jax cannot represent faithfully.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from rhead_jax.errors import UserError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class ConfigError(UserError):
    """A HF config.json that rhead_jax cannot represent faithfully."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding settings.

    rope_type: one of ROPE_TYPES.
    theta: base wavelength.
    factor: scaling factor (linear, dynamic, yarn, llama3).
    original_max_position_embeddings: pretraining context (yarn, llama3); for `dynamic` the
      model's `max_position_embeddings` plays this role (as in transformers).
    low_freq_factor, high_freq_factor: llama3 smoothing band.
    beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate: yarn.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


_ROPE_FIELDS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "dynamic": {"rope_type", "type", "rope_theta", "factor"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
               "low_freq_factor", "high_freq_factor"},
}


def _rope_from_hf(hf: dict, params: Mapping | None = None, theta: float | None = None) -> RopeConfig:
    """The rope of `params` (default: the config's rope_parameters / rope_scaling); `theta` is the
    base when neither params nor the config's rope_theta names one."""
    if params is None:
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope_parameters must be a mapping, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError(
            "per-layer-type rope_parameters are not supported (field 'rope_parameters' is nested by "
            "layer type); use a model with a single rope configuration")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_FIELDS:
        raise ConfigError(
            f"unsupported rope_type {rope_type!r} (field 'rope_parameters.rope_type' / "
            f"'rope_scaling.type'); supported: {', '.join(ROPE_TYPES)}")
    unknown = set(params) - _ROPE_FIELDS[rope_type]
    if unknown:
        raise ConfigError(
            f"rope field(s) {sorted(unknown)} are not understood for rope_type {rope_type!r}; "
            f"known: {sorted(_ROPE_FIELDS[rope_type])}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0 if theta is None else theta))
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported (field 'partial_rotary_factor')")
    orig = params.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3") and orig is None:
        orig = hf.get("max_position_embeddings")
    factor = params.get("factor", 1.0)
    if rope_type == "yarn" and factor is None:
        factor = hf["max_position_embeddings"] / orig
    return RopeConfig(
        rope_type=rope_type, theta=float(theta), factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=orig,
        low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
        beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _sliding_windows(hf: dict, num_layers: int) -> tuple[int | None, ...] | None:
    mt = hf.get("model_type")
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if mt in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            if layer_types and any(t != "full_attention" for t in layer_types):
                raise ConfigError("field 'layer_types' asks for sliding attention but use_sliding_window "
                                  "is false; this combination is not supported")
            return None
        if window is None:
            raise ConfigError("use_sliding_window is true but field 'sliding_window' is null")
        if layer_types is None:
            mwl = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
    elif layer_types is None:
        return (window,) * num_layers if window else None
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError(f"field 'layer_types' has {len(layer_types)} entries for {num_layers} layers")
        bad = set(layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ConfigError(f"field 'layer_types' holds unsupported attention types {sorted(bad)}")
        if "sliding_attention" in layer_types and not window:
            raise ConfigError("field 'layer_types' asks for sliding attention but 'sliding_window' is null")
        wins = tuple(window if t == "sliding_attention" else None for t in layer_types)
        return wins if any(w is not None for w in wins) else None
    return None


# Gemma: the fields its config.json may carry beyond the Llama ones.
_GEMMA_FIELDS = frozenset({
    "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "rope_local_base_freq", "use_bidirectional_attention", "sliding_window_pattern",
    "_sliding_window_pattern",  # transformers 5 writes it beside layer_types, which win
    "cache_implementation",  # transformers' choice of cache class ("hybrid"): no effect on values
})

# transformers' Gemma3TextConfig defaults: the text_config of a `gemma3` checkpoint lists only
# what differs from them (google/gemma-3-4b-it names 6 fields). The rope defaults (global theta
# 1e6, local 10,000) and the pattern (6) are applied in `_gemma`.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


def _text_config(hf: dict) -> dict:
    """A `gemma3` (multimodal) config's text_config, with Gemma3TextConfig's defaults and the
    outer config's dtype; the vision fields do not touch the text decoder."""
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError("model_type 'gemma3' needs a 'text_config' mapping (the language model's config)")
    text = dict(text)
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ConfigError(f"gemma3 text_config has model_type {text['model_type']!r}; expected 'gemma3_text'")
    text["model_type"] = "gemma3_text"
    for key in ("dtype", "torch_dtype"):
        if key in hf and key not in text:
            text[key] = hf[key]
    return text


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _gemma(hf: dict, num_layers: int) -> dict:
    """ModelConfig fields of a Gemma (1), Gemma 2 or Gemma 3 text config (transformers 4 or 5)."""
    mt = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention is true (field 'use_bidirectional_attention'): "
                          "only causal decoders are supported")
    if mt == "gemma":  # transformers maps Gemma 1's legacy hidden_act "gelu" to the tanh GELU
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        for f in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "rope_local_base_freq", "sliding_window", "sliding_window_pattern", "layer_types"):
            if hf.get(f) is not None:
                raise ConfigError(f"field {f!r} is not part of a model_type 'gemma' config")
    else:
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ConfigError(f"unsupported activation {act!r} (field 'hidden_activation'); supported: "
                          f"{', '.join(_ACTIVATIONS)}")
    out = dict(norm_plus_one=True, sandwich_norms=mt != "gemma", activation=_ACTIVATIONS[act],
               embed_scale=True, qk_norm=mt == "gemma3_text")
    if mt == "gemma":
        return out | dict(rope=_rope_from_hf(hf))
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers: layer i is local unless (i + 1) % pattern == 0
        pattern = (hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
                   or (2 if mt == "gemma2" else 6))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    rp = hf.get("rope_parameters")
    if isinstance(rp, Mapping) and rp and all(isinstance(v, Mapping) for v in rp.values()):
        unknown = set(rp) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ConfigError(f"field 'rope_parameters' names unknown layer types {sorted(unknown)}")
        rope = _rope_from_hf(hf, rp.get("full_attention", {}), theta=1e6)
        local = _rope_from_hf(hf, rp.get("sliding_attention", {}), theta=1e4)
    else:
        rope = _rope_from_hf(hf, theta=1e6 if mt == "gemma3_text" else 1e4)
        local = (RopeConfig(theta=float(hf.get("rope_local_base_freq") or 10000.0))
                 if mt == "gemma3_text" else None)
        if mt == "gemma2" and hf.get("rope_local_base_freq") is not None:
            raise ConfigError("field 'rope_local_base_freq' is not part of a model_type 'gemma2' config")
    if local == rope:
        local = None
    if mt == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        raise ConfigError("field 'attn_logit_softcapping' is set for a Gemma 3 model, whose transformers "
                          "attention ignores it; refused as ambiguous (set it to null)")
    qpas = hf.get("query_pre_attn_scalar")
    return out | dict(
        rope=rope, local_rope=local, sliding_window=_sliding_windows({**hf, "layer_types": layer_types}, num_layers),
        query_pre_attn_scalar=None if qpas is None else float(qpas),
        attn_softcap=None if hf.get("attn_logit_softcapping") is None else float(hf["attn_logit_softcapping"]),
        final_softcap=None if hf.get("final_logit_softcapping") is None else float(hf["final_logit_softcapping"]))

