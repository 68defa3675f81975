"""The logit-contribution scores (LOCOS's score, DLA, attention spatial) of each decode step against a
straightforward PyTorch computation (transformers fp32, eager attention) on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.decoder import LOGIT_TERMS
from rhead_jax.models.generate import GenerateSpec, greedy_generate
from tests.hf_tiny import load_torch


def torch_logit_terms(model, prompt: list[int], generated: list[int], span: tuple[int, int], window=None):
    """[N, L, H, 3] (logit, dla, spatial) of each decode step, LOCOS's loop written out: the step's
    attention row and the values from a forward over prompt + generated[:-1], per key
    phi_j = alpha_j * u[y] . (W_O[h] v_j), needle = span, others = the other visible keys."""
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    seq = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        out = model(seq, output_attentions=True, output_hidden_states=True)
        layers = model.model.layers   # each layer's values v_proj(input_layernorm(its input)) [K, T, D]
        values = [l.self_attn.v_proj(l.input_layernorm(h))[0].reshape(seq.shape[1], K, D).transpose(0, 1)
                  for l, h in zip(layers, out.hidden_states)]
    W_Os = [layer.self_attn.o_proj.weight.detach() for layer in model.model.layers]
    W_U = model.get_output_embeddings().weight.detach()                               # [V, d] (tied: the embedding)
    P, (s0, s1) = len(prompt), span
    res = np.zeros((len(generated), cfg.num_hidden_layers, H, 3))
    for t, y in enumerate(generated):
        q = P - 1 + t                                                     # the query of step t
        keys = torch.arange(q + 1)
        vis = keys > q - window if window else torch.ones(q + 1, dtype=torch.bool)
        needle = vis & (keys >= s0) & (keys < s1)
        other = vis & ~needle
        for l in range(cfg.num_hidden_layers):
            alpha = out.attentions[l][0, :, q, :q + 1]                     # [H, q + 1]
            V = values[l][:, :q + 1].repeat_interleave(H // K, 0)  # [H, q + 1, D]
            W_O = W_Os[l].reshape(-1, H, D).permute(1, 2, 0)               # [H, D, d]
            g = torch.einsum("hde,e->hd", W_O, W_U[y])
            phi = alpha * torch.einsum("hkd,hd->hk", V, g)
            ratio = needle.sum() / other.sum()
            res[t, l, :, 0] = (phi[:, needle].sum(-1) - phi[:, other].sum(-1) * ratio).numpy()
            res[t, l, :, 1] = phi.sum(-1).numpy()
            res[t, l, :, 2] = (alpha[:, needle].sum(-1) - alpha[:, other].sum(-1) * ratio).numpy()
    return res


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "mistral_window"])
def test_logit_terms_match_pytorch(family, tiny_model_dir):
    """Tied (SmolLM2-like) and untied embeddings, q/k/v biases, a sliding window (the key counts
    are the visible keys): every step, layer and head to fp32 rounding."""
    d = tiny_model_dir(family)
    cfg, params = load_params(d)
    model = load_torch(d)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 97, 21).tolist(), rng.randint(0, 97, 14).tolist()]
    spans = np.array([[12, 19], [2, 12]], np.int32)   # both reach into the window (5) of the last keys
    spec = GenerateSpec(max_new_tokens=4, top_k=0, decode_outputs=True, attn=AttentionOptions(q_chunk=8, k_chunk=8))
    gen = greedy_generate(params, cfg, prompts, spec=spec, output_span=spans)
    terms = np.asarray(gen.logit_terms)
    assert terms.shape == (2, 4, cfg.num_layers, cfg.num_heads, len(LOGIT_TERMS))
    for b, prompt in enumerate(prompts):
        generated = np.asarray(gen.tokens[b]).tolist()
        ref = torch_logit_terms(model, prompt, generated, tuple(spans[b]), window=cfg.sliding_window and 5)
        scale = np.abs(ref).max(axis=(0, 1, 2))
        assert (scale > 1e-3).all()                                       # not trivially zero
        np.testing.assert_allclose(terms[b], ref, rtol=1e-4, atol=1e-5 * scale.max())


def test_span_outputs_need_a_span_and_one_token(tiny_model_dir):
    import jax.numpy as jnp

    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward

    cfg, params = load_params(tiny_model_dir("llama2"))
    tok = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="span_outputs needs"):
        forward(params, cfg, tok, jnp.arange(3)[None], capture=CaptureSpec(span_outputs=True),
                output_span=jnp.array([[0, 1]]))
    with pytest.raises(ValueError, match="span_outputs needs"):
        forward(params, cfg, tok[:, :1], jnp.zeros((1, 1), jnp.int32), capture=CaptureSpec(span_outputs=True))
