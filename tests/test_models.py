"""Parity of the JAX decoder with transformers PyTorch (fp32, eager attention) for every family."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.cache import CaptureSpec, init_cache
from rhead_jax.models.decoder import forward
from rhead_jax.models.generate import GenerateSpec, greedy_generate
from tests.hf_tiny import FAMILIES, load_torch

SMALL = AttentionOptions(q_chunk=8, k_chunk=8)  # several chunks even for short test sequences
T = 24


def _tokens(batch=2, length=T, seed=0):
    return np.random.RandomState(seed).randint(0, 97, (batch, length))


def _positions(batch, length):
    return jnp.broadcast_to(jnp.arange(length), (batch, length))


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tiny_model_dir):
    d = tiny_model_dir(family)
    tm = load_torch(d)
    cfg, params = load_params(d)
    tok = _tokens()
    with torch.no_grad():
        ref = tm(torch.tensor(tok)).logits.numpy()
    ours, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), attn=SMALL)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=_tol(ref), rtol=0)
    # one query chunk covering everything (the other tiling) gives the same answer
    ours_big, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape))
    np.testing.assert_allclose(np.asarray(ours_big), ref, atol=_tol(ref), rtol=0)


# Not dynamic NTK: its frequencies depend on the longest position of each call, so by design
# (transformers' too) cached keys differ from a single full pass.
@pytest.mark.parametrize("family", ["llama2", "mistral_window", "mixtral", "qwen2", "yarn"])
def test_prefill_then_decode_matches_full_forward(family, tiny_model_dir):
    check_prefill_then_decode_matches_full_forward(tiny_model_dir(family), _tokens(), prefill=17, cache_size=32)


def check_prefill_then_decode_matches_full_forward(d, tokens, *, prefill: int, cache_size: int) -> None:
    """Prefilling `prefill` tokens into a cache and decoding the rest one by one gives the logits
    of one full forward pass."""
    cfg, params = load_params(d)
    tok = jnp.asarray(tokens)
    pos = _positions(*tok.shape)
    full, _, _ = forward(params, cfg, tok, pos, attn=SMALL)
    cache = init_cache(cfg, tok.shape[0], cache_size)
    logits, cache, _ = forward(params, cfg, tok[:, :prefill], pos[:, :prefill], cache, attn=SMALL)
    steps = [logits]
    for t in range(prefill, tok.shape[1]):
        lg, cache, _ = forward(params, cfg, tok[:, t:t + 1], pos[:, t:t + 1], cache)
        steps.append(lg)
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=_tol(full), rtol=0)


def _hf_generate(tm, prompt, n):
    with torch.no_grad():
        return tm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                           output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", ["llama2", "yi", "mixtral", "qwen2", "qwen3", "smollm2", "mistral_window"])
def test_generation_and_captured_attention_match_transformers(family, tiny_model_dir):
    d = tiny_model_dir(family)
    tm = load_torch(d)
    cfg, params = load_params(d)
    prompts = [list(_tokens(1, n, seed=n)[0]) for n in (21, 14)]  # two lengths: exercises padding
    n_new, k = 6, 3
    spec = GenerateSpec(max_new_tokens=n_new, top_k=k, prefill_chunk=8, attn=SMALL)
    gen = greedy_generate(params, cfg, prompts, spec=spec)
    windowed = cfg.sliding_window is not None
    for b, p in enumerate(prompts):
        out = _hf_generate(tm, p, n_new)
        assert np.asarray(gen.tokens[b]).tolist() == out.sequences[0, len(p):].tolist()
        for step in range(n_new):
            # HF step 0 is the prompt pass; its last row is the query of our decode step 0.
            att = torch.stack([a[0, :, -1] for a in out.attentions[step]])  # [L, H, S]
            top = att.topk(k, dim=-1)
            np.testing.assert_allclose(np.asarray(gen.topk_weight[b, step]), top.values.numpy(), atol=1e-5)
            if not windowed:  # HF's sliding-window cache drops old slots, so its indices are shifted
                np.testing.assert_array_equal(np.asarray(gen.topk_index[b, step]), top.indices.numpy())


def test_full_probs_capture_matches_output_attentions(tiny_model_dir):
    d = tiny_model_dir("qwen2")
    tm = load_torch(d)
    cfg, params = load_params(d)
    tok = _tokens(1, 12)
    with torch.no_grad():
        ref = torch.stack(tm(torch.tensor(tok), output_attentions=True).attentions).numpy()  # [L,1,H,T,T]
    _, _, cap = forward(params, cfg, jnp.asarray(tok), _positions(1, 12), capture=CaptureSpec(full_probs=True))
    np.testing.assert_allclose(np.asarray(cap.probs)[..., :12], ref, atol=1e-6)


# --------------------------------------------------------------------------- head masks

MASKED = [(0, 1), (1, 3), (2, 0)]  # (layer, query head)


def _mask(cfg, value=0.0):
    m = np.ones((cfg.num_layers, cfg.num_heads), np.float32)
    for layer, head in MASKED:
        m[layer, head] = value
    return jnp.asarray(m)


def check_zero_mask_equals_zeroed_o_proj_input(d, tok, masked, mask) -> None:
    """A zero head mask equals zeroing the masked heads' slices of o_proj's input in transformers
    (`masked`: (layer, query head) pairs; `mask`: our [L, H] head mask of them)."""
    tm = load_torch(d)
    cfg, params = load_params(d)
    D = cfg.head_dim

    def hook(layer):
        def pre(_module, args):
            x = args[0].clone()
            for l_, h in masked:
                if l_ == layer:
                    x[..., h * D:(h + 1) * D] = 0
            return (x,)
        return pre

    for i, layer in enumerate(tm.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(hook(i))
    with torch.no_grad():
        ref = tm(torch.tensor(tok)).logits.numpy()
    ours, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), head_mask=mask,
                         mask_mode="zero", attn=SMALL)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=_tol(ref), rtol=0)
    unmasked, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), attn=SMALL)
    assert np.abs(np.asarray(unmasked) - ref).max() > 1e-3  # the mask really changes the output


@pytest.mark.parametrize("family", ["llama2", "yi", "mixtral"])
def test_zero_mask_equals_zeroed_o_proj_input(family, tiny_model_dir):
    d = tiny_model_dir(family)
    cfg, _ = load_params(d)
    check_zero_mask_equals_zeroed_o_proj_input(d, _tokens(), MASKED, _mask(cfg))


def _uniform_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the MASKED heads' scores set to 0 before the softmax."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    for layer, head in MASKED:
        if layer == module.layer_idx:
            scores[:, head] = 0
    # transformers passes no mask to custom implementations: build causal (+ sliding window) here
    q_len, k_len = scores.shape[-2:]
    qi = torch.arange(k_len - q_len, k_len)[:, None]
    ki = torch.arange(k_len)[None, :]
    window = getattr(module.config, "sliding_window", None) or k_len + 1
    visible = (ki <= qi) & (qi - ki < window)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.mark.parametrize("family", ["llama2", "yi", "mistral_window"])
def test_uniform_mask_equals_zeroed_scores(family, tiny_model_dir):
    transformers.AttentionInterface.register("rhead_uniform", _uniform_eager)
    d = tiny_model_dir(family)
    tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                           attn_implementation="rhead_uniform").eval()
    cfg, params = load_params(d)
    tok = _tokens()
    with torch.no_grad():
        ref = tm(torch.tensor(tok)).logits.numpy()
    ours, _, _ = forward(params, cfg, jnp.asarray(tok), _positions(*tok.shape), head_mask=_mask(cfg),
                         mask_mode="uniform", attn=SMALL)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=_tol(ref), rtol=0)


def test_fractional_zero_mask_scales_head_output(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("llama2"))
    tok, pos = jnp.asarray(_tokens()), _positions(2, T)
    half, _, _ = forward(params, cfg, tok, pos, head_mask=_mask(cfg, 0.5))
    zero, _, _ = forward(params, cfg, tok, pos, head_mask=_mask(cfg, 0.0))
    one, _, _ = forward(params, cfg, tok, pos, head_mask=_mask(cfg, 1.0))
    assert not np.allclose(half, zero) and not np.allclose(half, one)


def test_head_mask_of_wrong_shape_is_refused(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("yi"))  # GQA: 8 query heads, 2 kv heads
    tok = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match=r"num_query_heads.*\[3, 8\]"):
        forward(params, cfg, tok, _positions(2, T), head_mask=jnp.ones((3, 2)))


def test_generation_decode_mask_only_affects_decode(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("llama2"))
    prompt = [list(_tokens(1, 16)[0])]
    spec = GenerateSpec(max_new_tokens=5, top_k=1)
    plain = greedy_generate(params, cfg, prompt, spec=spec)
    full_mask = jnp.zeros((cfg.num_layers, cfg.num_heads))
    masked = greedy_generate(params, cfg, prompt, spec=spec, decode_mask=full_mask)
    assert not np.array_equal(np.asarray(plain.tokens), np.asarray(masked.tokens))


def test_stop_tokens_end_rows(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("llama2"))
    prompt = [list(_tokens(1, 16)[0])]
    free = greedy_generate(params, cfg, prompt, spec=GenerateSpec(max_new_tokens=6, top_k=1))
    stop = int(free.tokens[0, 2])
    first = int(np.argmax(np.asarray(free.tokens[0]) == stop))
    stopped = greedy_generate(params, cfg, prompt, spec=GenerateSpec(max_new_tokens=6, top_k=1, stop_tokens=(stop,)))
    assert int(stopped.num_tokens[0]) == first + 1
    assert np.all(np.asarray(stopped.tokens[0, first + 1:]) == -1)
    assert np.all(np.asarray(stopped.topk_index[0, first + 1:]) == -1)


def test_leading_stop_tokens_pass_before_the_first_other_token(tiny_model_dir):
    """rhead_jax.plan's rule in the decode loop: a leading stop token ends a row only after a token
    outside the leading set; the row's length equals plan.answer_length over the free tokens."""
    from rhead_jax.plan import answer_length

    cfg, params = load_params(tiny_model_dir("llama2"))
    prompt = [list(_tokens(1, 16)[0])]
    free = np.asarray(greedy_generate(params, cfg, prompt, spec=GenerateSpec(max_new_tokens=8, top_k=1)).tokens[0])
    lead, later = int(free[0]), int(free[3])  # the first token, and one after visible ones
    for stops, leading in [((lead,), (lead,)), ((lead, later), (lead,)), ((lead,), ()), ((later,), (later,))]:
        spec = GenerateSpec(max_new_tokens=8, top_k=1, stop_tokens=stops, leading_stop_tokens=leading)
        got = greedy_generate(params, cfg, prompt, spec=spec)
        n = answer_length(list(free), stops, leading)
        assert int(got.num_tokens[0]) == n, (stops, leading)
        np.testing.assert_array_equal(np.asarray(got.tokens[0, :n]), free[:n])
        assert np.all(np.asarray(got.tokens[0, n:]) == -1)


def test_bf16_forward_close_to_fp32(tiny_model_dir):
    d = tiny_model_dir("llama2")
    cfg, params = load_params(d)
    cfg16, params16 = load_params(d, dtype="bfloat16")
    assert params16["layers"]["q"].dtype == jnp.bfloat16
    tok, pos = jnp.asarray(_tokens()), _positions(2, T)
    ref, _, _ = forward(params, cfg, tok, pos)
    out, _, _ = forward(params16, cfg16, tok, pos, attn=SMALL)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()
    assert (np.argmax(out, -1) == np.argmax(ref, -1)).mean() > 0.8


@pytest.mark.parametrize("T, slots", [
    (1, [0, 5, 11, 12]),          # decode steps: the last row is past the end (dropped)
    (4, [0, 3, 9, 12]),           # prefill runs: the third ends past the end (its tail dropped)
    (4, [10, 12, 8, 0]),          # runs that start in the last tile, or past the end
    (12, [0, 1, 0, 6]),           # as wide as the cache
    (16, [0, 2, 0, 0]),           # wider than the cache: the scatter form
])
@pytest.mark.parametrize("B", [1, 4])
def test_write_rows_is_the_dropping_scatter(T, slots, B):
    """cache.write_rows (a select per decode step, dynamic_update_slice for one row, the scatter
    for several) writes exactly what the scatter `buf.at[i, b, :, slots[b] + t].set(new[b, t],
    mode="drop")` wrote, old slots kept."""
    from rhead_jax.models.cache import write_rows

    L, K, S, D = 3, 2, 12, 5
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.normal(size=(L, B, K, S, D)), jnp.bfloat16)
    new = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    for row_slots in ([slots] if B == 4 else [[s] for s in slots]):
        sl = jnp.asarray(row_slots, jnp.int32)
        for i in range(L):
            at = sl[:, None] + jnp.arange(T)[None]
            want = buf.at[i, jnp.arange(B)[:, None], :, at].set(new.astype(buf.dtype), mode="drop")
            got = jax.jit(write_rows)(buf, new, jnp.int32(i), sl)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("masses", [(), ("span",)])
def test_prefill_block_in_place_is_take_and_put(masses, tiny_model_dir):
    """A row block's prefill call written where the rows lie (CPU's `in_place`, decoder.forward's
    `row`) leaves the cache, and the block's attention masses, bit-identical to taking the block's
    cache out, prefilling it and putting it back."""
    from rhead_jax.models.attention import mass_targets
    from rhead_jax.models.generate import prefill_block_impl

    cfg, params = load_params(tiny_model_dir("llama2"))
    spec = GenerateSpec(attn=SMALL, prefill_masses=masses)
    cache = init_cache(cfg, 3, 32)
    rng = np.random.default_rng(0)
    targets = mass_targets(1, 1, span=[[2, 9]], queries=[[0, 40]]) if masses else None
    for j, held in ((1, 0), (2, 0), (1, 13), (0, 0)):   # rows 1 and 2, row 1 again after its first call
        tok = jnp.asarray(rng.integers(0, 97, (1, 16)), jnp.int32)
        n = 16 if held == 0 else 10                        # the second call: 6 padding tokens
        pos = jnp.where(jnp.arange(16) < n, held + jnp.arange(16), -1)[None].astype(jnp.int32)
        run = lambda c, in_place: jax.jit(partial(prefill_block_impl, cfg=cfg, spec=spec, data=1,  # noqa: E731
                                                  in_place=in_place))(params, c, jnp.int32(j), tok, pos, None, targets)
        moved, placed = run(cache, False), run(cache, True)
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(placed)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        cache = placed[0] if masses else placed
    assert np.asarray(cache.length).tolist() == [16, 26, 16]


def test_decode_score_forms_agree():
    """A decode step's two score forms (cache on the left: CPU; query on the left: TPU) give the same
    attention up to float rounding, masks and uniform-mask scaling included."""
    from rhead_jax.models.attention import NO_WINDOW, dense_attention

    B, K, G, S, D = 3, 2, 4, 96, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (B, 1, K, G, D))
    k, v = jax.random.normal(ks[1], (B, K, S, D)), jax.random.normal(ks[2], (B, K, S, D))
    k_pos = jnp.where(jnp.arange(S)[None] < jnp.array([[40], [95], [7]]), jnp.arange(S)[None], -1)
    q_pos = jnp.array([[39], [94], [6]])
    scale_kg = jax.random.uniform(ks[3], (K, G))
    for window, score_scale in [(NO_WINDOW, None), (16, scale_kg)]:
        a = dense_attention(q, k, v, q_pos, k_pos, window=window, scale=0.25, score_scale=score_scale)
        b = dense_attention(q, k, v, q_pos, k_pos, window=window, scale=0.25, score_scale=score_scale,
                            cache_left=False)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-7)
        assert (jnp.argmax(a[1], -1) == jnp.argmax(b[1], -1)).all()
