"""The model layer: Llama-like decoders as pure functions of (params, inputs), no torch.

Read in this order:
1. `config.py`: `ModelConfig`, one keyword-only dataclass read from a Hugging Face `config.json`
   (Llama-2/3, Mistral, Mixtral, Yi, Qwen1.5/2/3, SmolLM2, Gemma 1/2/3).
2. `decoder.py`: the parameter tree (`Decoder`, `init_params`) and `forward(params, cfg, tokens,
   positions, cache, ...)`, the layers under `lax.scan`; `cache.py` the KV cache (`KVCache`,
   `init_cache`; a ring per local layer for windowed models) and what a pass captures
   (`CaptureSpec`); `layers.py` a layer's pieces (norms, MLP, embedding, attention's projections,
   logits); `windowed.py` the layer scan over a windowed cache.
3. `attention.py`: the one attention (GQA over the cache, dense and chunked paths, head masks,
   top-k capture); `rope.py` its rotary tables; `kernels.py` the same prefill through JAX's kernels
   (splash on TPU, cuDNN on GPU).
4. `generate.py`: prefill and the greedy decode loop as one jitted program, capturing each head's
   top-k attended positions at every step (the copy score's input).
5. `mixed.py`: a mixed KV cache (full heads + streaming sink/recent heads) for rhead_jax.mixedkv.

Nothing here imports rhead_jax above `errors` (tests/test_layers.py).
"""
