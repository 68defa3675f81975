"""The sweep's two kernels against this machine's limits, measured in one process:

  prefill   one chunked prefill call on real SmolLM2 weights (fp32), achieved FLOP/s as a share of
            the jax fp32 matmul peak measured here (a square matmul, best of N);
  decode    one decode step (T = 1, top-1 capture of every head, as the sweep runs it) against
            (weight bytes + KV bytes read) / the memory bandwidth measured here (a large copy),
            against the time to read the weights once (`x W read`: the M = 1 read floor), and
            against the batch-1 step (`x M=1`: what a row more per step costs);
  copies    the decode loop as the engine compiles it (models.generate.decode_impl, the cache
            donated): its optimized HLO's per-layer copies (the `lax.scan` over the stacked layers
            copies each layer's weights and KV cache out of the stacked arrays for the library
            dots), in MiB per step against the weights and the cache, and its ms per step
            against the single forward step above (`--copies`);
  breakdown one decode step without each of its parts, in CPU ms of this process (steadier than
            wall time on a shared machine): the LM head (logits="none"), the top-1 capture
            (top_k=0), the KV cache (a 64-slot cache: what is left is the weights' part), so the
            step's time splits into layers' weights, LM head, KV attention and capture
            (`--breakdown`);
  profile   the same decode loop traced with jax.profiler at each --shapes B x S: XLA:CPU's
            thread time a step by kind of op (weight copies out of the scan's stacked arrays, the
            weight matmuls, KV copies, attention, LM head, runtime), against reading the weights
            and the cache once (`--profile`);
  layout    small-M matmuls with the model's weight shapes in both layouts, `x @ W` (W as
            [K, N], the decoder's) and `einsum('mk,nk->mn')` (W as [N, K]): which one XLA:CPU
            runs faster at the sweep's batch sizes (`--layouts`).

    python -m benchmarks.kernels                       # batch 1, 3, 8; prefill 2048 tokens
    python -m benchmarks.kernels --batches 3 --tokens 2048 --context 2048
    python -m benchmarks.kernels --batches 1,3,9 --no_prefill   # decode steps only
    python -m benchmarks.kernels --batches 1,3,9 --no_prefill --copies   # + the decode loop's copies
    python -m benchmarks.kernels --no_prefill --breakdown --shapes 9x576,5x1088,3x2112   # the sweep's steps
    python -m benchmarks.kernels --batches 1 --no_prefill --profile   # where a step's time goes, by op

The sweep's default batch size comes from these figures (README, "Performance").
"""
from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import int_items  # noqa: E402  (no jax import)


def best_of(fn, repeats: int, clock=time.perf_counter) -> float:
    """The best of `repeats` timed calls of fn (after one call that compiles and warms up), in
    seconds of `clock`: wall time, or time.process_time for CPU seconds of this process."""
    import jax

    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - t0)
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
    ap.add_argument("--breakdown", action="store_true",
                    help="also split decode steps into weights, LM head, KV attention and capture (CPU ms)")
    ap.add_argument("--shapes", default="9x576,5x1088,3x2112",
                    help="BxS decode steps of --breakdown (default: the SmolLM2 sweep's batches on the KJV haystack)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the decode loop at --shapes: XLA:CPU thread time a step by kind of op")
    ap.add_argument("--copies", action="store_true",
                    help="also compile the decode loop and print its per-step copies and ms per step")
    args = ap.parse_args()
    batches = int_items(args.batches, "--batches")
    shapes = int_items(args.shapes, "--shapes", sep="x", parts=(2,),
                       form="comma-separated BxS pairs, e.g. 9x576,3x2112")

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
    batches = batches if 1 in batches else [1, *batches]   # the M=1 step is every row's yardstick
    one_row = None
    steps = {}
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
        dcache, ds = held_cache(cfg, B, S, attn)
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
        steps[B] = t_dec
        one_row = one_row or t_dec
        kv_bytes = 2 * L * B * cfg.num_kv_heads * ds * D * 4
        floor = (weight_bytes + kv_bytes) / bw
        print(f"{B:>5} {t_pre:10.2f} {flops / t_pre / 1e9:8.1f} {flops / t_pre / peak:7.0%} {1e3 * t_dec:10.1f} "
              f"{1e3 * floor:9.1f} {t_dec / floor:7.2f}x {t_dec / w_read:8.2f}x {t_dec / one_row:5.2f}x "
              f"{1e3 * t_dec / B:7.1f}")
    if args.breakdown:
        breakdown(cfg, params, attn, shapes, args.repeats)
    if args.copies:
        copies(cfg, params, attn, batches, S, steps, args.repeats)
    if args.profile:
        profile_decode(cfg, params, attn, shapes, bw)
    if args.layouts:
        layouts(cfg, batches, args.repeats, bw)
    return 0


def held_cache(cfg, B: int, n: int, attn):
    """A zeroed [B]-row cache of `cache_slots(n + 64)` slots whose rows hold n tokens each (slot =
    position < n), as a decode step at context n finds it: (cache, its slots)."""
    import jax.numpy as jnp

    from rhead_jax.models.cache import init_cache
    from rhead_jax.models.generate import cache_slots

    ds = cache_slots(n + 64, attn)
    slot = jnp.arange(ds)[None]
    cache = init_cache(cfg, B, ds).replace(
        pos=jnp.where(slot < n, slot, -1).astype(jnp.int32) * jnp.ones((B, 1), jnp.int32),
        length=jnp.full((B,), n, jnp.int32))
    return cache, ds


def _copy_bytes(hlo: str, num_layers: int) -> dict[str, int]:
    """Bytes one decode step copies, from the optimized HLO text of the decode loop: the kLoop
    fusions that only slice (a dynamic slice, maybe bitcast: the copy XLA:CPU makes of an operand
    it hands to a library dot) and the plain `copy` ops, by what they copy. A fusion slicing an
    [L, ...] operand runs once per layer (the layer scan's body), so its bytes count L times."""
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1}

    def nbytes(shape: str) -> int:
        m = re.match(r"(\w+)\[([\d,]*)\]", shape)
        n = 1
        for dim in filter(None, m.group(2).split(",")):
            n *= int(dim)
        return n * sizes.get(m.group(1), 4)

    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \((.*?)\) -> ", hlo, re.M)}
    only_slices = {}
    for m in re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S):
        ops = re.findall(r"= \S+ ([\w-]+)\(", m.group(2))
        if "dynamic-slice" in ops and set(ops) <= {"parameter", "constant", "bitcast", "dynamic-slice", "copy"}:
            only_slices[m.group(1)] = bodies.get(m.group(1), "")
    out = {"weights": 0, "kv cache": 0, "other": 0}
    for m in re.finditer(r"= (\w+\[[\d,]*\])\S* (fusion|copy)\((.*?)\)(.*)$", hlo, re.M):
        shape, op, rest = m.group(1), m.group(2), m.group(4)
        if op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if not called or called.group(1) not in only_slices:
                continue
            src = re.search(r"\w+\[([\d,]*)\]", only_slices[called.group(1)]).group(1).split(",")
            kind = "kv cache" if len(src) == 5 else "weights"
            out[kind] += nbytes(shape) * (num_layers if src[0] == str(num_layers) else 1)
        elif nbytes(shape) >= 2 ** 16:
            out["other"] += nbytes(shape)
    return out


def cpu_best_of(fn, repeats: int) -> float:
    """Like best_of, in CPU seconds of this process (all its threads)."""
    return best_of(fn, repeats, clock=time.process_time)


def breakdown(cfg, params, attn, shapes, repeats: int) -> None:
    """Decode steps (B rows, S cached tokens; the forward step of `main`) without each part, in
    CPU ms (best of 3 * repeats, the variants interleaved twice): the parts are the differences."""
    import jax
    import jax.numpy as jnp

    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward

    variants = {"step": ("all", 1, True), "no LM head": ("none", 1, True), "no capture": ("all", 0, True),
                "no KV": ("all", 1, False)}
    print(f"\ndecode step breakdown (CPU ms of this process; parts = the step without them subtracted)")
    print(f"{'B x S':>10} {'step':>7} {'weights':>8} {'LM head':>8} {'KV attn':>8} {'capture':>8}")
    for B, S in shapes:
        got = {}
        for _ in range(2):
            for name, (logits, k, kv) in variants.items():
                n = S if kv else 0
                cache, _ = held_cache(cfg, B, n, attn)
                step = jax.jit(lambda p, t, q, c, logits=logits, k=k: forward(
                    p, cfg, t, q, c, capture=CaptureSpec(top_k=k), logits=logits, attn=attn)[1], donate_argnums=(3,))
                tok, pos, state = jnp.zeros((B, 1), jnp.int32), jnp.full((B, 1), n, jnp.int32), {"c": cache}

                def one():
                    state["c"] = step(params, tok, pos, state["c"])
                    return state["c"].k

                got[name] = min(got.get(name, float("inf")), cpu_best_of(one, 3 * repeats))
        t = got["step"]
        print(f"{f'{B} x {S}':>10} {1e3 * t:7.1f} {1e3 * (got['no KV'] - (t - got['no LM head'])):8.1f} "
              f"{1e3 * (t - got['no LM head']):8.1f} {1e3 * (t - got['no KV']):8.1f} {1e3 * (t - got['no capture']):8.1f}")


def decode_loop(cfg, params, attn, B: int, S: int, n_steps: int):
    """The decode loop (models.generate.decode_impl) compiled as the runner compiles it (its CPU
    compiler options, the cache donated) for B rows on S cached tokens, n_steps steps, no stop
    tokens: (compiled loop, compile seconds, fresh() -> a new cache holding S tokens a row, its
    slots, the loop's other arguments (first token, prompt lengths))."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from rhead_jax.models.generate import GenerateSpec, decode_impl
    from rhead_jax.runner import CPU_COMPILER_OPTIONS

    spec = GenerateSpec(max_new_tokens=n_steps, top_k=1, attn=attn)
    cache, ds = held_cache(cfg, B, S, attn)
    args = (jnp.zeros((B,), jnp.int32), jnp.full((B,), S + 1, jnp.int32))
    t0 = time.perf_counter()
    loop = jax.jit(partial(decode_impl, cfg=cfg, spec=spec), donate_argnums=(3,),
                   compiler_options=CPU_COMPILER_OPTIONS).lower(params, *args, cache, None).compile()
    return loop, time.perf_counter() - t0, lambda: held_cache(cfg, B, S, attn)[0], ds, args


def copies(cfg, params, attn, batches, S: int, steps: dict, repeats: int, n_steps: int = 16) -> None:
    """The decode loop (`decode_loop`: as the runner compiles it) at each batch: what its optimized
    HLO copies per step (`_copy_bytes`; `x read`: those bytes over the weights' and the cache's,
    what the step must read), and its ms per step (best loop of n_steps, no stop tokens) against
    the single forward step (`steps`, s)."""
    import jax

    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"\ndecode loop ({n_steps} steps, {S}-token context): per-step copies in its optimized HLO "
          f"(layer weights {layer_bytes / 2 ** 20:.0f} MiB)")
    print(f"{'batch':>5} {'compile s':>9} {'weights MiB':>11} {'KV MiB':>7} {'of KV':>6} {'other MiB':>9} "
          f"{'x read':>7} {'loop ms/step':>12} {'x forward':>9}")
    for B in batches:
        loop, t_compile, fresh, ds, (first, lens) = decode_loop(cfg, params, attn, B, S, n_steps)
        got = _copy_bytes(loop.as_text(), cfg.num_layers)
        kv = 2 * cfg.num_layers * B * cfg.num_kv_heads * ds * cfg.head_dim * 4
        best = float("inf")
        for _ in range(repeats):
            cache = jax.block_until_ready(fresh())
            t0 = time.perf_counter()
            jax.block_until_ready(loop(params, first, lens, cache, None)[0])
            best = min(best, (time.perf_counter() - t0) / n_steps)
        moved = got["weights"] + got["kv cache"] + got["other"]
        print(f"{B:>5} {t_compile:9.1f} {got['weights'] / 2 ** 20:11.0f} {got['kv cache'] / 2 ** 20:7.0f} "
              f"{got['kv cache'] / kv:5.0%} {got['other'] / 2 ** 20:9.1f} {moved / (weight_bytes + kv):6.2f}x "
              f"{1e3 * best:12.1f} {best / steps[B]:8.2f}x")


def decode_kind(name: str, op: str) -> str:
    """The decode profile's row of one XLA:CPU thunk (its HLO name and op_name)."""
    if name.startswith(("ThunkExecutor", "Slinky")):
        return "runtime: thunk executor, thread-pool waits"
    if "dynamic_slice" in op:   # a kLoop fusion that only slices: the copy made for a library dot
        return ("layer weights copied out of the stacked arrays (the scan)" if "dynamic_index_in_dim" in op
                else "KV cache copied out (each layer's K and V)")
    if "dot_general" in op and any(e in op for e in ("btd,d", "btf,fd", "btj,jm")):
        return "weight matmuls (q, k, v, o, gate, up, down)"
    if "dot_general" in op and "closed_call" not in op:
        return "LM head (tied embedding)"
    if "dot_general" in op:
        return "attention matmuls (scores, values)"
    if "scatter" in name or "scatter" in op:
        return "cache writes"
    if any(e in op for e in ("top_k", "reduce_max", "exp", "select_n", "reduce_sum", "div")):
        return "attention: mask, softmax, top-1"
    return "other: norms, RoPE, SiLU, residual, argmax, loop"


def profile_decode(cfg, params, attn, shapes, bw: float, n_steps: int = 16) -> None:
    """The decode loop (models.generate.decode_impl, compiled as the runner compiles it) traced with
    jax.profiler at each B x S: XLA:CPU's thread time a step by `decode_kind` (both worker
    threads: twice the wall at full use), against the weights' and the cache's read time."""
    import tempfile

    import jax

    from benchmarks.prefill_cpu import op_names, thread_time

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    for B, S in shapes:
        loop, _, fresh, ds, (first, lens) = decode_loop(cfg, params, attn, B, S, n_steps)
        jax.block_until_ready(loop(params, first, lens, fresh(), None)[0])
        cache = jax.block_until_ready(fresh())
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp)
            t0 = time.perf_counter()
            jax.block_until_ready(loop(params, first, lens, cache, None)[0])
            wall = (time.perf_counter() - t0) / n_steps
            jax.profiler.stop_trace()
            by = thread_time(tmp, op_names(loop.as_text()), decode_kind)
        kv = 2 * cfg.num_layers * B * cfg.num_kv_heads * ds * cfg.head_dim * 4
        total = sum(by.values()) / n_steps
        print(f"\ndecode loop profile, {B} x {S} ({ds} slots): {1e3 * wall:.1f} ms a step traced, {1e3 * total:.1f} ms "
              f"of XLA:CPU thread time a step; reading the weights and the cache once: "
              f"{1e3 * (weight_bytes + kv) / bw:.1f} ms")
        for kind, t in sorted(by.items(), key=lambda kv_: -kv_[1]):
            print(f"  {1e3 * t / n_steps:7.1f} ms {t / n_steps / total:6.1%}  {kind}")


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
