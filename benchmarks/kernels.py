"""The sweep's two kernels against this machine's limits, measured in one process:

  prefill   one chunked prefill call on real SmolLM2 weights (fp32), achieved FLOP/s as a share of
            the jax fp32 matmul peak measured here (a square matmul, best of N);
  decode    one decode step (T = 1, top-1 capture of every head, as the sweep runs it) against
            (weight bytes + KV bytes read) / the memory bandwidth measured here (a large copy),
            against the time to read the weights once (`x W read`: the M = 1 read floor), and
            against the batch-1 step (`x M=1`: what a row more per step costs);
  layout    small-M matmuls with the model's weight shapes in both layouts, `x @ W` (W as
            [K, N], the decoder's) and `einsum('mk,nk->mn')` (W as [N, K]): which one XLA:CPU
            runs faster at the sweep's batch sizes (`--layouts`).

    python -m benchmarks.kernels                       # batch 1, 3, 8; prefill 2048 tokens
    python -m benchmarks.kernels --batches 3 --tokens 2048 --context 2048
    python -m benchmarks.kernels --batches 1,3,9 --no_prefill   # decode steps only

The sweep's default batch size comes from these figures (README, "Performance").
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def best_of(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of one jitted [n, n] x [n, n] matmul."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / best_of(lambda: f(a, b), repeats)


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (bytes/s): the faster of a jitted sum over a large array and a matrix-vector
    product with it (what a decode step does to the weights)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2 ** 20 // 4 // 4096, 4096), jnp.float32)
    v = jnp.ones((4096,), jnp.float32)
    total = jax.jit(lambda x: x.sum())
    matvec = jax.jit(lambda x, v: x @ v)
    return x.nbytes / min(best_of(lambda: total(x), repeats), best_of(lambda: matvec(x, v), repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,3,8")
    ap.add_argument("--tokens", type=int, default=2048, help="prefill tokens per row")
    ap.add_argument("--context", type=int, default=2048, help="cache length of the decode step")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (config.sweep.prefill_chunk)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", action="store_true", help="also time small-M matmuls in both weight layouts")
    ap.add_argument("--no_prefill", action="store_true", help="time the decode steps only")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rhead_jax.checkpoints import load_model
    from rhead_jax.config import default_config
    from rhead_jax.models.attention import AttentionOptions
    from rhead_jax.models.cache import CaptureSpec, init_cache
    from rhead_jax.models.decoder import forward
    from rhead_jax.models.generate import cache_slots, prefill

    c = default_config().sweep
    attn = AttentionOptions.for_platform(jax.devices()[0].platform, c.attention, q_chunk=c.q_chunk, k_chunk=c.k_chunk)
    model = load_model("default")
    cfg, params = model.cfg, model.params
    leaves = jax.tree.leaves(params)
    n_params = sum(x.size for x in leaves)
    weight_bytes = sum(x.nbytes for x in leaves)
    n_matmul = n_params - params["embed"].size  # prefill skips the vocab projection (logits="none")
    peak = matmul_peak()
    bw = memory_bandwidth()
    print(f"machine: jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, memory bandwidth {bw / 1e9:.1f} GB/s")
    print(f"model: {model.name}, {n_params / 1e6:.1f}M params ({weight_bytes / 2 ** 20:.0f} MiB fp32)")

    T, S = args.tokens, args.context
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    batches = [int(b) for b in args.batches.split(",")]
    batches = batches if 1 in batches else [1, *batches]   # the M=1 step is every row's yardstick
    one_row = None
    w_read = weight_bytes / bw
    print(f"\ndecode: {S}-token context, the weights read once in {1e3 * w_read:.1f} ms (the M = 1 read floor)")
    print(f"{'batch':>5} {'prefill s':>10} {'GFLOP/s':>8} {'of peak':>8} {'decode ms':>10} {'floor ms':>9} "
          f"{'x floor':>8} {'x W read':>9} {'x M=1':>6} {'ms/row':>7}")
    for B in batches:
        size = cache_slots(T + 64, attn)
        toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        flops = 2 * n_matmul * B * T + 2 * 2 * L * H * D * B * T * (T + 1) / 2  # projections + causal attention
        if args.no_prefill:
            t_pre = float("nan")
        else:
            pf = jax.jit(lambda p, t, q, cache: prefill(p, cfg, t, q, cache, chunk=args.chunk, attn=attn))
            cache0 = init_cache(cfg, B, size)
            t_pre = best_of(lambda: pf(params, toks, pos, cache0), args.repeats)
        # one decode step at context S: all weights (incl. the vocab projection) + the KV cache read
        ds = cache_slots(S + 64, attn)
        dcache = init_cache(cfg, B, ds)
        dcache = dcache.replace(pos=jnp.where(jnp.arange(ds)[None] < S, jnp.arange(ds)[None], -1).astype(jnp.int32)
                                * jnp.ones((B, 1), jnp.int32), length=jnp.full((B,), S, jnp.int32))
        # as the engine's decode loop runs it: the cache donated and carried (written in place)
        step = jax.jit(lambda p, t, q, cache: forward(p, cfg, t, q, cache, capture=CaptureSpec(top_k=1),
                                                      logits="all", attn=attn)[:2], donate_argnums=(3,))
        tok1 = toks[:, :1]
        pos1 = jnp.full((B, 1), S, jnp.int32)
        state = {"cache": dcache}

        def one_step():
            logits, state["cache"] = step(params, tok1, pos1, state["cache"])
            return logits

        t_dec = best_of(one_step, args.repeats * 3)
        one_row = one_row or t_dec
        kv_bytes = 2 * L * B * cfg.num_kv_heads * ds * D * 4
        floor = (weight_bytes + kv_bytes) / bw
        print(f"{B:>5} {t_pre:10.2f} {flops / t_pre / 1e9:8.1f} {flops / t_pre / peak:7.0%} {1e3 * t_dec:10.1f} "
              f"{1e3 * floor:9.1f} {t_dec / floor:7.2f}x {t_dec / w_read:8.2f}x {t_dec / one_row:5.2f}x "
              f"{1e3 * t_dec / B:7.1f}")
    if args.layouts:
        layouts(cfg, batches, args.repeats, bw)
    return 0


def layouts(cfg, batches, repeats: int, bw: float) -> None:
    """Small-M matmuls [M, K] x W for the decoder's weight shapes, W as [K, N] (`x @ W`) and as
    [N, K] (`einsum('mk,nk->mn')`), against the time to read W once at the measured bandwidth."""
    import jax
    import jax.numpy as jnp

    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"mlp up [d, f]": (d, f), "mlp down [f, d]": (f, d), "vocab [d, V]": (d, v)}
    kn = jax.jit(lambda x, w: x @ w)
    nk = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))
    print(f"\n{'weight':>16} {'M':>3} {'x @ W ms':>9} {'einsum nk ms':>13} {'read W ms':>10}")
    for name, (K, N) in shapes.items():
        w = jax.random.normal(jax.random.PRNGKey(0), (K, N), jnp.float32)
        wt = jnp.asarray(w.T)
        for M in batches:
            x = jax.random.normal(jax.random.PRNGKey(1), (M, K), jnp.float32)
            a = best_of(lambda: kn(x, w), repeats * 5)
            b = best_of(lambda: nk(x, wt), repeats * 5)
            print(f"{name:>16} {M:>3} {1e3 * a:9.3f} {1e3 * b:13.3f} {1e3 * w.nbytes / bw:10.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
