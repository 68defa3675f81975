"""SmolLM2-135M-Instruct real weights (the embedded default): our loader + decoder vs transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
import jax.numpy as jnp

from rhead_jax.checkpoints.gguf_import import default_model_dir
from rhead_jax.checkpoints.hf import load_params
from rhead_jax.models.decoder import forward
from rhead_jax.models.generate import GenerateSpec, greedy_generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    d = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    cfg, params = load_params(d)
    return tok, tm, cfg, params


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_logits_match_transformers(smollm2):
    tok, tm, cfg, params = smollm2
    ids = _chat(tok, "Name three colours of the rainbow.")
    with torch.no_grad():
        ref = tm(torch.tensor([ids])).logits.numpy()
    ours, _, _ = forward(params, cfg, jnp.asarray([ids]), jnp.arange(len(ids))[None])
    # fp32 on both sides from the same dequantized weights: only summation order differs
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-3 * np.abs(ref).max()


def test_greedy_continuation_matches_transformers(smollm2):
    tok, tm, cfg, params = smollm2
    ids = _chat(tok, "What is the capital of France?")
    n = 12
    with torch.no_grad():
        ref = tm.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    spec = GenerateSpec(max_new_tokens=n, top_k=1, stop_tokens=(tok.eos_token_id,))
    gen = greedy_generate(params, cfg, [ids], spec=spec)
    ours = np.asarray(gen.tokens[0, :int(gen.num_tokens[0])]).tolist()
    assert ours == ref
    assert "Paris" in tok.decode(ours)


def test_logit_scores_match_a_pytorch_loop(smollm2):
    """LOCOS's logit / dla / spatial terms of every decode step on three needle tests (SmolLM2's chat
    prompt, the bundled needles, 500 tokens, depths 0/50/100) against the PyTorch loop of
    tests/test_logit_scores.py on the same generated tokens and the needle's tokens."""
    from rhead_jax.needle.grid import build_grid
    from rhead_jax.needle.haystack import load_haystack, load_needles
    from tests.test_logit_scores import torch_logit_terms

    tok, tm, cfg, params = smollm2
    insts = build_grid(tok, load_haystack(), load_needles(), [500], [0, 50, 100], chat=True)[::4][:3]
    spans = np.array([i.needle_span for i in insts], np.int32)
    spec = GenerateSpec(max_new_tokens=6, top_k=0, decode_outputs=True)
    gen = greedy_generate(params, cfg, [i.prompt_ids.tolist() for i in insts], spec=spec, output_span=spans)
    for b, inst in enumerate(insts):
        ref = torch_logit_terms(tm, inst.prompt_ids.tolist(), np.asarray(gen.tokens[b]).tolist(), inst.needle_span)
        got = np.asarray(gen.logit_terms[b])
        assert got.shape == ref.shape and np.abs(ref[..., 0]).max() > 0.1
        for i in range(3):   # fp32 both sides; summation order differs, so relative to each term's largest
            np.testing.assert_allclose(got[..., i], ref[..., i], rtol=2e-3, atol=2e-3 * np.abs(ref[..., i]).max())
