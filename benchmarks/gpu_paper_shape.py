"""Our sweep against the original's design on one GPU, at a paper model's shape with random weights.

    python -m benchmarks.gpu_paper_shape --tokenizer DIR --out /tmp/gpu            # Llama-2-7B shape, bf16
    python -m benchmarks.gpu_paper_shape --tokenizer DIR --out /tmp/gpu --shape tiny --lengths 2000,4000

Timings need no trained weights: a random-weight model of the paper's shape runs the same
programs. Real weights do not travel to a lent GPU, so this command writes them: a
`LlamaForCausalLM` of the shape (Llama-2-7B: 32 layers, 32 heads, hidden 4,096, MLP 11,008; the
vocabulary is the tokenizer's given with --tokenizer, e.g. SmolLM2's 49,152) with transformers'
own initialisation, saved in bf16 as a sharded HF checkpoint. Then, as whole processes, one after
the other, every side on the same config, needles and instances:

  1. baseline  `python -m benchmarks.hf_baseline --device cuda --dtype bfloat16`: the original's
               design as it runs (prefill with fused attention, SDPA: on an H100/H200 in bf16 it
               dispatches to its FlashAttention kernel; the last position's logits only; decode
               steps eager with output_attentions; the Python copy test; batch 1);
  2. cold      `python -m rhead_jax.sweep` (config.sweep.attention="auto": cuDNN's fused attention
               for the prefill on GPU) with an empty JAX compilation cache;
  3. warm      the same again, a fresh workdir, the compilation cache the cold run filled.

Random weights answer nothing, so the ROUGE gate keeps no test: the sweep ends with its `error:`
line (exit 2) after writing its results, which this benchmark expects. Every test decodes the
whole `max_new_tokens` unless the random model happens to emit a stop token; the step counts of
both sides are printed (in bf16 the two programs' greedy tokens may part after a few steps, so
the steps can differ; the per-step times are comparable either way).

Printed and written to --out/gpu_paper_shape.json: wall time of each process, prefill and decode
time and steps from each side's own log/results, the GPU's peak allocated memory of each side,
and the ratios baseline / ours.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {   # name -> (layers, heads, kv heads, hidden, mlp)
    "llama2-7b": (32, 32, 32, 4096, 11008),
    "tiny": (2, 4, 2, 64, 128),
}

CONFIG_TEMPLATE = '''"""Written by benchmarks.gpu_paper_shape."""
from rhead_jax.config import default_config


def get_config():
    c = default_config()
    c.model.path = {path!r}
    c.model.name = {name!r}
    c.model.dtype = "bfloat16"
    c.model.chat = False
    c.needles = {needles!r}
    c.sweep.lengths = {lengths!r}
    c.sweep.depths = {depths!r}
    c.sweep.max_new_tokens = {max_new_tokens!r}
    c.sweep.batch_size = 1
    c.sweep.share_prefix = {share_prefix!r}
    c.sweep.prefill_chunk = {prefill_chunk!r}
    return c
'''


def make_checkpoint(model_dir: Path, tokenizer_dir: Path, shape: str, max_positions: int) -> dict:
    """A random-weight Llama of `shape` in bf16 (sharded safetensors + config + tokenizer)."""
    import torch
    import transformers

    if (model_dir / "config.json").exists():
        return json.loads((model_dir / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    layers, heads, kv, hidden, mlp = SHAPES[shape]
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_positions,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = "bfloat16"
    model.save_pretrained(str(model_dir), max_shard_size="4GB", safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    n = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {shape} {n / 1e9:.2f}B params (bf16) written to {model_dir} in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    del model
    return cfg.to_dict()


def run(cmd: list[str], env: dict, log: Path, ok_codes=(0,)) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    print(f"  {' '.join(cmd[2:4])}: exit {rc} in {wall:.1f}s (log {log})", flush=True)
    if rc not in ok_codes:
        print(log.read_text()[-4000:], flush=True)
    return {"rc": rc, "wall_s": wall, "ok": rc in ok_codes}


def ours_main(argv: list[str]) -> None:
    """`--stage ours`: the sweep in this process; its accelerator's peak memory into $GPU_PEAK_JSON."""
    import runpy

    import jax

    from rhead_jax import detection

    run_sweep = detection.run_sweep

    def measured(*a, **k):   # rhead_jax.sweep imports run_sweep from rhead_jax.detection when it runs
        try:
            return run_sweep(*a, **k)
        finally:
            d = jax.local_devices()[0]
            stats = d.memory_stats() or {}
            Path(os.environ["GPU_PEAK_JSON"]).write_text(json.dumps(
                {"peak_bytes": stats.get("peak_bytes_in_use"), "platform": jax.default_backend(),
                 "device": str(d.device_kind)}))
    detection.run_sweep = measured
    sys.argv = ["rhead_jax.sweep"] + argv
    runpy.run_module("rhead_jax.sweep", run_name="__main__")


def ours_phases(log_text: str) -> dict:
    """Prefill / decode seconds and decode steps from the sweep's results and log."""
    out = {}
    m = re.search(r"time in shared prefix ([\d.]+)s, prefill ([\d.]+)s, decode ([\d.]+)s for (\d+) steps", log_text)
    if m:
        out.update(time_prefill_s=float(m.group(1)) + float(m.group(2)), time_decode_s=float(m.group(3)),
                   decode_steps=int(m.group(4)))
    m = re.search(r"first batch starts ([\d.]+)s after the model was loaded", log_text)
    if m:
        out["first_batch_after_load_s"] = float(m.group(1))
    return out


def results_summary(workdir: Path) -> dict:
    """Tests and decode steps from a side's results.jsonl, and the per-test phase times where it has
    them (the baseline's; ours come from its log: ours_phases)."""
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines() if line.strip()]
    out = {"tests": len(rows), "steps": [len(r.get("generated", [])) for r in rows]}
    for k in ("time_prefill_s", "time_decode_s"):
        if rows and k in rows[0]:
            out[k] = sum(r[k] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("all", "ours"), default="all")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer dir (tokenizer.json, tokenizer_config.json)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_paper_shape"))
    ap.add_argument("--model_dir", type=Path, default=None, help="default: OUT/model")
    ap.add_argument("--lengths", default="32000,100000")
    ap.add_argument("--depths", default="50")
    ap.add_argument("--max_new_tokens", type=int, default=50)
    ap.add_argument("--prefill_chunk", type=int, default=8192)
    ap.add_argument("--sides", default="baseline,cold,warm")
    ap.add_argument("--share_prefix", action="store_true", help="our sweep shares the haystack prefix of the "
                    "grid's prompts (config.sweep.share_prefix; off by default: it holds one more cache row)")
    args, rest = ap.parse_known_args()
    if args.stage == "ours":
        return ours_main(rest)
    if args.tokenizer is None or not (args.tokenizer / "tokenizer.json").exists():
        sys.exit("error: --tokenizer must name a directory with tokenizer.json (e.g. SmolLM2's)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = (args.model_dir or out / "model").resolve()
    lengths = tuple(int(x) for x in args.lengths.split(","))
    depths = tuple(int(x) for x in args.depths.split(","))
    max_positions = max(lengths) + 4096
    t0 = time.perf_counter()
    cfg = make_checkpoint(model_dir, args.tokenizer, args.shape, max_positions)
    t_make = time.perf_counter() - t0

    from rhead_jax.needle.haystack import DEFAULT_NEEDLES_PATH

    needles = out / "needles.jsonl"   # one needle: one test per (length, depth)
    needles.write_text(DEFAULT_NEEDLES_PATH.read_text().splitlines()[0] + "\n")
    config = out / "paper_shape.py"
    config.write_text(CONFIG_TEMPLATE.format(path=str(model_dir), name=f"random {args.shape}",
                                             needles=str(needles), lengths=lengths, depths=depths,
                                             max_new_tokens=args.max_new_tokens,
                                             prefill_chunk=args.prefill_chunk, share_prefix=args.share_prefix))
    # JAX's own GPU memory fraction (75%): at 0.9 of an H200, cuBLAS and cuDNN could not create
    # their handles in what was left (measured: "Failed to initialize DNN support")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RHEAD_JAX_CACHE=str(out / "cache"),
               TOKENIZERS_PARALLELISM="false")
    py = sys.executable
    report = {"shape": args.shape, "lengths": lengths, "depths": depths, "max_new_tokens": args.max_new_tokens,
              "prefill_chunk": args.prefill_chunk, "share_prefix": args.share_prefix, "checkpoint_s": t_make,
              "model": {k: cfg.get(k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size",
                                                  "intermediate_size", "vocab_size")}}
    sides = args.sides.split(",")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a rehearsal of the script
    if "baseline" in sides:
        w = out / "baseline"
        r = run([py, "-m", "benchmarks.hf_baseline", "--config", str(config), "--workdir", str(w),
                 "--device", device, "--dtype", "bfloat16"], env, out / "baseline.log")
        if r["ok"]:
            r.update(results_summary(w))
            peak = w / "gpu_peak.json"
            if peak.exists():
                r.update(json.loads(peak.read_text()))
        report["baseline"] = r
        (out / "gpu_paper_shape.json").write_text(json.dumps(report, indent=1))   # kept if a later side is cut
    for side in ("cold", "warm"):
        if side not in sides:
            continue
        w = out / side
        peak = out / f"{side}_gpu_peak.json"
        # exit 2: the sweep's no-kept-test error, expected from random weights (results are written first)
        r = run([py, "-m", "benchmarks.gpu_paper_shape", "--stage", "ours", "--config", str(config),
                 "--workdir", str(w)], dict(env, GPU_PEAK_JSON=str(peak)), out / f"{side}.log", ok_codes=(0, 2))
        if r["ok"] and (w / "results.jsonl").exists():
            r.update(results_summary(w))
            r.update(ours_phases((out / f"{side}.log").read_text()))
            if peak.exists():
                r.update(json.loads(peak.read_text()))
        report[side] = r
        (out / "gpu_paper_shape.json").write_text(json.dumps(report, indent=1))
    base = report.get("baseline", {})
    for side in ("cold", "warm"):   # greedy tokens equal to the baseline's, from the first step on
        a, b = out / "baseline" / "results.jsonl", out / side / "results.jsonl"
        if a.exists() and b.exists():
            ga = [json.loads(x)["generated"] for x in a.read_text().splitlines() if x.strip()]
            gb = [json.loads(x)["generated"] for x in b.read_text().splitlines() if x.strip()]
            report[side]["tokens_equal_prefix"] = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y),
                                                         min(len(p), len(q))) for p, q in zip(ga, gb)]
    print("\n| side | wall s | prefill s | decode s | steps | ms/step | GPU peak GiB | baseline / side |")
    print("|---|---|---|---|---|---|---|---|")
    for side in ("baseline", "cold", "warm"):
        r = report.get(side)
        if not r or not r.get("ok"):
            continue
        pk = r.get("peak_bytes")
        ratio = base["wall_s"] / r["wall_s"] if base.get("ok") else float("nan")
        print(f"| {side} | {r['wall_s']:.1f} | {r.get('time_prefill_s', float('nan')):.2f} | "
              f"{r.get('time_decode_s', float('nan')):.2f} | {sum(r.get('steps', []))} | "
              f"{1e3 * r.get('time_decode_s', float('nan')) / max(1, sum(r.get('steps', []))):.1f} | "
              f"{(pk or 0) / 2**30:.1f} | {ratio:.2f}x |")
    (out / "gpu_paper_shape.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
