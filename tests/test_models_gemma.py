"""Gemma 1/2/3 in the one decoder: config.json fields, and parity with transformers PyTorch (fp32,
eager attention) on tiny random models whose local layers have a window of 5 (tests/hf_tiny.py):
contexts several windows long, a prefill chunk (8) the window does not divide, prefill + decode,
a shared prefix, captured top-k attention at decode steps, head masks in both modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
import jax.numpy as jnp

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.cache import init_cache
from rhead_jax.models.config import ConfigError, ModelConfig, RopeConfig
from rhead_jax.models.decoder import forward
from rhead_jax.models.generate import GenerateSpec, generate, greedy_generate, pad_prompts, cache_size_for
from rhead_jax.runner import _rows
from tests.hf_tiny import load_torch
from tests.test_models import _hf_generate, check_prefill_then_decode_matches_full_forward

SMALL = AttentionOptions(q_chunk=8, k_chunk=8)
GEMMAS = ["gemma", "gemma2", "gemma3"]
HYBRID = ["gemma2", "gemma3"]
T = 40  # 8 windows of 5


def _tokens(batch=2, length=T, seed=0):
    return np.random.RandomState(seed).randint(0, 97, (batch, length))


def _positions(batch, length):
    return jnp.broadcast_to(jnp.arange(length), (batch, length))


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


# --------------------------------------------------------------------------- config.json

# google/gemma-2-9b's config.json (transformers 4.42), as published
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 256000}

# google/gemma-3-4b-it's config.json (multimodal; its text_config lists only non-defaults)
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model"}}


def test_gemma2_config_json():
    hf = dict(GEMMA2_9B)
    hf.pop("sliding_window_size")  # a 4.42-only duplicate of sliding_window, refused below
    c = ModelConfig.from_hf(hf)
    assert (c.norm_plus_one, c.sandwich_norms, c.embed_scale, c.activation) == (True, True, True, "gelu_tanh")
    assert (c.attn_softcap, c.final_softcap, c.attn_scale) == (50.0, 30.0, 256 ** -0.5)
    assert c.sliding_window == (4096, None) * 21 and c.local_rope is None and c.tie_word_embeddings
    assert c.rope == RopeConfig(theta=10000.0)


def test_unknown_gemma_field_is_refused():
    with pytest.raises(ConfigError, match="sliding_window_size"):
        ModelConfig.from_hf(GEMMA2_9B)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**GEMMA3_4B["text_config"], "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="attn_logit_softcapping"):
        ModelConfig.from_hf({**GEMMA3_4B["text_config"], "attn_logit_softcapping": 50.0})


def test_gemma3_multimodal_config_reads_its_text_config():
    c = ModelConfig.from_hf(GEMMA3_4B)
    ref = transformers.Gemma3TextConfig(**GEMMA3_4B["text_config"])  # transformers' own defaults
    assert c.model_type == "gemma3_text" and c.dtype == "bfloat16" and c.qk_norm
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        34, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.vocab_size)
    assert c.sliding_window == tuple(1024 if t == "sliding_attention" else None for t in ref.layer_types)
    assert c.sliding_window.count(None) == 5  # layers 6, 12, 18, 24, 30 (1-based) are global
    assert c.rope == RopeConfig(rope_type="linear", theta=1e6, factor=8.0)
    assert c.local_rope == RopeConfig(theta=10000.0)
    assert c.rope_kinds == tuple(int(w is not None) for w in c.sliding_window)
    assert c.attn_scale == 256 ** -0.5 and c.attn_softcap is None and c.final_softcap is None


def test_embedding_scale_is_rounded_like_transformers():
    """sqrt(3072) = 55.4256 is cast to bf16 (55.5) before it multiplies, as transformers does."""
    from rhead_jax.models.layers import embed

    cfg = ModelConfig.from_hf({**GEMMA3_4B["text_config"], "hidden_size": 3072, "vocab_size": 4}, dtype="bfloat16")
    params = {"embed": jnp.ones((4, 3072), jnp.bfloat16)}
    assert float(embed(params, cfg, jnp.zeros((1, 1), jnp.int32))[0, 0, 0]) == 55.5


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", GEMMAS)
def test_long_context_logits_match_transformers(family, tiny_model_dir):
    d = tiny_model_dir(family)
    tm = load_torch(d)
    cfg, params = load_params(d)
    tok = _tokens()
    with torch.no_grad():
        ref = tm(torch.tensor(tok)).logits.numpy()
    for attn in (SMALL, AttentionOptions()):  # chunked over 5 query chunks; one chunk
        ours, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), attn=attn)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=_tol(ref), rtol=0)


@pytest.mark.parametrize("family", HYBRID)
def test_local_layers_really_truncate(family, tiny_model_dir):
    """Changing a token more than a window before the end changes the logits (global layers see
    it) but not if every layer were local: the window is in force, not a no-op."""
    cfg, params = load_params(tiny_model_dir(family))
    tok = _tokens(1)
    alt = tok.copy()
    alt[0, 3] = (alt[0, 3] + 1) % 97
    local = cfg.replace(sliding_window=(5,) * cfg.num_layers)
    run = lambda c, t: np.asarray(forward(params, c, jnp.asarray(t), _positions(1, T), attn=SMALL)[0])[0, -1]  # noqa: E731
    assert np.abs(run(cfg, tok) - run(cfg, alt)).max() > 1e-4
    np.testing.assert_array_equal(run(local, tok), run(local, alt))


@pytest.mark.parametrize("family", HYBRID)
def test_prefill_then_decode_matches_full_forward(family, tiny_model_dir):
    check_prefill_then_decode_matches_full_forward(tiny_model_dir(family), _tokens(), prefill=29, cache_size=48)


def _hf_topk(out, step, k, query_pos):
    """[L, H, k] positions and weights of the top-k keys of the step's query: a local layer's
    cache in transformers holds only the latest keys, so its indices are shifted to positions."""
    idx, val = [], []
    for a in out.attentions[step]:
        row = a[0, :, -1]                                    # [H, n]: keys query_pos - n + 1 .. query_pos
        top = row.topk(k, dim=-1)
        idx.append(top.indices.numpy() + query_pos + 1 - row.shape[-1])
        val.append(top.values.numpy())
    return np.stack(idx), np.stack(val)


def _check_against_hf(gen, tm, prompts, n_new, k):
    for b, p in enumerate(prompts):
        out = _hf_generate(tm, p, n_new)
        assert np.asarray(gen.tokens[b]).tolist() == out.sequences[0, len(p):].tolist()
        for step in range(n_new):
            idx, val = _hf_topk(out, step, k, len(p) - 1 + step)
            np.testing.assert_allclose(np.asarray(gen.topk_weight[b, step]), val, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(gen.topk_index[b, step]), idx)


PROMPT_LENS = (37, 22)  # ~7 and ~4 windows; two lengths: padding rows


@pytest.mark.parametrize("family", GEMMAS)
def test_generation_and_captured_attention_match_transformers(family, tiny_model_dir):
    d = tiny_model_dir(family)
    tm = load_torch(d)
    cfg, params = load_params(d)
    prompts = [list(_tokens(1, n, seed=n)[0]) for n in PROMPT_LENS]
    n_new, k = 6, 3
    gen = greedy_generate(params, cfg, prompts, spec=GenerateSpec(max_new_tokens=n_new, top_k=k, prefill_chunk=8,
                                                                  attn=SMALL))
    _check_against_hf(gen, tm, prompts, n_new, k)


@pytest.mark.parametrize("family", HYBRID)
def test_shared_prefix_generation_matches_transformers(family, tiny_model_dir):
    """A prefix of 17 tokens prefilled once in a 1-row cache, copied into each row (runner._rows,
    the engine's path), the rest prefilled per row, then decoded: as transformers' generation."""
    d = tiny_model_dir(family)
    tm = load_torch(d)
    cfg, params = load_params(d)
    prefix = list(_tokens(1, 17, seed=1)[0])
    prompts = [prefix + list(_tokens(1, n, seed=n)[0]) for n in (20, 9)]
    n_new, k = 5, 2
    spec = GenerateSpec(max_new_tokens=n_new, top_k=k, prefill_chunk=8, attn=SMALL)
    arr, lens = pad_prompts(prompts)
    size = cache_size_for(arr.shape[1], spec)
    one = init_cache(cfg, 1, size)
    _, one, _ = forward(params, cfg, jnp.asarray([prefix]), _positions(1, 17), one, logits="none", attn=SMALL)
    cache = _rows(one, jnp.asarray([17, 17]), size=size)
    gen, _ = generate(params, cfg, jnp.asarray(arr), jnp.asarray(lens), cache, spec=spec,
                      prefill_width=int(lens.max()) - 1 - 17)
    _check_against_hf(gen, tm, prompts, n_new, k)


# --------------------------------------------------------------------------- head masks

MASKED = [(0, 1), (1, 3), (2, 0), (3, 2)]  # (layer, query head): local and global layers


def _mask(cfg, value=0.0):
    m = np.ones((cfg.num_layers, cfg.num_heads), np.float32)
    for layer, head in MASKED:
        m[layer, head] = value
    return jnp.asarray(m)


@pytest.mark.parametrize("family", HYBRID)
def test_zero_mask_equals_zeroed_o_proj_input(family, tiny_model_dir):
    from tests.test_models import check_zero_mask_equals_zeroed_o_proj_input

    d = tiny_model_dir(family)
    cfg, _ = load_params(d)
    check_zero_mask_equals_zeroed_o_proj_input(d, _tokens(), MASKED, _mask(cfg))


def _uniform_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None,
                   sliding_window=None, **kwargs):
    """transformers' Gemma eager attention (scale, soft-cap, then the mask) with the MASKED heads'
    scores set to 0 before the softmax; the causal (+ this layer's window) mask built here."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    for layer, head in MASKED:
        if layer == module.layer_idx:
            scores[:, head] = 0
    q_len, k_len = scores.shape[-2:]
    qi = torch.arange(k_len - q_len, k_len)[:, None]
    ki = torch.arange(k_len)[None, :]
    window = module.sliding_window or k_len + 1
    visible = (ki <= qi) & (qi - ki < window)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.mark.parametrize("family", HYBRID)
def test_uniform_mask_equals_zeroed_scores(family, tiny_model_dir):
    transformers.AttentionInterface.register("rhead_uniform_gemma", _uniform_eager)
    d = tiny_model_dir(family)
    tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                           attn_implementation="rhead_uniform_gemma").eval()
    cfg, params = load_params(d)
    tok = _tokens()
    with torch.no_grad():
        ref = tm(torch.tensor(tok)).logits.numpy()
        plain = load_torch(d)(torch.tensor(tok)).logits.numpy()
    ours, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), head_mask=_mask(cfg),
                         mask_mode="uniform", attn=SMALL)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=_tol(ref), rtol=0)
    assert np.abs(plain - ref).max() > 1e-3  # the mask really changes the output


def test_orbax_config_round_trip_keeps_the_local_rope():
    import json

    from rhead_jax.checkpoints.orbax_io import _cfg_from_json, _cfg_to_json

    cfg = ModelConfig.from_hf(GEMMA3_4B)
    assert _cfg_from_json(json.loads(json.dumps(_cfg_to_json(cfg)))) == cfg
