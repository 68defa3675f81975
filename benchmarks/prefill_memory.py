"""Memory of a long prefill WITH top-k attention capture grows linearly in the prompt length T.

`rhead_jax.models.generate.generate` prefills the prompt in chunks (`GenerateSpec.prefill_chunk`)
with flash-style chunked attention, so activation memory is O(T * chunk) and never a T x T map;
the decode steps capture each head's top-k attended slots from an O(S) row. This script runs a
tiny random model on prompts of several lengths and reports, per length T:

  (a) XLA's compiled memory analysis of the jitted `generate` (temp / argument / output bytes),
  (b) the peak RSS (`ru_maxrss`) of a fresh subprocess that compiles and runs only that T, minus
      the peak RSS of a baseline subprocess that does the same imports and builds the params,
  (c) the wall time of the compiled call (compile time excluded, reported separately),

next to what a dense T x T fp32 attention-probability map would take (heads * T * T * 4 bytes per
layer). It ends with a verdict on whether temp memory grew ~linearly (ratio ~T-ratio, far below
the T-ratio squared a T x T map would give).

    python -m benchmarks.prefill_memory                       # T = 4096, 8192, 16384
    python -m benchmarks.prefill_memory --lengths 4096 16384 --chunk 2048

On an accelerator backend (a) is device memory while (b) is host memory.
`--child T` is internal: the parent spawns one such process per length (`--child 0` = baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MARKER = "PREFILL_MEMORY_RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position_embeddings=65536)


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


# ----------------------------------------------------------------------------- child


def run_child(T: int, args) -> dict:
    """Runs in a fresh process. T == 0: baseline (imports + params only)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rhead_jax.models.cache import init_cache
    from rhead_jax.models.config import ModelConfig
    from rhead_jax.models.decoder import init_params
    from rhead_jax.models.generate import GenerateSpec, cache_size_for, generate

    cfg = ModelConfig(**MODEL)
    params = jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(args.seed)))
    result: dict = {"T": T, "backend": jax.default_backend(), "jax": jax.__version__,
                    "rss_setup": _peak_rss_bytes()}
    if T == 0:
        result["rss_peak"] = _peak_rss_bytes()
        return result

    spec = GenerateSpec(max_new_tokens=args.new_tokens, top_k=args.top_k, prefill_chunk=args.chunk)
    rng = np.random.default_rng(args.seed)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    lens = jnp.asarray([T], jnp.int32)
    S = cache_size_for(T, spec)
    cache = init_cache(cfg, 1, S)
    width = T - 1

    t0 = time.perf_counter()
    compiled = generate.lower(params, cfg, prompts, lens, cache, spec=spec,
                              prefill_width=width).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    rss_compiled = _peak_rss_bytes()

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gen, new_cache = jax.block_until_ready(compiled(params, prompts, lens, cache))
        times.append(time.perf_counter() - t0)
    rss_peak = _peak_rss_bytes()

    # Sanity: the run really prefilled T-1 tokens and captured top-k over the whole context.
    idx = np.asarray(gen.topk_index)
    w = np.asarray(gen.topk_weight)
    n = int(np.asarray(gen.num_tokens)[0])
    ok = (int(np.asarray(new_cache.length)[0]) == T - 1 + n and idx.shape[1] == args.new_tokens
          and bool(np.all((idx[:, :n] >= 0) & (idx[:, :n] < T + args.new_tokens)))
          and bool(np.all(np.isfinite(w))))

    def field(name):
        v = getattr(ma, name, None) if ma is not None else None
        return None if v is None else int(v)

    result.update(
        S=S, compile_s=compile_s, run_s=min(times), run_s_all=times, rss_compiled=rss_compiled,
        rss_peak=rss_peak, sane=ok, max_captured_slot=int(idx.max()),
        temp=field("temp_size_in_bytes"), argument=field("argument_size_in_bytes"),
        output=field("output_size_in_bytes"), alias=field("alias_size_in_bytes"),
        generated_code=field("generated_code_size_in_bytes"))
    return result


# ----------------------------------------------------------------------------- parent


def spawn(T: int, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.prefill_memory", "--child", str(T),
           "--chunk", str(args.chunk), "--new-tokens", str(args.new_tokens), "--top-k", str(args.top_k),
           "--seed", str(args.seed), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"child for T={T} failed (rc={proc.returncode})")
    res = json.loads(lines[-1][len(MARKER):])
    res["process_s"] = wall
    return res


def _parse_lengths(values) -> list[int]:
    out = []
    for v in values:
        out += [int(x) for x in str(v).replace(",", " ").split()]
    if not out or any(t < 2 for t in out):
        raise SystemExit("--lengths needs integers >= 2")
    return sorted(set(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", default=["4096", "8192", "16384"],
                   help="prompt lengths T (space- or comma-separated); the smallest is the reference")
    p.add_argument("--chunk", type=int, default=1024, help="GenerateSpec.prefill_chunk (default 1024)")
    p.add_argument("--new-tokens", type=int, default=4, help="GenerateSpec.max_new_tokens (default 4)")
    p.add_argument("--top-k", type=int, default=1, help="GenerateSpec.top_k captured per step (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per T (min is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--json", metavar="PATH", help="also write all raw results to this JSON file")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        res = run_child(args.child, args)
        print(MARKER + json.dumps(res), flush=True)
        return 0

    lengths = _parse_lengths(args.lengths)
    H, L = MODEL["num_heads"], MODEL["num_layers"]
    t_start = time.perf_counter()
    print(f"model: {MODEL}")
    print(f"spec: GenerateSpec(max_new_tokens={args.new_tokens}, top_k={args.top_k}, "
          f"prefill_chunk={args.chunk}); prefill_width=T-1; batch 1; one fresh process per T", flush=True)

    base = spawn(0, args)
    print(f"baseline child (imports + params): peak RSS {_fmt_bytes(base['rss_peak'])} "
          f"[{base['backend']}, jax {base['jax']}, {base['process_s']:.1f}s]", flush=True)
    rows = []
    for T in lengths:
        r = spawn(T, args)
        r["rss_delta"] = r["rss_peak"] - base["rss_peak"]
        r["rss_delta_compile"] = r["rss_compiled"] - base["rss_peak"]
        r["dense_map"] = H * T * T * 4
        rows.append(r)
        print(f"  T={T}: compile {r['compile_s']:.1f}s, run {r['run_s']:.2f}s, temp {_fmt_bytes(r['temp'])}, "
              f"RSS delta {_fmt_bytes(r['rss_delta'])}, captures sane: {r['sane']} "
              f"[process {r['process_s']:.1f}s]", flush=True)

    ref = rows[0]
    hdr = ["T", "cache S", "args", "output", "temp", "temp x", "RSS delta", "RSS x",
           "RSSd@compile", "run s", "compile s", "dense TxT/layer", "dense x", "dense/temp"]
    table = []
    for r in rows:
        table.append([str(r["T"]), str(r["S"]), _fmt_bytes(r["argument"]), _fmt_bytes(r["output"]),
                      _fmt_bytes(r["temp"]), _ratio(r["temp"], ref["temp"]),
                      _fmt_bytes(r["rss_delta"]), _ratio(r["rss_delta"], ref["rss_delta"]),
                      _fmt_bytes(r["rss_delta_compile"]), f"{r['run_s']:.2f}", f"{r['compile_s']:.1f}",
                      _fmt_bytes(r["dense_map"]), _ratio(r["dense_map"], ref["dense_map"]),
                      _ratio(r["dense_map"], r["temp"])])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(hdr)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"(x = ratio vs T={ref['T']}; RSS delta = child peak RSS - baseline peak RSS "
          f"{_fmt_bytes(base['rss_peak'])}; RSSd@compile = same, sampled after compile and before the run; "
          f"dense TxT/layer = {H} heads * T * T * 4 bytes, x{L} for all {L} layers)")

    last = rows[-1]
    t_ratio = last["T"] / ref["T"]
    verdict_parts = []
    linear = True
    for name, key in (("temp", "temp"), ("RSS delta", "rss_delta")):
        if not ref.get(key) or last.get(key) is None or ref[key] <= 0:
            verdict_parts.append(f"{name}: n/a")
            continue
        g = last[key] / ref[key]
        # ~linear (or better): at most 1.5x the length ratio, and far below the quadratic ratio.
        ok = g <= 1.5 * t_ratio and g < 0.5 * t_ratio ** 2
        linear &= ok if key == "temp" else True
        verdict_parts.append(f"{name} grew {g:.2f}x")
    if ref.get("temp") is not None and last.get("temp") is not None and last["T"] > ref["T"]:
        slope = (last["temp"] - ref["temp"]) / (last["T"] - ref["T"])
        print(f"temp slope T {ref['T']} -> {last['T']}: {slope:.0f} bytes per extra prompt token on top of a "
              f"T-independent {_fmt_bytes(ref['temp'] - slope * ref['T'])} (attention tiles and other fixed-size buffers); a dense map "
              f"would add {H * (last['T'] + ref['T']) * 4} bytes per extra token per layer at these lengths")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "baseline": base, "rows": rows}, f, indent=2)
    print()
    print(f"VERDICT: T {ref['T']} -> {last['T']} ({t_ratio:.0f}x longer; linear would be {t_ratio:.1f}x, "
          f"a T x T map {t_ratio ** 2:.0f}x): " + ", ".join(verdict_parts) + " -> "
          + ("memory (temp) grew ~linearly or less, far below quadratic: no T x T map is materialized"
             if linear else "memory (temp) did NOT grow ~linearly: check for a T x T allocation")
          + f". All captures sane: {all(r['sane'] for r in rows)}. Total {time.perf_counter() - t_start:.0f}s.")
    return 0 if linear else 1


if __name__ == "__main__":
    sys.exit(main())
