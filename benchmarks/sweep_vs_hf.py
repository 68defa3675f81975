"""Our retrieval-head sweep vs a plain HF-transformers (PyTorch) run of the original method.

One process, the same instances (rhead_jax.detection.plan_instances), the embedded
SmolLM2-135M-Instruct in fp32 on both sides:

  1. ours: shared-prefix prefill (`build_shared_prefix`) + `run_batch` over `make_batches(...)`,
     as `run_sweep` does but writing nothing. The jitted functions these call (the shared
     prefix's prefill, `generate`, `scoring.copy_counts`) are swapped, in this process only, for
     stand-ins that compile each new shape explicitly with `.lower(...).compile()` (timed as
     compile) and then run that program, blocking on its result (timed as run): same programs,
     same numbers, and every batch runs once. A batch splits into compile / generate / scoring
     (copy counts + transfer + detokenize + ROUGE + result dicts); generate splits into prefill
     and decode with an isolated, precompiled `prefill` on the same shapes (best of N).
  2. the baseline: benchmarks.hf_baseline (eager attention, batch 1, Python copy test), with
     torch's default thread count (all cores) unless --torch-threads. A probe times the longest
     prompt with the default and with 1 thread: on a loaded machine OpenMP's barriers can make
     the multi-threaded baseline many times slower, which inflates the speed ratio.
  3. the comparison: generated tokens, per-test scores, ROUGE kept flags, head means, top-k heads.
  4. wall-time ratios and where our time goes.
  5. fp32 matmul peak (jax and torch, this process) and our prefill's fraction of it.

    python -m benchmarks.sweep_vs_hf                      # 500,1000 x 0,50,100 x 3 needles
    python -m benchmarks.sweep_vs_hf --lengths 500,1000,2000 --json /tmp/sweep_vs_hf.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).replace(" ", ",").split(",") if x]


def _load_config(path: str):
    p = Path(path)
    if not p.exists():
        p = REPO_ROOT / "configs" / (path if path.endswith(".py") else path + ".py")
    spec = importlib.util.spec_from_file_location("_bench_config", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(), str(p)


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f}/{b:.2f}/{c:.2f}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {_load()}] {msg}", flush=True)


class Stats:
    """Compile and run seconds accumulated by AOT stand-ins, and the programs they compiled."""

    def __init__(self):
        self.compile_s = self.run_s = 0.0
        self.programs = 0

    def take(self) -> tuple[float, float]:
        c, r = self.compile_s, self.run_s
        self.compile_s = self.run_s = 0.0
        return c, r


class AOT:
    """Stands in for a jitted function: on a new (static args, shapes) key it lowers and compiles
    explicitly (timed as compile), then runs the compiled program and blocks on its result (timed
    as run). Same program and numbers as the jit call path."""

    def __init__(self, fn, static: tuple[str, ...] = (), static_pos: tuple[int, ...] = (), stats=None):
        import jax

        self.fn, self.jax, self.static, self.static_pos = fn, jax, static, static_pos
        self.stats = stats or Stats()
        self.programs: dict = {}

    def _key(self, a, k):
        leaves = lambda x: tuple((l.shape, str(l.dtype)) for l in self.jax.tree.leaves(x))  # noqa: E731
        struct = lambda x: str(self.jax.tree.structure(x))  # noqa: E731
        dyn_a = [x for i, x in enumerate(a) if i not in self.static_pos]
        dyn_k = {n: v for n, v in k.items() if n not in self.static}
        return (tuple(a[i] for i in self.static_pos), tuple((n, k[n]) for n in self.static if n in k),
                leaves(dyn_a), leaves(dyn_k), struct(dyn_a), struct(dyn_k))

    def __call__(self, *a, **k):
        key = self._key(a, k)
        if key not in self.programs:
            t = time.perf_counter()
            self.programs[key] = self.fn.lower(*a, **k).compile()
            self.stats.compile_s += time.perf_counter() - t
            self.stats.programs += 1
        dyn_a = [x for i, x in enumerate(a) if i not in self.static_pos]
        dyn_k = {n: v for n, v in k.items() if n not in self.static}
        t = time.perf_counter()
        out = self.jax.block_until_ready(self.programs[key](*dyn_a, **dyn_k))
        self.stats.run_s += time.perf_counter() - t
        return out


class Instrumented:
    """Swaps the jitted programs that build_shared_prefix / run_batch call for AOT stand-ins, in
    this process only, and restores them on exit. Works with the Runner API (rhead_jax.runner)
    and with the older module-level `detection.generate` / `detection._prefill_jit`."""

    def __init__(self, model):
        import inspect

        from rhead_jax import detection, scoring
        from rhead_jax.models.generate import generate

        self.gen, self.cc, self.prefix, self.misc = Stats(), Stats(), Stats(), Stats()
        self.a_gen = AOT(generate, static=("spec", "prefill_width"), static_pos=(1,), stats=self.gen)
        self.a_cc = AOT(scoring.copy_counts, stats=self.cc)
        self.patches = [(scoring, "copy_counts", self.a_cc)]
        self.kw: dict = {}
        self.runner = None
        if "runner" in inspect.signature(detection.run_batch).parameters:
            from rhead_jax import runner as runner_mod

            outer = self

            class BenchRunner(runner_mod.Runner):
                def _jit(self, key, make):
                    if key not in self._jits:
                        stats = outer.prefix if key[0] == "prefill" else outer.misc
                        self._jits[key] = AOT(make(), stats=stats)
                    return self._jits[key]

            self.runner = BenchRunner(model.cfg, model.params)
            self.kw = {"runner": self.runner}
            self.patches.append((runner_mod, "generate", self.a_gen))
        else:
            self.patches.append((detection, "generate", self.a_gen))
            self.patches.append((detection, "_prefill_jit", AOT(
                detection._prefill_jit, static=("chunk", "mask_mode", "attn"), static_pos=(1,),
                stats=self.prefix)))

    def rows(self, shared, keys, size):
        return shared.rows(keys, size, self.runner) if self.runner is not None else shared.rows(keys, size)

    def __enter__(self):
        self.saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.patches]
        for obj, name, new in self.patches:
            setattr(obj, name, new)
        return self

    def __exit__(self, *exc):
        for obj, name, old in self.saved:
            setattr(obj, name, old)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- matmul peaks


def jax_matmul_peak(n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    best = min(ts)
    return {"n": n, "best_s": best, "median_s": sorted(ts)[len(ts) // 2], "flops": 2 * n ** 3 / best}


def torch_matmul_peak(n: int, repeats: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32)
    b = torch.randn(n, n, generator=g, dtype=torch.float32)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t)
    best = min(ts)
    return {"n": n, "best_s": best, "median_s": sorted(ts)[len(ts) // 2], "flops": 2 * n ** 3 / best}


# ----------------------------------------------------------------------------- flops


def non_embedding_params(params) -> int:
    import jax

    return int(sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                   if not any(getattr(k, "key", None) in ("embed", "lm_head") for k in path)))


def prefill_flops(cfg, n_params: int, spans: list[tuple[int, int]]) -> tuple[float, int, int]:
    """spans: (first position, one past the last) of each prefilled token run. Returns
    (FLOPs, tokens, sum of keys attended) with FLOPs = 2*N*tokens + 4*L*H*D*sum_keys."""
    tokens = sum(e - s for s, e in spans)
    keys = sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in spans)  # token at position p sees p+1 keys
    return 2 * n_params * tokens + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys, tokens, keys


# ----------------------------------------------------------------------------- ours


def run_ours(model, config, instances, spec, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rhead_jax import detection, scoring
    from rhead_jax.models.generate import cache_size_for, prefill

    s = config.sweep
    batches = detection.make_batches(instances, s.batch_size)
    log(f"ours: {len(instances)} instances in {len(batches)} batches (batch_size {s.batch_size})")
    out: dict = {"batches": []}

    inst = Instrumented(model)
    with inst:
        # shared prefix: its jitted prefill is compiled explicitly (timed apart), then run once
        max_p = max(_round_up(i.num_prompt_tokens, s.pad_multiple) for i in instances)
        shared = None
        out["prefix_total_s"] = out["prefix_s"] = out["prefix_compile_s"] = 0.0
        out["prefix_tokens"] = 0
        if s.share_prefix:
            t = time.perf_counter()
            shared = detection.build_shared_prefix(model, instances, spec, cache_size_for(max_p, spec), **inst.kw)
            jax.block_until_ready(shared.cache.k)
            total = time.perf_counter() - t
            comp, _ = inst.prefix.take()
            mc, _ = inst.misc.take()
            comp += mc
            out["prefix_total_s"], out["prefix_compile_s"], out["prefix_s"] = total, comp, total - comp
            out["prefix_tokens"] = shared.tokens
            log(f"ours: shared prefix {shared.tokens} tokens: {total:.2f}s = compile {comp:.2f}s + run "
                f"{total - comp:.2f}s")

        # batches: every jitted program run_batch calls is an AOT stand-in, so compile and run
        # times come apart without running anything twice
        results = []
        for bi, idx in enumerate(batches):
            batch = [instances[i] for i in idx]
            t = time.perf_counter()
            res = detection.run_batch(model, batch, spec, pad_multiple=s.pad_multiple,
                                      batch_size=s.batch_size, shared=shared, **inst.kw)
            total = time.perf_counter() - t
            (gen_c, gen_r), (cc_c, cc_r), (m_c, _) = inst.gen.take(), inst.cc.take(), inst.misc.take()
            # the shapes run_batch used (it pads the batch to batch_size rows)
            padded = batch + [batch[-1]] * (max(s.batch_size or len(batch), len(batch)) - len(batch))
            lens = np.array([i.num_prompt_tokens for i in padded])
            P = _round_up(int(lens.max()), s.pad_multiple)
            starts = np.array([shared.lengths[i.key] if shared else 0 for i in padded])
            width = _round_up(max(int((lens - 1 - starts).max()), 1), s.pad_multiple)
            rec = {
                "batch": bi, "length": batch[0].length, "instances": len(batch), "rows": len(padded),
                "P": P, "prefill_width": width, "cache_size": cache_size_for(P, spec),
                "total_s": total, "generate_s": gen_r, "copy_counts_s": cc_r,
                "compile_generate_s": gen_c, "compile_copy_counts_s": cc_c, "compile_other_s": m_c,
                "compile_s": gen_c + cc_c + m_c,
                "score_s": total - gen_c - gen_r - cc_c - m_c,  # copy counts + cache rows + rest
                "steps": max(len(r["generated"]) for r in res),
                "prefill_tokens_real": int(sum(i.num_prompt_tokens - 1 - (shared.lengths[i.key] if shared else 0)
                                               for i in batch)),
            }
            rec["steady_s"] = total - rec["compile_s"]
            out["batches"].append(rec)
            results.extend(res)
            log(f"ours: batch {bi + 1}/{len(batches)} L={rec['length']} rows={len(padded)} P={P} width={width} "
                f"S={rec['cache_size']}: {total:.2f}s = compile {rec['compile_s']:.2f}s + generate {gen_r:.2f}s "
                f"+ scoring {rec['score_s']:.2f}s (copy_counts {cc_r:.3f}s); {rec['steps']} steps")
    out["results"] = results
    out["generate_programs"] = inst.gen.programs
    out["copy_counts_programs"] = inst.cc.programs
    out["prefix_programs"] = inst.prefix.programs

    # isolated prefill per batch shape: compile first, best of N; the matmul peak is measured
    # again right before, and the caller uses the better of its two measurements
    out["matmul_jax_2"] = jax_matmul_peak(args.matmul_n, args.matmul_repeats)
    log(f"jax fp32 matmul again: {out['matmul_jax_2']['flops'] / 1e9:.1f} GFLOP/s")
    pjit = jax.jit(prefill, static_argnames=("cfg", "chunk", "mask_mode", "attn"))
    shapes: dict = {}
    for rec, idx in zip(out["batches"], batches):
        key = (rec["rows"], rec["prefill_width"], rec["cache_size"])
        batch = [instances[i] for i in idx]
        padded = batch + [batch[-1]] * (rec["rows"] - len(batch))
        if key not in shapes:
            lens = np.array([i.num_prompt_tokens for i in padded], np.int32)
            prompts = np.zeros((len(padded), rec["P"]), np.int32)
            for b, x in enumerate(padded):
                prompts[b, :lens[b]] = x.prompt_ids
            keys = [i.key for i in padded]
            if shared is not None:
                cache = inst.rows(shared, keys, rec["cache_size"])
            else:
                from rhead_jax.models.decoder import init_cache
                cache = init_cache(model.cfg, len(padded), rec["cache_size"])
            start = np.asarray(cache.length)
            n_pre = lens - 1 - start
            tt = np.arange(rec["prefill_width"])
            src = np.clip(start[:, None] + tt, 0, rec["P"] - 1)
            rest = np.take_along_axis(prompts, src, axis=1).astype(np.int32)
            rest_pos = np.where(tt[None] < n_pre[:, None], start[:, None] + tt, -1).astype(np.int32)
            argsd = (model.params, model.cfg, jnp.asarray(rest), jnp.asarray(rest_pos), cache)
            kw = dict(chunk=spec.prefill_chunk, mask_mode=spec.mask_mode, attn=spec.attn)
            t = time.perf_counter()
            compiled = pjit.lower(*argsd, **kw).compile()
            compile_s = time.perf_counter() - t
            ts = []
            for _ in range(args.prefill_repeats):
                t = time.perf_counter()
                jax.block_until_ready(compiled(model.params, argsd[2], argsd[3], cache))
                ts.append(time.perf_counter() - t)
            real = [(int(st), int(st + n)) for st, n in zip(start[:len(batch)], n_pre[:len(batch)])]
            shapes[key] = {"rows": rec["rows"], "width": rec["prefill_width"], "cache_size": rec["cache_size"],
                           "compile_s": compile_s, "best_s": min(ts), "all_s": ts, "real_spans": real,
                           "executed_tokens": rec["rows"] * rec["prefill_width"]}
            log(f"ours: isolated prefill rows={rec['rows']} width={rec['prefill_width']} S={rec['cache_size']}: "
                f"compile {compile_s:.2f}s, best {min(ts):.3f}s of {[round(x, 3) for x in ts]}")
        rec["prefill_s"] = shapes[key]["best_s"]
        rec["decode_s"] = max(rec["generate_s"] - rec["prefill_s"], 0.0)
    out["prefill_shapes"] = list(shapes.values())
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_135m", help="config file or name in configs/ (default smollm2_135m)")
    p.add_argument("--lengths", default="500,1000", help="context lengths, comma-separated (default 500,1000)")
    p.add_argument("--depths", default="0,50,100", help="needle depths in percent (default 0,50,100)")
    p.add_argument("--batch-size", type=int, default=None, help="config.sweep.batch_size (default: the config's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="decode cap (default: the config's, 50)")
    p.add_argument("--faithful", action="store_true", help="config.sweep.faithful (newline-only stop tokens etc.)")
    p.add_argument("--no-share-prefix", action="store_true", help="config.sweep.share_prefix = False")
    p.add_argument("--top", type=int, default=20, help="top-k heads compared (default 20)")
    p.add_argument("--matmul-n", type=int, default=2048, help="square fp32 matmul size for the peak (default 2048)")
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--prefill-repeats", type=int, default=3, help="timed isolated-prefill calls (best is kept)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-torch-probe", dest="torch_probe", action="store_false",
                   help="skip timing one instance with 1 torch thread vs the default (a contention check)")
    p.add_argument("--json", metavar="PATH", help="also write every number and per-instance result here")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    config, config_path = _load_config(args.config)
    config.sweep.lengths = _ints(args.lengths)
    config.sweep.depths = _ints(args.depths)
    if args.batch_size is not None:
        config.sweep.batch_size = args.batch_size
    if args.max_new_tokens is not None:
        config.sweep.max_new_tokens = args.max_new_tokens
    if args.faithful:
        config.sweep.faithful = True
    if args.no_share_prefix:
        config.sweep.share_prefix = False
    from rhead_jax.config import validate
    validate(config)

    import jax
    import numpy as np

    from rhead_jax import detection, scoring
    from rhead_jax.checkpoints import load_model
    from rhead_jax.checkpoints.gguf_import import default_model_dir

    log(f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.devices()}), cpu_count {os.cpu_count()}")
    t = time.perf_counter()
    model = load_model(config.model.path, dtype=config.model.dtype)
    log(f"loaded {model.name} ({model.cfg.num_layers} layers x {model.cfg.num_heads} heads) in "
        f"{time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    instances = detection.plan_instances(config, model)
    spec = detection.generate_spec(config, model.tokenizer)
    setup_s = time.perf_counter() - t
    log(f"{len(instances)} instances, prompt tokens {min(i.num_prompt_tokens for i in instances)}-"
        f"{max(i.num_prompt_tokens for i in instances)}; {len(spec.stop_tokens)} stop tokens; "
        f"planning + spec {setup_s:.1f}s (not timed below)")

    # one-time lazy setup of the ROUGE scorer (rouge_score/nltk imports), out of both sides' timings
    from rhead_jax.needle.rouge import rouge1_recall
    rouge1_recall("warm up", "warm up")

    # 5a. jax matmul peak, before anything else competes for the cores
    mm_jax = jax_matmul_peak(args.matmul_n, args.matmul_repeats)
    log(f"jax fp32 matmul {args.matmul_n}^3: best {mm_jax['best_s'] * 1e3:.1f} ms = {mm_jax['flops'] / 1e9:.1f} GFLOP/s")

    # 1. ours
    load_ours0 = os.getloadavg()
    ours = run_ours(model, config, instances, spec, args)
    load_ours1 = os.getloadavg()

    # the peak used below: the better of the two jax measurements (conservative for our fraction)
    mm_jax_first = mm_jax
    if ours["matmul_jax_2"]["flops"] > mm_jax["flops"]:
        mm_jax = ours["matmul_jax_2"]

    # 2. HF baseline
    import torch

    from benchmarks import hf_baseline

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch_threads = torch.get_num_threads()
    mm_torch = torch_matmul_peak(args.matmul_n, args.matmul_repeats)
    log(f"torch fp32 matmul {args.matmul_n}^3: best {mm_torch['best_s'] * 1e3:.1f} ms = "
        f"{mm_torch['flops'] / 1e9:.1f} GFLOP/s (torch threads {torch_threads})")
    t = time.perf_counter()
    hf_model = hf_baseline.load_hf_model(default_model_dir() if config.model.path in ("", "default")
                                         else model.directory)
    log(f"HF model loaded in {time.perf_counter() - t:.1f}s (eager attention, fp32)")
    with torch.inference_mode():  # one-time warm-up, out of the timings
        hf_model(input_ids=torch.tensor([[int(t) for t in instances[0].prompt_ids[:16]]]), use_cache=True)
    probes = []
    if args.torch_probe:
        probe_inst = max(instances, key=lambda i: i.num_prompt_tokens)
        for th in (torch_threads, 1):
            pr = hf_baseline.thread_probe(hf_model, probe_inst, th)
            probes.append(pr)
            log(f"torch thread probe ({probe_inst.key}, {pr['prompt_tokens']} tokens): {th} threads: prefill "
                f"{pr['prefill_s']:.2f}s, decode {pr['step_s'] * 1e3:.1f} ms/step")
    load_hf0 = os.getloadavg()
    hf = []
    for n, inst in enumerate(instances):
        r = hf_baseline.run_instance(hf_model, model.tokenizer, inst, max_new_tokens=spec.max_new_tokens,
                                     stop_tokens=spec.stop_tokens)
        hf.append(r)
        log(f"hf {n + 1}/{len(instances)} {inst.key}: prefill {r['time_prefill_s']:.2f}s, decode "
            f"{r['time_decode_s']:.2f}s ({r['steps']} steps), score {r['time_score_s']:.3f}s; {r['response']!r}")
    load_hf1 = os.getloadavg()

    # 3. comparison
    cfg = model.cfg
    L, H = cfg.num_layers, cfg.num_heads
    ours_by_key = {r["key"]: r for r in ours["results"]}
    mismatched_tokens, kept_mismatch, score_diff, score_diff_same_tokens = [], [], 0.0, 0.0
    for r in hf:
        o = ours_by_key[r["key"]]
        same = o["generated"] == r["generated"]
        if not same:
            mismatched_tokens.append(r["key"])
        if o["kept"] != r["kept"]:
            kept_mismatch.append(r["key"])
        d = float(np.max(np.abs(np.asarray(o["scores"], np.float64) - np.asarray(r["scores"], np.float64))))
        score_diff = max(score_diff, d)
        if same:
            score_diff_same_tokens = max(score_diff_same_tokens, d)
    ours_list = [ours_by_key[r["key"]] for r in hf]  # grid order
    hs_ours = detection.head_scores_from(ours_list, L, H)
    hs_hf = detection.head_scores_from(hf, L, H)
    m_ours, m_hf = scoring.head_means(hs_ours), scoring.head_means(hs_hf)
    mean_diff = max(abs(m_ours[k] - m_hf[k]) for k in m_ours)
    top_ours = [k for k, _ in scoring.top_heads(hs_ours, args.top)]
    top_hf = [k for k, _ in scoring.top_heads(hs_hf, args.top)]
    overlap = len(set(top_ours) & set(top_hf)) / args.top
    same_set, same_order = set(top_ours) == set(top_hf), top_ours == top_hf
    # strict ties at the top-k boundary make the order/set ambiguous: report them
    kth = m_hf[top_hf[-1]]
    ties_at_boundary = sum(1 for v in m_hf.values() if v == kth) > sum(1 for k in top_hf if m_hf[k] == kth)

    # 4. times
    bs = ours["batches"]
    ours_prefix = ours["prefix_s"]
    ours_prefill = ours_prefix + sum(b["prefill_s"] for b in bs)
    ours_decode = sum(b["decode_s"] for b in bs)
    ours_score = sum(b["score_s"] for b in bs)
    ours_steady = ours_prefix + sum(b["steady_s"] for b in bs)
    ours_compile = ours["prefix_compile_s"] + sum(b["compile_s"] for b in bs)
    ours_first = ours["prefix_total_s"] + sum(b["total_s"] for b in bs)  # = a fresh run_sweep's work
    hf_prefill = sum(r["time_prefill_s"] for r in hf)
    hf_decode = sum(r["time_decode_s"] for r in hf)
    hf_score = sum(r["time_score_s"] for r in hf)
    hf_total = hf_prefill + hf_decode + hf_score
    hf_steps = sum(r["steps"] for r in hf)
    ours_steps_rows = sum(b["steps"] for b in bs)

    # 5b. prefill throughput (isolated, compiled, best of N)
    n_params = non_embedding_params(model.params)
    pf_flops = pf_time = 0.0
    pf_tokens = pf_exec_tokens = 0
    shape_lines = []
    for sh in ours["prefill_shapes"]:
        fl, tok, _ = prefill_flops(cfg, n_params, sh["real_spans"])
        count = sum(1 for b in bs if (b["rows"], b["prefill_width"], b["cache_size"]) ==
                    (sh["rows"], sh["width"], sh["cache_size"]))
        # batches of one shape share a program; their real spans differ little: weight by the measured one
        pf_flops += fl * count
        pf_time += sh["best_s"] * count
        pf_tokens += tok * count
        pf_exec_tokens += sh["executed_tokens"] * count
        sh["flops"], sh["tokens"] = fl, tok
        sh["flops_per_s"] = fl / sh["best_s"]
        shape_lines.append(f"rows={sh['rows']} width={sh['width']} S={sh['cache_size']}: {tok} real tokens "
                           f"({sh['executed_tokens']} executed), {fl / 1e9:.1f} GFLOP in {sh['best_s']:.3f}s = "
                           f"{sh['flops_per_s'] / 1e9:.1f} GFLOP/s = {sh['flops_per_s'] / mm_jax['flops']:.1%} of jax peak"
                           f" (compile {sh['compile_s']:.1f}s)")
    pf_rate = pf_flops / pf_time if pf_time else 0.0
    pf_frac = pf_rate / mm_jax["flops"]
    pre_fl, pre_tok, _ = prefill_flops(cfg, n_params, [(0, ours["prefix_tokens"])])
    pre_rate = pre_fl / ours_prefix if ours_prefix else 0.0
    # HF prefill throughput, for reference (all prompt tokens but the last, batch 1)
    hf_fl, hf_tok, _ = prefill_flops(cfg, n_params, [(0, r["prompt_tokens"] - 1) for r in hf])
    hf_pf_rate = hf_fl / hf_prefill

    ratio_steady = hf_total / ours_steady
    ratio_first = hf_total / ours_first
    goal_top = same_set and same_order
    goal_speed = ratio_steady >= 3.0
    goal_speed_first = ratio_first >= 3.0
    goal_prefill = pf_frac >= 0.5
    wall = time.perf_counter() - t_start

    def pct(x, tot):
        return f"{x:.2f}s ({x / tot:.0%})" if tot else f"{x:.2f}s"

    g = lambda v: f"{v / 1e9:.1f} GFLOP/s"  # noqa: E731
    lines = [
        "=" * 100, "RESULTS", "=" * 100,
        f"command: python -m benchmarks.sweep_vs_hf {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} with {torch_threads} threads "
        f"({'--torch-threads' if args.torch_threads else 'torch default = all cores'}), transformers "
        f"{__import__('transformers').__version__}",
        f"load average (1/5/15 min): start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
        f"ours {load_ours0[0]:.2f}->{load_ours1[0]:.2f}, hf {load_hf0[0]:.2f}->{load_hf1[0]:.2f}, end {_load()} "
        "(loads > 0 before we start = other processes compete for the cores)",
        f"model: {model.name} fp32, {L} layers x {H} heads (kv {cfg.num_kv_heads}, head_dim {cfg.head_dim}), "
        f"{n_params / 1e6:.2f}M non-embedding params",
        f"grid: lengths {list(config.sweep.lengths)} x depths {list(config.sweep.depths)} x "
        f"{len({i.needle_index for i in instances})} needles = {len(instances)} instances; batch_size "
        f"{config.sweep.batch_size}, pad_multiple {config.sweep.pad_multiple}, prefill_chunk {spec.prefill_chunk}, "
        f"max_new_tokens {spec.max_new_tokens}, faithful {config.sweep.faithful}, {len(spec.stop_tokens)} stop tokens "
        f"(spec.stop_tokens, used by both sides)",
        "",
        "-- agreement (ours vs HF baseline, same prompt ids) --",
        f"generated tokens identical: {len(hf) - len(mismatched_tokens)}/{len(hf)}"
        + (f" (differ: {mismatched_tokens})" if mismatched_tokens else ""),
        f"per-head per-test score max |diff|: {score_diff:.3g} (over tests with identical tokens: "
        f"{score_diff_same_tokens:.3g})",
        f"ROUGE kept flags identical: {len(hf) - len(kept_mismatch)}/{len(hf)}"
        + (f" (differ: {kept_mismatch})" if kept_mismatch else "")
        + f"; kept ours {sum(r['kept'] for r in ours_list)}, hf {sum(r['kept'] for r in hf)}",
        f"head means (over kept tests) max |diff|: {mean_diff:.3g}",
        f"top-{args.top} overlap |ours & hf|/{args.top}: {overlap:.2f}; same set: {same_set}; same order: {same_order}"
        + ("; NOTE: exact ties at the top-k boundary" if ties_at_boundary else ""),
        f"top-{args.top} ours: {', '.join(f'{k}:{m_ours[k]:.3f}' for k in top_ours)}",
        f"top-{args.top} hf:   {', '.join(f'{k}:{m_hf[k]:.3f}' for k in top_hf)}",
        "",
        "-- wall time (model loading, planning and stop-token setup excluded on both sides) --",
        f"HF baseline total: {hf_total:.2f}s = prefill {pct(hf_prefill, hf_total)} + decode {pct(hf_decode, hf_total)}"
        f" + scoring {pct(hf_score, hf_total)}; {hf_steps} decode steps (batch 1) = "
        f"{hf_decode / max(hf_steps, 1) * 1e3:.1f} ms/step incl. attentions; prefill {hf_tok} tokens at {g(hf_pf_rate)}",
        f"ours total without compile: {ours_steady:.2f}s = shared prefix {pct(ours_prefix, ours_steady)} + "
        f"batch prefill {pct(ours_prefill - ours_prefix, ours_steady)} + decode {pct(ours_decode, ours_steady)} + "
        f"scoring {pct(ours_score, ours_steady)}",
        f"ours total with compile (a fresh run_sweep's work): {ours_first:.2f}s = the above + compile "
        f"{pct(ours_compile, ours_first)} (shared-prefix prefill {ours['prefix_compile_s']:.2f}s, batches "
        f"{sum(b['compile_s'] for b in bs):.2f}s; programs: generate {ours['generate_programs']}, copy_counts "
        f"{ours['copy_counts_programs']}, prefix prefill {ours['prefix_programs']})",
        f"ours where the time goes (with compile): prefill {ours_prefill / ours_first:.0%}, decode "
        f"{ours_decode / ours_first:.0%}, scoring {ours_score / ours_first:.0%}, compile {ours_compile / ours_first:.0%}",
        f"ours decode: {ours_steps_rows} while-loop steps over {len(bs)} batches = "
        f"{ours_decode / max(ours_steps_rows, 1) * 1e3:.1f} ms/step for {config.sweep.batch_size} rows "
        f"({ours_decode / max(ours_steps_rows, 1) / config.sweep.batch_size * 1e3:.1f} ms per row-step; "
        f"{ours_steps_rows * config.sweep.batch_size} row-steps computed for {sum(len(r['generated']) for r in ours_list)} "
        f"tokens kept)",
        "ours per batch: " + "; ".join(
            f"#{b['batch']} L={b['length']} P={b['P']} width={b['prefill_width']} S={b['cache_size']} steps={b['steps']}: "
            f"total {b['total_s']:.2f}s = compile {b['compile_s']:.2f}s + prefill ~{b['prefill_s']:.2f}s + "
            f"decode ~{b['decode_s']:.2f}s + scoring {b['score_s']:.2f}s" for b in bs),
        f"wall-time ratio HF / ours: {ratio_steady:.2f}x without our compile, {ratio_first:.2f}x with it",
        *([("torch thread check (longest prompt, outside the totals): " + "; ".join(
            f"{pr['threads']} thread(s): prefill {pr['prefill_s']:.2f}s, decode {pr['step_s'] * 1e3:.1f} ms/step"
            for pr in probes)
            + (" -> 1 thread is FASTER: the machine is contended and the default-thread baseline is inflated"
               if probes[1]["prefill_s"] + 20 * probes[1]["step_s"] < probes[0]["prefill_s"] + 20 * probes[0]["step_s"]
               else " -> the default thread count is not slower than 1 thread"))] if probes else []),
        "",
        "-- prefill throughput vs fp32 matmul peak --",
        f"matmul peak ({args.matmul_n}x{args.matmul_n} fp32, best of {args.matmul_repeats}, 2n^3/t): jax "
        f"{g(mm_jax['flops'])} ({mm_jax['best_s'] * 1e3:.1f} ms; the better of {g(mm_jax_first['flops'])} at the "
        f"start and {g(ours['matmul_jax_2']['flops'])} just before the isolated prefill), torch "
        f"{g(mm_torch['flops'])} ({mm_torch['best_s'] * 1e3:.1f} ms)",
        "prefill FLOPs = 2 * N_nonembed * tokens + 4 * layers * heads * head_dim * sum_over_prefilled_tokens(keys "
        "attended = position + 1); only the real tokens after the shared prefix (padding rows/columns not counted); "
        f"N_nonembed = {n_params}",
        *[f"isolated prefill {s_}" for s_ in shape_lines],
        f"our batch prefill (isolated, compiled, best of {args.prefill_repeats}): {pf_tokens} tokens "
        f"({pf_exec_tokens} executed incl. padding), {pf_flops / 1e9:.1f} GFLOP in {pf_time:.3f}s = {g(pf_rate)} = "
        f"{pf_frac:.1%} of jax matmul peak ({pf_rate / mm_torch['flops']:.1%} of torch's)",
        f"shared-prefix prefill (steady, batch 1): {pre_tok} tokens, {pre_fl / 1e9:.1f} GFLOP in {ours_prefix:.3f}s = "
        f"{g(pre_rate)} = {pre_rate / mm_jax['flops']:.1%} of jax peak",
        f"HF prefill for reference: {hf_fl / 1e9:.1f} GFLOP in {hf_prefill:.2f}s = {g(hf_pf_rate)} = "
        f"{hf_pf_rate / mm_torch['flops']:.1%} of torch peak",
        "",
        "-- goals --",
        f"identical top-{args.top} heads (set and order): {'PASS' if goal_top else 'FAIL'} "
        f"(overlap {overlap:.2f}, same set {same_set}, same order {same_order})",
        f"ours >= 3x faster than the baseline: {'PASS' if goal_speed else 'FAIL'} without compile ({ratio_steady:.2f}x); "
        f"{'PASS' if goal_speed_first else 'FAIL'} with compile ({ratio_first:.2f}x)",
        f"prefill >= 50% of matmul peak: {'PASS' if goal_prefill else 'FAIL'} ({pf_frac:.1%})",
        f"benchmark wall time: {wall:.0f}s",
        "=" * 100,
    ]
    print("\n".join(lines), flush=True)

    if args.json:
        dump = {"args": vars(args), "config_path": config_path, "matmul_jax": mm_jax, "matmul_torch": mm_torch,
                "torch_threads": torch_threads, "torch_probes": probes,
                "ours": {k: v for k, v in ours.items() if k != "results"},
                "ours_results": [{k: r[k] for k in ("key", "generated", "response", "rouge1_recall", "kept", "scores")}
                                 for r in ours_list],
                "hf_results": hf, "top_ours": top_ours, "top_hf": top_hf,
                "summary": {"hf_total_s": hf_total, "ours_steady_s": ours_steady, "ours_first_s": ours_first,
                            "ours_compile_s": ours_compile, "ratio_steady": ratio_steady, "ratio_first": ratio_first,
                            "prefill_fraction_of_peak": pf_frac, "score_max_abs_diff": score_diff,
                            "mean_max_abs_diff": mean_diff, "top_overlap": overlap}}
        Path(args.json).write_text(json.dumps(dump, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
