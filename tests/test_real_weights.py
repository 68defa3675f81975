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
