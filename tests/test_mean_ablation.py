"""The mean ablations (config.mask.mode "mean_query", LOCOS's, and "mean_output") and their
calibration against transformers PyTorch (fp32, eager) with hooks on q_proj / o_proj."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.cache import CaptureSpec
from rhead_jax.models.decoder import forward
from tests.hf_tiny import load_torch

SMALL = AttentionOptions(q_chunk=8, k_chunk=8)
MASKED = [(0, 1), (2, 3), (2, 0)]


def _torch_head_inputs(model, seqs):
    """Per layer: q_proj's outputs [N, H, D] and o_proj's inputs [N, H, D] over every token of seqs."""
    cfg = model.config
    H = cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    got = {"q": [[] for _ in model.model.layers], "o": [[] for _ in model.model.layers]}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(
            lambda m, a, out, l=l: got["q"][l].append(out.reshape(-1, H, D))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: got["o"][l].append(a[0].reshape(-1, H, D))))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    return {k: [torch.cat(v) for v in vs] for k, vs in got.items()}


def _torch_logits_with_means(model, seq, where: str, means):
    """Logits with the MASKED heads' q_proj output ("q") or o_proj input ("o") replaced by means [L, H, D]."""
    H = model.config.num_attention_heads
    hooks = []
    for l, layer in enumerate(model.model.layers):
        heads = [h for ll, h in MASKED if ll == l]

        def put(x, l=l, heads=heads):
            x = x.clone().reshape(*x.shape[:-1], H, -1)
            for h in heads:
                x[..., h, :] = torch.as_tensor(means[l, h])
            return x.reshape(*x.shape[:-2], -1)

        if where == "q":
            hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, put=put: put(out)))
        else:
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, put=put: (put(a[0]),)))
    with torch.no_grad():
        out = model(torch.tensor([seq])).logits[0].numpy()
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])   # q/k/v biases; q-norm (the mean goes in before it)
def test_mean_ablations_match_pytorch(family, tiny_model_dir):
    d = tiny_model_dir(family)
    cfg, params = load_params(d)
    model = load_torch(d)
    rng = np.random.RandomState(0)
    seqs = [rng.randint(0, 97, 19).tolist(), rng.randint(0, 97, 12).tolist()]
    ref = _torch_head_inputs(model, seqs)
    # calibration: CaptureSpec.head_sums over both rows (padding at the end, position -1, not counted)
    tok = np.zeros((2, 19), np.int32)
    pos = np.full((2, 19), -1, np.int32)
    for b, s in enumerate(seqs):
        tok[b, :len(s)], pos[b, :len(s)] = s, np.arange(len(s))
    caps = forward(params, cfg, jnp.asarray(tok), jnp.asarray(pos), capture=CaptureSpec(head_sums=True),
                   logits="none", attn=SMALL)[2]
    n = sum(map(len, seqs))
    means = {}
    for key, got in (("q", caps.q_sum), ("o", caps.out_sum)):
        want = np.stack([r.mean(0).numpy() for r in ref[key]])               # [L, H, D]
        means[key] = np.asarray(got).sum(1) / n
        np.testing.assert_allclose(means[key], want, rtol=1e-4, atol=1e-5)
    # masking: the masked heads' query / output replaced by those means, against hooks on the torch model
    L, H = cfg.num_layers, cfg.num_heads
    seq = seqs[0]
    for mode, key in (("mean_query", "q"), ("mean_output", "o")):
        mask = np.ones((L, H, 1 + cfg.head_dim), np.float32)
        mask[..., 1:] = means[key]
        for l, h in MASKED:
            mask[l, h, 0] = 0.0
        want = _torch_logits_with_means(model, seq, key, means[key])
        logits = forward(params, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None], head_mask=jnp.asarray(mask),
                         mask_mode=mode, attn=SMALL)[0]
        plain = forward(params, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None], attn=SMALL)[0]
        assert np.abs(np.asarray(plain)[0] - want).max() > 1e-2, mode                 # the mask changes something
        np.testing.assert_allclose(np.asarray(logits)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        # one decode step after a prefill (the dense path) masks the same way
        from rhead_jax.models.cache import init_cache
        cache = init_cache(cfg, 1, 24)
        _, cache, _ = forward(params, cfg, jnp.asarray([seq[:-1]]), jnp.arange(len(seq) - 1)[None], cache,
                              head_mask=jnp.asarray(mask), mask_mode=mode, attn=SMALL, logits="none")
        step = forward(params, cfg, jnp.asarray([seq[-1:]]), jnp.asarray([[len(seq) - 1]]), cache,
                       head_mask=jnp.asarray(mask), mask_mode=mode, attn=SMALL)[0]
        np.testing.assert_allclose(np.asarray(step)[0, 0], want[-1], rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mean_modes_need_the_means(tiny_model_dir):
    cfg, params = load_params(tiny_model_dir("llama2"))
    tok = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="mean modes"):
        forward(params, cfg, tok, jnp.arange(3)[None], head_mask=jnp.ones((cfg.num_layers, cfg.num_heads)),
                mask_mode="mean_query")
    with pytest.raises(ValueError, match="expected"):
        forward(params, cfg, tok, jnp.arange(3)[None], mask_mode="zero",
                head_mask=jnp.ones((cfg.num_layers, cfg.num_heads, 1 + cfg.head_dim)))
