"""The windowed KV cache (models.cache.KVCache with rings): a local layer keeps only its window
of positions, in a ring; exact against the plain (every position) cache through prefill, decode,
capture (ring slots mapped back to positions), the shared prefix and its branches, row blocks and
padding rows; the same cache serves Mistral's and Qwen2's sliding windows."""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.config import default_config, validate
from rhead_jax.engine import Engine
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.cache import init_cache, ring_size_for
from rhead_jax.models.generate import GenerateSpec, cache_size_for, generate, pad_prompts
from rhead_jax.models.mixed import cache_nbytes
from tests.helpers.tiny_smol import make_tiny_smol

SMALL = AttentionOptions(q_chunk=8, k_chunk=8)


def _generate(params, cfg, prompts, spec, ring):
    arr, lens = pad_prompts(prompts)
    cache = init_cache(cfg, len(prompts), cache_size_for(arr.shape[1], spec), ring=ring)
    return generate(params, cfg, jnp.asarray(arr), jnp.asarray(lens), cache, spec=spec,
                    prefill_width=int(lens.max()) - 1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral_window", "qwen2_window"])
def test_windowed_cache_is_exact_against_the_full_cache(family, tiny_model_dir):
    cfg, params = load_params(tiny_model_dir(family))
    prompts = [list(np.random.RandomState(n).randint(0, 97, n)) for n in (37, 22, 9)]  # 9 < ring: not yet full
    spec = GenerateSpec(max_new_tokens=6, top_k=3, prefill_chunk=8, attn=SMALL)
    size = cache_size_for(37, spec)
    ring = ring_size_for(cfg, size)
    assert ring == 5
    full, full_cache = _generate(params, cfg, prompts, spec, None)
    windowed, cache = _generate(params, cfg, prompts, spec, ring)
    n_local = sum(w is not None for w in cfg.windows)
    K, D = cfg.num_kv_heads, cfg.head_dim
    assert cache.ring_k.shape == (n_local, 3, K, ring, D) and cache.k.shape == (cfg.num_layers - n_local, 3, K, size, D)
    assert cache_nbytes(cache) < cache_nbytes(full_cache)
    np.testing.assert_array_equal(windowed.tokens, full.tokens)
    np.testing.assert_array_equal(windowed.topk_index, full.topk_index)   # positions, = the full cache's slots
    np.testing.assert_allclose(windowed.topk_weight, full.topk_weight, rtol=0, atol=2e-6)


def test_a_short_cache_stays_plain(tiny_model_dir):
    cfg, _ = load_params(tiny_model_dir("gemma3"))
    assert ring_size_for(cfg, 5) is None and ring_size_for(cfg, 6) == 5
    llama, _ = load_params(tiny_model_dir("llama2"))
    assert ring_size_for(llama, 4096) is None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two engines on one tiny Gemma 3 (window 48, layers local/global): the windowed cache (the
    default) and one forced to the plain cache."""
    d = make_tiny_smol(tmp_path_factory.mktemp("tiny_gemma3") / "tiny-gemma3", gemma3=True, sharpen=False,
                       hidden_size=32, intermediate_size=64, num_attention_heads=4)
    c = default_config()
    c.model.path, c.model.name = str(d), "tiny-gemma3"
    c.sweep.lengths, c.sweep.depths = (300, 400), (0, 100)
    c.sweep.max_new_tokens, c.sweep.prefill_chunk, c.sweep.pad_multiple = 5, 128, 32
    c.sweep.q_chunk = c.sweep.k_chunk = 64
    c.sweep.prefix_branches = 2
    windowed, plain = Engine(validate(c)), Engine(validate(c))
    plain.runner.ring_for = lambda size: None
    return windowed, plain


def test_engine_uses_the_windowed_cache_exactly(engines):
    """Shared prefix (with branches), row-by-row prefill in row blocks, a padding row, decode with
    capture: the windowed engine's outputs equal the plain cache's."""
    windowed, plain = engines
    inst = [i for i in windowed.plan_needles() if i.length == 300]
    spec = windowed.spec(capture=True)
    assert windowed.runner.ring_for(512) == 48 and plain.runner.ring_for(512) is None
    rows, keys = [i.prompt_ids for i in inst[:3]], [i.key for i in inst[:3]]
    outs = []
    for e in engines:
        shared = e.shared_prefix(inst, spec)
        outs.append((e.generate(rows, spec, batch_size=4, shared=shared, keys=keys),   # a padding row
                     e.generate(rows, spec, batch_size=3)))
    (wp, w0), (pp, p0) = outs
    assert (wp.starts > 0).all()
    for a, b in ((wp, pp), (w0, p0), (wp, p0)):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.topk_index, b.topk_index)
        np.testing.assert_allclose(a.topk_weight, b.topk_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "mistral_window"])
@pytest.mark.parametrize("mode", ["zero", "uniform", "mean_query", "mean_output"])
def test_windowed_cache_carries_every_head_mask_and_capture(family, mode, tiny_model_dir):
    """The windowed cache runs the plain cache's layer body: every mask mode (the mean modes, LOCOS's
    mean query ablation included) and the head_sums / span_outputs captures (the logit-contribution
    detectors' inputs) equal the plain cache's, through a prefill several windows long and a decode
    step whose span reaches back past the window."""
    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward

    cfg, params = load_params(tiny_model_dir(family))
    rng = np.random.RandomState(0)
    B, T, size = 2, 37, 48
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    ring = ring_size_for(cfg, size)
    assert ring is not None and ring < T
    on = (rng.rand(L, H) > 0.4).astype(np.float32)
    on[0, 0], on[-1, -1] = 0.0, 0.0                         # some head masked in a local and a global layer
    head_mask = (np.concatenate([on[..., None], 0.1 * rng.randn(L, H, D).astype(np.float32)], -1)
                 if mode.startswith("mean") else on)
    tokens = jnp.asarray(rng.randint(0, 97, (B, T)))
    positions = jnp.asarray(np.tile(np.arange(T), (B, 1)))
    span = jnp.asarray([[3, 9], [30, 36]], jnp.int32)      # row 0's span lies outside every window
    outs = {}
    for r in (None, ring):
        cache = init_cache(cfg, B, size, ring=r)
        logits, cache, caps = forward(params, cfg, tokens, positions, cache, head_mask=jnp.asarray(head_mask),
                                      mask_mode=mode, capture=CaptureSpec(head_sums=True), attn=SMALL)
        nxt = jnp.argmax(logits[:, -1], -1)[:, None]
        step, cache, dcaps = forward(params, cfg, nxt, jnp.full((B, 1), T), cache, head_mask=jnp.asarray(head_mask),
                                     mask_mode=mode, capture=CaptureSpec(top_k=2, span_outputs=True),
                                     attn=SMALL, output_span=span)
        outs[r] = (logits, caps.q_sum, caps.out_sum, step, dcaps.topk_index, dcaps.topk_weight, dcaps.head_out,
                   dcaps.span_out, dcaps.span_mass, dcaps.key_counts)
    names = ("logits", "q_sum", "out_sum", "step logits", "topk_index", "topk_weight", "head_out", "span_out",
             "span_mass", "key_counts")
    for name, plain, windowed in zip(names, outs[None], outs[ring]):
        np.testing.assert_allclose(np.asarray(windowed), np.asarray(plain), rtol=2e-5, atol=2e-5, err_msg=name)
    assert float(np.asarray(outs[ring][8])[:, 1].sum()) > 0   # row 1: its span is in the window, a mass to compare
