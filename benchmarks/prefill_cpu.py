"""Where a prefill's time goes on XLA:CPU, in one process: the engine's prefill of one row against
the matmul floor of the same shapes, and the pieces of a prefill call timed alone.

    python -m benchmarks.prefill_cpu                             # rows of 1000 and 2000 tokens
    python -m benchmarks.prefill_cpu --rows_at 1100,40@1856 --min_widths 128,64   # rows' rest calls
    python -m benchmarks.prefill_cpu --tiles 512x512,256x256 --pieces attention   # tile sizes
    python -m benchmarks.prefill_cpu --rows_at 2000 --profile    # XLA:CPU thread time by kind of op

Cases (SmolLM2-135M's shapes and real weights, fp32, one row of T tokens prefilled from slot
`start` in the engine's calls, `prefill_pieces(T, prefill_widths(chunk))`):

  matmul      the layers' weight matmuls alone (q, k, v, o, gate, up, down) for the calls' tokens,
              in a `lax.scan` over the stacked weights as the decoder runs them: the floor
  layers      the decoder's layer body without attention (norms, RoPE, projections, MLP, residual;
              `attention_inputs` + `attention_output`, the queries standing in for the attention)
  attention   `chunked_attention` alone over 30 layers of a stacked cache, the calls' shapes
  writes      `write_rows` alone (the calls' keys and values into row 0 of the stacked caches)
  engine      the sweep's prefill: `Runner.prefill_block` (the program the engine runs, CPU compiler
              options, cache donated, the row written in place in a --rows-row cache), in the calls
              of each --min_widths (the other cases: the calls of the first)

Every case is compiled and warmed up first, then the cases are timed one after the other in each
of --repeats rounds and the best round is kept: this machine is shared, its load drifts, and each
case sees every round's load. Compare the ratios (last column: against `matmul` of the same
invocation), not the seconds; the CPU seconds of this process vary less than the wall under load.
`square matmul` is a [2048]^3 fp32 matmul timed in the same rounds: its GFLOP/s are the machine's
peak. `--profile` traces the engine's calls with jax.profiler and sums XLA:CPU's thread time (each
thunk's own, nested ones subtracted) by kind of op, from the compiled programs' op names.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import int_items  # noqa: E402  (no jax import)


def round_robin(cases: dict, repeats: int) -> dict:
    """{name: (best wall seconds, best CPU seconds of this process)}: every case compiled and warmed
    up first, then timed once per round, the cases one after the other. A case is a callable
    returning what to block on. On a loaded machine the CPU seconds vary less than the wall."""
    import jax

    for fn in cases.values():
        jax.block_until_ready(fn())
    best = {name: (float("inf"), float("inf")) for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def op_names(hlo_text: str) -> dict:
    """{HLO instruction name: its op_name metadata} of a compiled program's text."""
    import re

    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = op.group(1) if op else ""
    return out


def kind_of(name: str, op: str) -> str:
    """The breakdown's row of one XLA:CPU thunk (its HLO name and op_name)."""
    if name.startswith(("ThunkExecutor", "Slinky")):
        return "runtime: thunk executor, thread-pool waits"
    if name.startswith("ynn_fusion") and not op:
        return "attention matmuls (scores, values)"
    if "dot_general" in op and any(e in op for e in ("btd,d", "btj,jm", "btf,fd")):
        return "weight matmuls (q, k, v, o, gate, up, down)"
    if "/while/body/closed_call/while/body/closed_call/while/body/" in op:
        return "attention tiles: mask, max, exp, sums, rescaling"
    if "_pad)/pad" in op:
        return "attention: the layer's keys and values padded to whole tiles"
    if "scatter" in name or "scatter" in op:
        return "cache writes"
    if "dynamic_index_in_dim" in op:
        return "scan: the layer's weights sliced out"
    return "other: norms, RoPE, SiLU, residual, layouts, loops"


def thread_time(trace_dir: str, names: dict, kind=kind_of) -> dict:
    """{kind: seconds}: the exclusive time of each thunk on XLA:CPU's worker threads in a
    jax.profiler trace (nested events subtracted), summed by kind(thunk name, op_name) (`kind_of`)."""
    import collections
    import glob

    from jax._src.lib import _profile_data

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    by = collections.defaultdict(float)
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            stack = []
            for start, end, name in sorted(((e.start_ns, e.end_ns, e.name) for e in line.events),
                                           key=lambda e: (e[0], -e[1])):
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    by[kind(stack[-1][2], names.get(stack[-1][2], ""))] -= (end - start) / 1e9
                by[kind(name, names.get(name, ""))] += (end - start) / 1e9
                stack.append((start, end, name))
    return dict(by)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows_at", default="1000,2000",
                    help="rows to prefill: T (from slot 0) or T@start (after `start` cached tokens), comma-separated")
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk (default: config.sweep.prefill_chunk)")
    ap.add_argument("--tiles", default="", help="q_chunk x k_chunk pairs, e.g. 512x512,256x512 (default: the config's)")
    ap.add_argument("--min_widths", default="",
                    help="smallest prefill call widths to time the engine with, e.g. 128,64: the engine's widths "
                         "(prefill_widths(chunk): chunk ... chunk/8) halved on down to each (default: the engine's)")
    ap.add_argument("--rows", type=int, default=3, help="rows of the cache the row is written into (the 2K batch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pieces", default="matmul,layers,attention,writes,engine")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the engine's calls (jax.profiler): XLA:CPU thread time by kind of op")
    args = ap.parse_args()
    rows_at = int_items(args.rows_at, "--rows_at", sep="@", parts=(1, 2),
                        form="comma-separated T or T@start, e.g. 1100,40@1856")
    tiles_at = (int_items(args.tiles, "--tiles", sep="x", parts=(2,), form="q_chunk x k_chunk pairs, e.g. 512x512")
                if args.tiles else [])
    min_widths = int_items(args.min_widths, "--min_widths") if args.min_widths else []

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from rhead_jax.checkpoints import load_model
    from rhead_jax.config import default_config
    from rhead_jax.models import layers
    from rhead_jax.models.attention import NO_WINDOW, AttentionOptions, chunked_attention
    from rhead_jax.models.cache import write_rows
    from rhead_jax.models.generate import GenerateSpec, cache_size_for, prefill_pieces, prefill_widths
    from rhead_jax.runner import CPU_COMPILER_OPTIONS, Runner

    s = default_config().sweep
    chunk = args.chunk or s.prefill_chunk
    attn0 = AttentionOptions.for_platform(jax.devices()[0].platform, s.attention, q_chunk=s.q_chunk,
                                          k_chunk=s.k_chunk)
    tiles = tiles_at or [(attn0.q_chunk, attn0.k_chunk)]
    model = load_model("default")
    cfg, params = model.cfg, model.params
    L, d, H, K, G, D = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    lp = params["layers"]
    names = ("q", "k", "v", "o", "gate", "up", "down")
    n_matmul = sum(lp[n][0].size for n in names)
    print(f"machine: jax {jax.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (LOADED above ~0.5)")
    print(f"model: {model.name}, {L} layers, {L * n_matmul / 1e6:.1f}M matmul params; prefill chunk {chunk}; {attn0}")
    pieces = set(args.pieces.split(","))
    jit = lambda f, **kw: jax.jit(f, compiler_options=CPU_COMPILER_OPTIONS, **kw)  # noqa: E731  as the runner does
    rng = np.random.default_rng(0)
    sq = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    sq_f = jax.jit(lambda a: a @ a)
    square = lambda: sq_f(sq)  # noqa: E731  the peak, timed with the rest (its rate: the GFLOP/s column)

    min_widths = min_widths or [prefill_widths(chunk)[-1]]

    def calls_of(T, start, min_width):
        """[(start slot, width, real tokens)] of the calls for T tokens after `start`: the engine's,
        with widths halved on down to `min_width`."""
        widths = prefill_widths(chunk)
        while widths[-1] // 2 >= min_width:
            widths += (widths[-1] // 2,)
        out, done = [], start
        for w in prefill_pieces(T, widths):
            out.append((done, w, min(w, start + T - done)))
            done += w
        return out

    def matmul_case(calls):
        w = {n: lp[n] for n in names}

        def layer(x, w):
            q = x @ w["q"].reshape(d, -1)
            k = x @ w["k"].reshape(d, -1)
            v = x @ w["v"].reshape(d, -1)
            o = q @ w["o"].reshape(-1, d)
            h = (x @ w["gate"]) * (x @ w["up"])
            return x + o + h @ w["down"] + (k[0, 0] + v[0, 0]) * 0, None

        f = jit(lambda x, w: lax.scan(layer, x, w)[0])
        xs = [jax.random.normal(jax.random.PRNGKey(0), (wd, d), jnp.float32) for _, wd, _ in calls]
        return lambda: [f(x, w) for x in xs]

    def layers_case(calls):
        def one(x, positions):
            tables = layers.rope_tables(cfg, positions)

            def layer(x, lpl):
                q, k, v = layers.attention_inputs(lpl, cfg, x, *layers.layer_rope(tables, 0))
                return layers.attention_output(lpl, cfg, x, q.reshape(q.shape[:2] + (K, G, D))), None

            return lax.scan(layer, x, lp)[0]

        f = jit(one)
        args_ = [(jax.random.normal(jax.random.PRNGKey(0), (1, wd, d), jnp.float32),
                  jnp.arange(st, st + wd, dtype=jnp.int32)[None]) for st, wd, _ in calls]
        return lambda: [f(*a) for a in args_]

    def attention_case(calls, size, attn):
        kc = jax.random.normal(jax.random.PRNGKey(1), (L, 1, K, size, D), jnp.float32)

        def one(q, qpos, kpos, start):
            def layer(carry, xs):
                ql, i = xs
                out = chunked_attention(ql, kc[i], kc[i], qpos, kpos, start[None], window=NO_WINDOW,
                                        scale=cfg.attn_scale, opts=attn)
                return carry + out[0, 0, 0, 0, 0], None

            return lax.scan(layer, 0.0, (q, jnp.arange(L)))[0]

        f = jit(one)
        args_ = []
        for st, wd, real in calls:
            qpos = jnp.where(jnp.arange(wd) < real, jnp.arange(st, st + wd), -1).astype(jnp.int32)[None]
            kpos = jnp.where(jnp.arange(size) < st + real, jnp.arange(size), -1).astype(jnp.int32)[None]
            q = jax.random.normal(jax.random.PRNGKey(2), (L, 1, wd, K, G, D), jnp.float32)
            args_.append((q, qpos, kpos, jnp.int32(st)))
        return lambda: [f(*a) for a in args_]

    def writes_case(calls, size):
        def one(kc, vc, new, start):
            def layer(carry, i):
                kc, vc = carry
                kc = write_rows(kc, new, i, start[None], "scatter", jnp.int32(0))
                vc = write_rows(vc, new, i, start[None], "scatter", jnp.int32(0))
                return (kc, vc), None

            return lax.scan(layer, (kc, vc), jnp.arange(L))[0]

        f = jit(one, donate_argnums=(0, 1))
        state = {"c": (jnp.zeros((L, args.rows, K, size, D), jnp.float32),) * 2}
        news = [(jax.random.normal(jax.random.PRNGKey(3), (1, wd, K, D), jnp.float32), jnp.int32(st))
                for st, wd, _ in calls]
        state["c"] = (state["c"][0], jnp.zeros_like(state["c"][0]))

        def run():
            for new, st in news:
                state["c"] = f(*state["c"], new, st)
            return state["c"]

        return run

    def engine_case(calls, size, attn, start):
        spec = GenerateSpec(prefill_chunk=chunk, attn=attn)
        runner = Runner(cfg, params)
        toks = []
        for st, wd, real in calls:
            t = np.zeros((1, wd), np.int32)
            p = np.full((1, wd), -1, np.int32)
            t[0, :real], p[0, :real] = rng.integers(0, cfg.vocab_size, real), np.arange(st, st + real)
            toks.append((t, p))
        held = jnp.where(jnp.arange(size) < start, jnp.arange(size), -1).astype(jnp.int32)
        state = {"cache": runner.init_cache(args.rows, size)}

        def run():   # the donated cache goes round; its row 0 holds `start` tokens again each time
            cache = state["cache"].replace(length=jnp.full((args.rows,), start, jnp.int32),
                                           pos=jnp.broadcast_to(held, (args.rows, size)))
            for t, p in toks:
                cache = runner.prefill_block(cache, 0, t, p, spec)
            state["cache"] = cache
            return cache.k

        def hlo():   # the compiled programs' text: thunk names -> op names
            texts = ""
            for (t, p), (_, wd, _) in zip(toks, calls):
                fn = runner.prefill_block_jit(args.rows, size, wd, spec)
                lowered = fn.lower(params, state["cache"], jnp.int32(0), t, p, None)
                texts += lowered.compile().as_text()
            return texts

        run.hlo = hlo
        return run

    def profile(run, label):
        import tempfile

        names = op_names(run.hlo())
        jax.block_until_ready(run())
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp)
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            wall = time.perf_counter() - t0
            jax.profiler.stop_trace()
            by = thread_time(tmp, names)
        total = sum(by.values())
        print(f"profile of {label}: {wall:.3f} s wall, {total:.3f} s on XLA:CPU's threads")
        for kind, t in sorted(by.items(), key=lambda kv: -kv[1]):
            print(f"  {t:7.3f} s {t / total:6.1%}  {kind}")

    for row in rows_at:
        T, start = (*row, 0)[:2]
        calls = calls_of(T, start, min_widths[0])
        size = cache_size_for(-(-(start + T + 1) // s.pad_multiple) * s.pad_multiple,
                              GenerateSpec(attn=attn0))
        width = sum(wd for _, wd, _ in calls)
        flops_mm = 2 * L * n_matmul * width
        flops_attn = sum(2 * 2 * L * H * D * real * (st + (real + 1) / 2) for st, _, real in calls)
        print(f"\n{T} tokens after {start}: calls {[wd for _, wd, _ in calls]} ({width - T} padding), "
              f"{size} slots; matmuls {flops_mm / 1e9:.0f} GFLOP, "
              f"causal attention {flops_attn / 1e9:.0f} GFLOP")
        cases = {"matmul (floor)": matmul_case(calls), "square matmul [2048]^3": square}
        if "layers" in pieces:
            cases["layers without attention"] = layers_case(calls)
        for qc, kc in tiles:
            attn = dataclasses.replace(attn0, q_chunk=qc, k_chunk=kc)
            if "attention" in pieces:
                cases[f"attention, tiles {qc}x{kc}"] = attention_case(calls, size, attn)
            for mw in min_widths if "engine" in pieces else ():
                label = f"engine, tiles {qc}x{kc}" + (f", calls {[wd for _, wd, _ in calls_of(T, start, mw)]}"
                                                       if len(min_widths) > 1 else "")
                cases[label] = engine_case(calls_of(T, start, mw), size, attn, start)
        if "writes" in pieces:
            cases["cache writes"] = writes_case(calls, size)
        best = round_robin(cases, args.repeats)
        base, base_cpu = best["matmul (floor)"]
        print(f"{'case':<30} {'wall s':>7} {'GFLOP/s':>8} {'x matmul':>9} {'CPU s':>7} {'x matmul':>9}")
        for name, (t, cpu) in best.items():
            flops = {"square": 2 * 2048 ** 3, "matmul": flops_mm, "layers": flops_mm, "attention": flops_attn,
                     "engine": flops_mm + flops_attn}.get(name.split()[0].rstrip(","), 0)
            rate = f"{flops / t / 1e9:8.0f}" if flops else f"{'':>8}"
            print(f"{name:<30} {t:7.3f} {rate} {t / base:8.2f}x {cpu:7.3f} {cpu / base_cpu:8.2f}x")
        if args.profile:
            for name, run in cases.items():
                if name.startswith("engine"):
                    profile(run, f"{name}, {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
