"""Where the sweep's peak RSS goes, measured in one process (the README's sweep, in stages):

    python -m benchmarks.memory_breakdown --config smollm2_135m.py [--config.haystack=/tmp/kjv.txt]

  runtime    RSS after `import jax` and the CPU client (python, jaxlib, XLA:CPU);
  weights    RSS added by loading the model (params' bytes printed next to it; the tokenizer);
  plan       RSS added by planning the grid (the haystack's tokens, the instances);
  sweep      the peak RSS of the whole sweep (`rhead_jax.detection.run_sweep` on the loaded model),
             read from the kernel (VmHWM), and what it holds at the peak by construction: the
             shared prefix's cache (one row), the prefix branches' (one row each), one batch's KV
             cache (batch size x the longest length's slots); the rest of the peak is XLA's
             executables, its temporary buffers and the allocator's slack.

Prints a table (MiB and share of the peak) for docs/performance.md. Use the venv without torch
(.venv-user) to measure what a user's process holds (the default model's tokenizer no longer
imports transformers, but other tokenizers do, and with torch installed transformers imports it).

--timeline: also where the peak is. A thread reads VmRSS every 5 ms, and the runner's calls
(cache set-up, prefill, rows from the shared prefix, decode) are marked; prints each mark's RSS,
the highest RSS since the mark before, and the bytes of the live JAX arrays (params, caches) at
the mark: the top marks say which call the peak belongs to and how much of it is arrays.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import flags, logging

from rhead_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("timeline", False, "Also mark the runner's calls and print the highest RSS by call (docstring).")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mib(kib: float) -> float:
    return kib / 1024


class Timeline:
    """VmRSS sampled every 5 ms by a thread; `mark(label)` closes an interval (its highest RSS)."""

    def __init__(self):
        import threading

        self.marks: list[tuple[float, str, float, float]] = []   # (seconds, label, RSS now, max since last)
        self.t0, self.high, self.running = time.time(), 0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.running:
            self.high = max(self.high, status_kib("VmRSS"))
            time.sleep(0.005)

    def mark(self, label: str) -> None:
        now = status_kib("VmRSS")
        self.marks.append((time.time() - self.t0, label, mib(now), mib(max(self.high, now))))
        self.high = now

    def wrap_runner(self) -> None:
        """Mark before and after each runner call (outputs waited for) with the live arrays' MiB."""
        import jax

        from rhead_jax.runner import Runner

        def wrapped(name, f):
            def call(runner, *args, **kwargs):
                self.mark(f"before {name}")
                out = jax.block_until_ready(f(runner, *args, **kwargs))
                live = sum(x.nbytes for x in jax.live_arrays()) / 2 ** 20
                self.mark(f"after {name} (live arrays {live:.0f} MiB)")
                return out
            return call

        for name in ("prefix_cache", "branch_cache", "init_cache", "prefill", "prefill_block", "rows", "decode"):
            setattr(Runner, name, wrapped(name, getattr(Runner, name)))

    def report(self, top: int = 8) -> None:
        self.running = False
        print(f"\nthe {top} highest intervals (RSS MiB: the highest since the mark before, the mark's own)")
        for t, label, now, high in sorted(self.marks, key=lambda m: -m[3])[:top]:
            print(f"  {t:7.1f}s  {high:6.0f}  {now:6.0f}  {label}")


def main(argv) -> None:
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = cli.get_config()
    timeline = Timeline() if FLAGS.timeline else None
    rows: list[tuple[str, float, str]] = []
    rss = status_kib("VmRSS")
    import jax

    jax.devices()
    runtime = status_kib("VmRSS")
    rows.append(("python + JAX runtime (measured)", mib(runtime), f"{jax.__version__}, {jax.devices()[0].platform}"))
    if timeline:
        timeline.wrap_runner()

    from rhead_jax.checkpoints import load_model

    t = time.time()
    model = load_model(config.model.path, dtype=config.model.dtype)
    loaded = status_kib("VmRSS")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    rows.append(("weights + tokenizer (measured)", mib(loaded - runtime),
                 f"params {weight_bytes / 2 ** 20:.0f} MiB, loaded in {time.time() - t:.1f}s"))

    from rhead_jax.batches import round_up
    from rhead_jax.engine import Engine
    from rhead_jax.models.generate import cache_size_for

    engine = Engine(config, model)
    t = time.time()
    instances = engine.plan_needles()
    planned = status_kib("VmRSS")
    rows.append(("plan: haystack tokens, instances (measured)", mib(planned - loaded),
                 f"{len(instances)} instances in {time.time() - t:.2f}s"))

    from rhead_jax.detection import run_sweep

    t = time.time()
    with tempfile.TemporaryDirectory(prefix="memory_breakdown_") as tmp:
        run_sweep(config, tmp, model=model)
    peak = status_kib("VmHWM")
    import gc

    gc.collect()
    after = status_kib("VmRSS")          # the sweep's caches are freed: what stays is XLA's and the allocator's
    jax.clear_caches()
    gc.collect()
    cleared = status_kib("VmRSS")        # without the compiled programs
    cfg, s = model.cfg, config.sweep
    slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jax.numpy.dtype(model.params["embed"].dtype).itemsize
    spec = engine.spec(capture=True)
    longest = max(round_up(i.num_prompt_tokens, s.pad_multiple) for i in instances)
    size = cache_size_for(longest, spec)
    sizes = engine.batch_sizes(instances, spec)        # rows per batch of each length
    slots = {L: cache_size_for(max(round_up(i.num_prompt_tokens, s.pad_multiple) for i in instances if i.length == L),
                               spec) for L in sizes}
    big = max(sizes, key=lambda L: sizes[L] * slots[L])
    batch, bsize = sizes[big], slots[big]
    prefix = slot * size
    kv = slot * batch * bsize
    rows.append((f"KV cache of the largest batch ({batch} rows x {bsize} slots, length {big}, computed)",
                 kv / 2 ** 20, "rows per length " + ", ".join(f"{L}: {n}" for L, n in sizes.items())))
    rows.append((f"shared prefix cache (1 row x {size} slots, computed)", prefix / 2 ** 20, ""))
    if s.prefix_branches:
        rows.append((f"prefix branches (<= {s.prefix_branches} rows, <= {size} slots each, computed bound)",
                     slot * s.prefix_branches * size / 2 ** 20, "freed after their last instance"))
    known = mib(planned) + (kv + prefix) / 2 ** 20
    rows.append(("rest: XLA executables, temporaries, allocator (peak - the above)", mib(peak) - known,
                 "prefix branches included"))
    rows.append(("  of it, kept after the sweep (measured RSS after - before the sweep)", mib(after - planned), ""))
    rows.append(("  of that, the compiled programs (measured: jax.clear_caches())", mib(after - cleared), ""))
    logging.info("sweep in %.1fs", time.time() - t)
    print(f"\npeak RSS {mib(peak):.0f} MiB ({mib(peak) / 1024:.2f} GiB); start {mib(rss):.0f} MiB")
    print(f"{'part':<72} {'MiB':>7} {'of peak':>8}  note")
    for name, m, note in rows:
        print(f"{name:<72} {m:7.0f} {m / mib(peak):7.0%}  {note}")
    if timeline:
        timeline.report()


if __name__ == "__main__":
    cli.define_config_flag()
    cli.run(main)
