"""The README's sweep command against a straightforward PyTorch run of the original method, as
whole processes, one after the other in this invocation (never a timed unit test).

    python -m benchmarks.sweep_vs_original                          # SmolLM2, the original's needles
    python -m benchmarks.sweep_vs_original --runs 3 --json /tmp/bench.json
    python -m benchmarks.sweep_vs_original --config smollm2_135m.py -- --config.sweep.lengths='(500,)'
    make bench      # ours from the user's venv without torch (.venv-user), the baseline from .venv

Ours runs with `--ours_python` (default: this interpreter). Run it from a venv without torch, as a
user or a TPU VM installs rhead_jax: with torch installed, transformers' tokenizer imports it,
which costs ours ~240 MiB of RSS for nothing.

Each run is a subprocess, timed from outside (wall time, CPU time, peak RSS of that process from
os.wait4), in this order:
  1. baseline  `python -m benchmarks.hf_baseline` (HF transformers eager attention, batch 1,
               the original's Python copy test; torch's default thread count)
  2. cold      `python -m rhead_jax.sweep` with an empty JAX compilation cache
  3. warm      `python -m rhead_jax.sweep` again, a fresh workdir, the cache the cold run filled
Both sides get the same config, overrides and instances; the benchmark checks that the generated
tokens and head_scores.json agree and prints the ratios baseline / ours. Where our time goes is in
the sweep's own log (engine: shared prefix, batches; compiled programs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_NEEDLES = REPO.parent / "shared" / "reference" / "needles.jsonl"


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run cmd to completion; its wall time, user+sys CPU seconds and peak RSS (GiB)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {rc}; see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_gib": ru.ru_maxrss / 2 ** 20}


def agreement(hf_dir: Path, ours_dir: Path) -> dict:
    hf = [json.loads(x) for x in (hf_dir / "results.jsonl").read_text().splitlines()]
    ours = {r["key"]: r for r in map(json.loads, (ours_dir / "results.jsonl").read_text().splitlines())}
    tokens = sum(r["generated"] == ours[r["key"]]["generated"] for r in hf)
    a = json.loads((hf_dir / "head_scores.json").read_text())
    b = json.loads((ours_dir / "head_scores.json").read_text())
    diff = max((abs(x - y) for k in a for x, y in zip(a[k], b[k])), default=0.0)
    return {"tests": len(hf), "identical_tokens": tokens, "same_heads_and_tests": a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) for k in a), "max_score_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_135m.py")
    ap.add_argument("--needles", default=str(ORIGINAL_NEEDLES) if ORIGINAL_NEEDLES.exists() else "",
                    help="needles file (default: the original's three, ../shared/reference/needles.jsonl)")
    ap.add_argument("--ours_python", default=sys.executable,
                    help="the interpreter of our sweep (a venv without torch, like a user's)")
    ap.add_argument("--runs", type=int, default=1, help="repeat baseline/cold/warm this many times; medians")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="more --config.* overrides for both sides (after --)")
    args = ap.parse_args()
    common = [f"--config={args.config}", *([f"--config.needles={args.needles}"] if args.needles else []),
              *args.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    rows: dict[str, list[dict]] = {"baseline": [], "cold": [], "warm": []}
    agree = None
    with tempfile.TemporaryDirectory(prefix="sweep_vs_original_") as tmp:
        tmp = Path(tmp)
        for run in range(args.runs):
            d = tmp / f"run{run}"
            d.mkdir()
            jax_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache")}
            for name, cmd, e in (
                    ("baseline", [sys.executable, "-m", "benchmarks.hf_baseline", *common, f"--workdir={d / 'hf'}"], env),
                    ("cold", [args.ours_python, "-m", "rhead_jax.sweep", *common, f"--workdir={d / 'cold'}"], jax_env),
                    ("warm", [args.ours_python, "-m", "rhead_jax.sweep", *common, f"--workdir={d / 'warm'}"], jax_env)):
                r = timed(cmd, e, d / f"{name}.log")
                rows[name].append(r)
                print(f"run {run + 1}/{args.runs} {name:>8}: wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
            agree = agreement(d / "hf", d / "cold")
            assert (d / "cold" / "head_scores.json").read_bytes() == (d / "warm" / "head_scores.json").read_bytes()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}
    b = med["baseline"]
    print(f"\nSmolLM2 sweep vs the original method as PyTorch eager ({args.runs} run(s), medians; "
          f"{agree['tests']} tests, load {os.getloadavg()[0]:.1f} at the end)")
    print(f"{'':>10} {'wall s':>8} {'cpu s':>8} {'peak RSS GiB':>13} {'speed-up':>9} {'RSS ratio':>10}")
    for n in ("baseline", "cold", "warm"):
        m = med[n]
        print(f"{n:>10} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['peak_rss_gib']:13.2f} "
              f"{b['wall_s'] / m['wall_s']:8.2f}x {m['peak_rss_gib'] / b['peak_rss_gib']:9.2f}x")
    print(f"agreement: {agree['identical_tokens']}/{agree['tests']} identical generations, same heads and kept "
          f"tests: {agree['same_heads_and_tests']}, max per-test score difference {agree['max_score_diff']:g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "runs": rows, "agreement": agree}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
