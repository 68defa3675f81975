"""Attention mass (rhead_jax.models.attention targets, reduced inside the kernels) against the dense
reference from full probabilities: the chunked path over several query and key chunks, a tiny
model's forward in pieces with a cache, and the targets against TransformerLens' detection patterns."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rhead_jax.models.attention import (MASS_TARGETS, NO_WINDOW, AttentionOptions, chunked_attention,
                                        dense_attention, mass_from_probs, mass_targets, target_mask)
from rhead_jax.models.cache import CaptureSpec, init_cache
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import forward, init_params


def _tl_patterns(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """TransformerLens' head_detector patterns (transformer_lens/head_detector.py) from the tokens."""
    T = len(tokens)
    prev = np.zeros((T, T))
    prev[np.arange(1, T), np.arange(T - 1)] = 1
    dup = (tokens[None, :] == tokens[:, None]).astype(float)
    np.fill_diagonal(dup, 0)
    dup = np.tril(dup)
    ind = np.zeros_like(dup)
    ind[:, 1:] = dup[:, :-1]          # shifted one key to the right, first column zero
    return {"previous": prev, "duplicate": dup, "induction": np.tril(ind)}


@pytest.mark.parametrize("bos", [True, False])
def test_targets_are_transformer_lens_patterns(bos):
    n, r = 7, 4
    block = np.array([11, 5, 42, 8, 23, 17, 3])
    tokens = np.concatenate([[1] if bos else [], np.tile(block, r)]).astype(int)
    T, start = len(tokens), int(bos)
    t = mass_targets(1, 1, period=[n], start=[start])
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    for name, pattern in _tl_patterns(tokens).items():
        ours = np.asarray(target_mask(name, pos, pos, t))[0]
        np.testing.assert_array_equal(ours, pattern.astype(bool), err_msg=name)
    # the first repeat has no duplicate and no induction target; every later query has r' of them
    assert not np.asarray(target_mask("induction", pos, pos, t))[0, :start + n].any()
    assert np.asarray(target_mask("duplicate", pos, pos, t))[0, start + 2 * n].sum() == 2


def _random_qkv(seed, B, T, K, G, D, S):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(B, T, K, G, D) * 2, f(B, K, S, D), f(B, K, S, D)


@pytest.mark.parametrize("window", [NO_WINDOW, 24])
def test_chunked_masses_equal_the_dense_reference(window):
    """T = 70 queries over 5 query chunks of 16, S = 80 slots over 5 key chunks; padding queries and
    empty slots; one range of queries per target; a uniform-mask score scale."""
    B, T, K, G, D, S = 2, 70, 2, 3, 8, 80
    q, k, v = _random_qkv(0, B, T, K, G, D, S)
    q_pos = np.tile(np.arange(T), (B, 1))
    q_pos[1, 60:] = -1
    k_pos = np.tile(np.where(np.arange(S) < T, np.arange(S), -1), (B, 1))
    k_pos[1, 60:] = -1
    q_pos, k_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)
    t = mass_targets(B, 4, span=[[5, 9], [10, 30]], queries=[[[3, 50], [1, 70], [20, 70], [21, 70]]] * B,
                     period=[7, 9], start=[1, 0])
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (K, G)), jnp.float32)
    kw = dict(window=window, scale=D ** -0.5, score_scale=scale)
    out_d, p = dense_attention(q, k, v, q_pos, k_pos, **kw)
    ref = mass_from_probs(p, q_pos, k_pos, MASS_TARGETS, t)
    out_c, mass = chunked_attention(q, k, v, q_pos, k_pos, jnp.zeros(B, jnp.int32), masses=MASS_TARGETS, targets=t,
                                    opts=AttentionOptions(q_chunk=16, k_chunk=16), **kw)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert np.asarray(ref).min() >= 0 and (np.asarray(ref)[:, :, :, 1] > 1).all()   # sums over queries
    plain = chunked_attention(q, k, v, q_pos, k_pos, jnp.zeros(B, jnp.int32),
                              opts=AttentionOptions(q_chunk=16, k_chunk=16), **kw)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out_c))   # masses leave the output alone
    # by hand: "previous" of row 0 over queries [1, 70) is the sum of p[q, q - 1]
    hand = sum(np.asarray(p)[0, :, :, i, i - 1] for i in range(1, T))
    np.testing.assert_allclose(np.asarray(ref)[0, :, :, 1], hand, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))


def test_forward_masses_in_pieces_equal_full_probs(tiny):
    """A tiny model: a forward with full probabilities is the reference; the same tokens prefilled in
    two calls of 48 (chunked, tiles of 16) give the same masses summed over the calls."""
    cfg, params = tiny
    B, T = 2, 96
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    positions = jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))
    t = mass_targets(B, 4, span=[[10, 20], [40, 70]], queries=[[[50, 96], [1, 96], [33, 96], [33, 96]]] * B,
                     period=[32, 32], start=[1, 1])
    fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logits", "attn"))
    _, _, caps = fwd(params, cfg, tokens, positions, capture=CaptureSpec(full_probs=True), logits="none")
    probs = caps.probs                                                          # [L, B, H, T, S]
    ref = jax.vmap(lambda p: mass_from_probs(p[:, :, None, :, :T], positions, positions, MASS_TARGETS, t))(probs)
    ref = np.asarray(ref)[:, :, :, 0]                                           # [L, B, H, M]
    attn = AttentionOptions(q_chunk=16, k_chunk=16)
    cache = init_cache(cfg, B, 112)
    total = 0
    for lo in (0, 48):
        _, cache, c = fwd(params, cfg, tokens[:, lo:lo + 48], positions[:, lo:lo + 48], cache, attn=attn,
                          capture=CaptureSpec(masses=MASS_TARGETS), targets=t, logits="none")
        total = total + np.asarray(c.mass)
    np.testing.assert_allclose(total, ref, rtol=2e-5, atol=2e-5)
    # a decode step (the dense path, T = 1) reads the same definition off its probabilities
    nxt = jnp.zeros((B, 1), jnp.int32)
    one = mass_targets(B, 1, span=[[10, 20], [40, 70]])
    _, _, c1 = fwd(params, cfg, nxt, jnp.full((B, 1), T, jnp.int32), cache, attn=attn,
                   capture=CaptureSpec(masses=("span",), full_probs=True), targets=one, logits="none")
    p1 = np.asarray(c1.probs)[:, :, :, 0]                                       # [L, B, H, S]
    want = np.stack([p1[:, 0, :, 10:20].sum(-1), p1[:, 1, :, 40:70].sum(-1)], axis=1)
    np.testing.assert_allclose(np.asarray(c1.mass)[..., 0], want, rtol=1e-5, atol=1e-6)


def test_masses_need_targets_and_known_names(tiny):
    cfg, params = tiny
    tok = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs targets"):
        forward(params, cfg, tok, jnp.arange(4)[None], capture=CaptureSpec(masses=("span",)))
    with pytest.raises(ValueError, match="unknown mass target"):
        CaptureSpec(masses=("nope",))
