"""The README's sweep command against a straightforward PyTorch run of the original method, as
whole processes, one after the other in this invocation (never a timed unit test).

    python -m benchmarks.sweep_vs_original                          # SmolLM2, the original's needles
    python -m benchmarks.sweep_vs_original --haystack /tmp/kjv.txt  # the original's 4.4 MB haystack
    python -m benchmarks.sweep_vs_original --runs 3 --json /tmp/bench.json
    python -m benchmarks.sweep_vs_original --config smollm2_135m.py -- --config.sweep.lengths='(500,)'
    make bench      # ours from the user's venv without torch (.venv-user), the baseline from .venv

The original's haystack (4.4 MB, the King James Bible) is Debian's `bible-kjv` text:
`apt-get install bible-kjv && bible -f gen1:1-rev22:21 > /tmp/kjv.txt` (4,404,412 bytes). Without
`--haystack` both sides use the bundled one (Areopagitica, 100 KB).

Ours runs with `--ours_python` (default: this interpreter). Run it from a venv without torch, as a
user or a TPU VM installs rhead_jax: with torch installed, transformers' tokenizer imports it,
which costs ours ~240 MiB of RSS for nothing.

Each run is a subprocess, timed from outside (wall time, CPU time, peak RSS of that process from
os.wait4), in this order:
  1. baseline  `python -m benchmarks.hf_baseline`: the original's design as it runs, batch 1,
               the prefill forward with fused attention (SDPA, flash-attn's CPU stand-in; the last
               position's logits only), the decode steps eager with output_attentions, the
               original's Python copy test, torch's default thread count. The ratios are against
               this row: it is the program the original's users run.
  2. eager     the same with an eager prefill too (`--prefill_attn=eager`, the slower all-eager
               variant; `--baselines sdpa` skips it)
  3. cold      `python -m rhead_jax.sweep` with an empty JAX compilation cache
  4. warm      `python -m rhead_jax.sweep` again, a fresh workdir, the cache the cold run filled
Every side gets the same config, overrides and instances; the benchmark checks that the two
baselines give identical generations and head_scores.json, that ours agrees with the baseline, and
prints the ratios baseline / ours, then where each run's wall time went (prefill, decode, the rest)
from the runs' own logs. More of where our time goes is in the sweep's log (engine: planning, time
to the first batch, shared prefix, batches; compiled programs), kept with `--logs DIR`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


_OURS_PHASES = re.compile(r"time in shared prefix ([\d.]+)s, prefill ([\d.]+)s, decode ([\d.]+)s for (\d+) steps "
                          r"\((\d+) row-steps\)")
_HF_PHASES = re.compile(r"prefill ([\d.]+)s, decode ([\d.]+)s, copy test ([\d.]+)s")


def phases(log_text: str, wall_s: float) -> dict | None:
    """Where a run's wall time went, from its own log: {"prefill", "decode", "rest"} seconds (rest:
    start-up, planning, compiles outside the phases, scoring, writing), plus "steps" and
    "row_steps" of our decode loop; None when the log has no phase line. Ours logs `time in shared
    prefix A s, prefill B s, decode C s for N steps (M row-steps)` (rhead_jax.engine; the shared
    prefix counts as prefill here); the baseline `prefill B s, decode C s, copy test D s`
    (benchmarks.hf_baseline: one row a step, so its steps are its row-steps)."""
    m = _OURS_PHASES.search(log_text)
    if m:
        pre, dec = float(m.group(1)) + float(m.group(2)), float(m.group(3))
        got = {"prefill": pre, "decode": dec, "steps": int(m.group(4)), "row_steps": int(m.group(5))}
    else:
        m = _HF_PHASES.search(log_text)
        if not m:
            return None
        pre, dec = float(m.group(1)), float(m.group(2))
        got = {"prefill": pre, "decode": dec, "steps": None, "row_steps": None}
    return {**got, "rest": wall_s - pre - dec}


def median_phases(runs: list[dict | None]) -> dict | None:
    """The per-key median of several runs' `phases` (None if any run lacks them)."""
    if not runs or any(r is None for r in runs):
        return None
    return {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]}


def print_phases(names: list[str], got: dict[str, dict | None]) -> None:
    """The phase table: seconds per phase of each run and the baseline's over ours."""
    base = got.get(names[0])
    rows = [n for n in names if got.get(n)]
    if not base or len(rows) < 2:
        return
    print("\nwhere the wall time went (from each run's log; prefill includes our shared prefix; rest = start-up, "
          "planning, scoring, writing, and compiles outside the phases)")
    print(f"{'':>10} " + " ".join(f"{n:>14}" for n in rows))
    for key in ("prefill", "decode", "rest"):
        cells = [f"{got[n][key]:7.1f} s" + (f" {base[key] / got[n][key]:4.1f}x" if n != names[0] and got[n][key] > 0
                                            else " " * 6) for n in rows]
        print(f"{key:>10} " + " ".join(f"{c:>14}" for c in cells))
    ours = next((got[n] for n in rows if got[n]["steps"]), None)
    if ours:
        print(f"decode loop: ours {ours['steps']} steps for {ours['row_steps']} row-steps "
              f"({1e3 * ours['decode'] / ours['steps']:.0f} ms a step); the baseline one row a step")


def same_scores(a_dir: Path, b_dir: Path) -> bool:
    """Identical generations and head_scores.json (byte for byte) of two runs."""
    gen = [[json.loads(x)["generated"] for x in (d / "results.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    return gen[0] == gen[1] and (a_dir / "head_scores.json").read_bytes() == (b_dir / "head_scores.json").read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_135m.py")
    ap.add_argument("--needles", default=str(ORIGINAL_NEEDLES) if ORIGINAL_NEEDLES.exists() else "",
                    help="needles file (default: the original's three, ../shared/reference/needles.jsonl)")
    ap.add_argument("--haystack", default="", help="haystack .txt file or directory for both sides (default: the "
                    "bundled one); the original's is Debian's bible-kjv text (module docstring)")
    ap.add_argument("--baselines", default="sdpa,eager",
                    help="HF prefill attentions to run, the first is the ratios' baseline (sdpa: the original's design)")
    ap.add_argument("--logs", help="copy every process's log here")
    ap.add_argument("--ours_python", default=sys.executable,
                    help="the interpreter of our sweep (a venv without torch, like a user's)")
    ap.add_argument("--runs", type=int, default=1, help="repeat baseline/cold/warm this many times; medians")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="more --config.* overrides for both sides (after --)")
    args = ap.parse_args()
    if args.haystack and not Path(args.haystack).exists():
        print(f"error: --haystack {args.haystack} does not exist; give a .txt file or directory (module docstring)",
              file=sys.stderr)
        return 2
    common = [f"--config={args.config}", *([f"--config.needles={args.needles}"] if args.needles else []),
              *([f"--config.haystack={Path(args.haystack).resolve()}"] if args.haystack else []), *args.overrides]
    attns = args.baselines.split(",")
    if not attns or any(a not in ("sdpa", "eager") for a in attns) or len(set(attns)) < len(attns):
        print(f"error: --baselines {args.baselines!r}: give sdpa and/or eager, comma-separated, the ratios' baseline "
              "first", file=sys.stderr)
        return 2
    names = ["baseline" if a == attns[0] else f"hf {a}" for a in attns] + ["cold", "warm"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    agree = baselines_agree = None
    with tempfile.TemporaryDirectory(prefix="sweep_vs_original_") as tmp:
        tmp = Path(tmp)
        for run in range(args.runs):
            d = tmp / f"run{run}"
            d.mkdir()
            jax_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache")}
            hf = [(n, [sys.executable, "-m", "benchmarks.hf_baseline", *common, f"--prefill_attn={a}",
                       f"--workdir={d / ('hf_' + a)}"], env) for n, a in zip(names, attns)]
            for name, cmd, e in (
                    *hf,
                    ("cold", [args.ours_python, "-m", "rhead_jax.sweep", *common, f"--workdir={d / 'cold'}"], jax_env),
                    ("warm", [args.ours_python, "-m", "rhead_jax.sweep", *common, f"--workdir={d / 'warm'}"], jax_env)):
                log = d / f"{name.replace(' ', '_')}.log"
                r = timed(cmd, e, log)
                r["phases"] = phases(log.read_text(errors="replace"), r["wall_s"])
                rows[name].append(r)
                if args.logs:
                    Path(args.logs).mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, Path(args.logs) / f"run{run}_{log.name}")
                print(f"run {run + 1}/{args.runs} {name:>8}: wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
            agree = agreement(d / f"hf_{attns[0]}", d / "cold")
            baselines_agree = all(same_scores(d / f"hf_{attns[0]}", d / f"hf_{a}") for a in attns[1:])
            assert (d / "cold" / "head_scores.json").read_bytes() == (d / "warm" / "head_scores.json").read_bytes()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "phases"} for n, rs in rows.items()}
    b = med["baseline"]
    print(f"\nSmolLM2 sweep vs the original method in PyTorch ({args.runs} run(s), medians; {agree['tests']} tests; "
          f"haystack {args.haystack or 'bundled'}; load {os.getloadavg()[0]:.1f} at the end)\n"
          f"baseline: HF {attns[0]} prefill + eager decode with attentions (the ratios' denominator)")
    print(f"{'':>10} {'wall s':>8} {'cpu s':>8} {'peak RSS GiB':>13} {'speed-up':>9} {'RSS ratio':>10}")
    for n in names:
        m = med[n]
        print(f"{n:>10} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['peak_rss_gib']:13.2f} "
              f"{b['wall_s'] / m['wall_s']:8.2f}x {m['peak_rss_gib'] / b['peak_rss_gib']:9.2f}x")
    print(f"agreement: {agree['identical_tokens']}/{agree['tests']} identical generations, same heads and kept "
          f"tests: {agree['same_heads_and_tests']}, max per-test score difference {agree['max_score_diff']:g}")
    print_phases(names, {n: median_phases([r["phases"] for r in rs]) for n, rs in rows.items()})
    if len(attns) > 1:
        print(f"HF baselines {' / '.join(attns)}: identical generations and head_scores.json: {baselines_agree}")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "runs": rows, "agreement": agree,
                                               "baselines_agree": baselines_agree}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
