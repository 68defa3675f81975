"""Calibration of the time projection (rhead_jax.dryrun.projection) on this CPU: the SmolLM2 sweep
projected with this machine's own roofline (the jax-measured fp32 matmul peak and memory
bandwidth, measured in this process) against the same sweep measured phase by phase.

    python -m benchmarks.projection [--workdir /tmp/calib] [--config smollm2_135m.py]

Phases: the shared prefix's prefill (Runner.prefill), the batches' cache set-ups (Runner.rows /
init_cache), the row blocks' prefill calls (Runner.prefill_block) and the decode loops
(Runner.decode), each timed to completion (block_until_ready) with the XLA compile time that fell
inside it taken out (jax.monitoring's backend-compile events) and reported as its own line. The
decode phase is projected twice: at max_new_tokens steps per batch (what the dry run counts) and at
the steps the batches really took. Prints predicted / measured per phase: the share of this
machine's roofline the sweep reaches (docs/accel.md says what it means for the TPU figures).
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_135m.py")
    ap.add_argument("--workdir", default="", help="sweep workdir (default: a fresh temporary directory)")
    args = ap.parse_args()

    import jax
    import numpy as np

    from benchmarks.kernels import matmul_peak, memory_bandwidth
    from rhead_jax import detection, runner as runner_lib
    from rhead_jax.config import resolve_config_path, validate
    from rhead_jax.dryrun.memory import params_bytes
    from rhead_jax.dryrun.planner import grid_programs
    from rhead_jax.dryrun.projection import PHASES, CallCost, project

    peak, bandwidth = matmul_peak(), memory_bandwidth()
    print(f"this CPU (loaded machine): fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, memory bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (jax-measured, best of 5)", flush=True)

    compile_s = [0.0]

    def on_event(event, duration, **_):
        if "backend_compile" in event:
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    measured = collections.defaultdict(float)
    calls = collections.Counter()
    decode_steps = [0]
    as_run = collections.defaultdict(list)     # phase -> the calls' shapes, for their own projection

    def shapes(name, a, out):
        """(kind, args) of CallCost for one runner call as it ran."""
        if name == "prefill":                                # the shared prefix: [1, n] in calls of the chunk
            tokens, cache, spec = a[0], a[2], a[3]
            n, w = tokens.shape[1], min(spec.prefill_chunk, tokens.shape[1])
            return [("prefill", (w, i * w, cache.size)) for i in range(-(-n // w))]
        if name == "prefill_block":
            cache, positions = a[0], np.asarray(a[3])
            real = positions[positions >= 0]
            return [("prefill", (positions.shape[1], int(real.min()) if real.size else 0, cache.size))]
        if name == "rows":
            return [("setup", (len(a[1]), a[2]))]
        if name == "init_cache":
            return [("setup", (a[0], a[1]))]
        steps = int(np.max(np.asarray(out.num_tokens)))
        return [("decode_step", (a[2].k.shape[1], a[2].size))] * steps

    def timed(phase, name, method):
        def wrapper(self, *a, **k):
            c0, t0 = compile_s[0], time.perf_counter()
            out = jax.block_until_ready(method(self, *a, **k))
            measured[phase] += time.perf_counter() - t0 - (compile_s[0] - c0)
            measured["compile"] += compile_s[0] - c0
            calls[phase] += 1
            as_run[phase] += shapes(name, a, out)
            if phase == "decode":
                decode_steps[0] += int(np.max(np.asarray(out.num_tokens)))
            return out
        return wrapper

    R = runner_lib.Runner
    for phase, name in (("shared prefix", "prefill"), ("cache set-up", "rows"), ("cache set-up", "init_cache"),
                        ("prefill", "prefill_block"), ("decode", "decode")):
        setattr(R, name, timed(phase, name, getattr(R, name)))

    import importlib.util
    spec = importlib.util.spec_from_file_location("calib_config", resolve_config_path(args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = validate(module.get_config())
    workdir = args.workdir or tempfile.mkdtemp(prefix="calib_")
    t0 = time.perf_counter()
    detection.run_sweep(config, workdir)
    total = time.perf_counter() - t0

    from rhead_jax.checkpoints import load_model
    cfg = load_model(config.model.path).cfg
    s = config.sweep
    sizes = {"data": 1, "model": 1, "expert": 1}
    nbytes = 4 if cfg.dtype == "float32" else 2
    from rhead_jax.needle.haystack import load_needles
    kw = dict(sizes=sizes, chips=1, peak_flops=peak, hbm_bandwidth=bandwidth, lengths=s.lengths, depths=s.depths,
              needles=len(load_needles(config.needles or None)), batch_size=s.batch_size, prefill_chunk=s.prefill_chunk,
              q_chunk=s.q_chunk, k_chunk=s.k_chunk, pad_multiple=s.pad_multiple, share_prefix=s.share_prefix,
              kernel="chunked", params_bytes=params_bytes(cfg, sizes), dtype_bytes=nbytes,
              programs=grid_programs(config)["bound"])
    proj = project(cfg, max_new_tokens=s.max_new_tokens, **kw)
    batches = proj.phases["decode"].calls // s.max_new_tokens
    real_steps = project(cfg, max_new_tokens=max(1, round(decode_steps[0] / max(batches, 1))), **kw)
    print(f"\nSmolLM2 sweep ({args.config}, {cfg.dtype}), measured on this loaded 2-core machine: {total:.1f} s "
          f"in all (loading and scoring included)")
    print(f"{'phase':16s}{'calls proj/meas':>18s}{'predicted s':>13s}{'measured s':>12s}{'predicted/measured':>20s}")
    for phase in PHASES:
        p = proj.phases[phase]
        m = measured[phase]
        print(f"{phase:16s}{p.calls:>9d}/{calls[phase]:<8d}{p.seconds:13.2f}{m:12.2f}{p.seconds / m if m else 0:20.3f}")
    p = real_steps.phases["decode"]
    print(f"{'decode (steps)':16s}{p.calls:>9d}/{decode_steps[0]:<8d}{p.seconds:13.2f}{measured['decode']:12.2f}"
          f"{p.seconds / measured['decode']:20.3f}   (projected at the steps the batches took)")
    # the calls as they ran (the engine's real prefix branches, pieces, starts and decode steps):
    # the roofline of each, against the same measured time
    cost = CallCost(cfg, sizes=sizes, kernel="chunked", q_chunk=s.q_chunk, k_chunk=s.k_chunk,
                    params_bytes=kw["params_bytes"], dtype_bytes=nbytes)
    print("the calls as they ran, each at this machine's roofline:")
    for phase in PHASES:
        pred = sum(max(f / peak, b / bandwidth) for f, b in (getattr(cost, kind)(*x) for kind, x in as_run[phase]))
        m = measured[phase]
        print(f"{phase:16s}{len(as_run[phase]):>9d} calls {pred:13.2f}{m:12.2f}{pred / m if m else 0:20.3f}")
    run_p = sum(proj.phases[ph].seconds for ph in PHASES)
    run_m = sum(measured[ph] for ph in PHASES)
    print(f"{'all phases':16s}{'':18s}{run_p:13.2f}{run_m:12.2f}{run_p / run_m:20.3f}")
    print(f"{'compile':16s}{'':18s}{'':13s}{measured['compile']:12.2f}   (XLA backend compiles, "
          f"{proj.grid['programs']} "
          "programs at most)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
