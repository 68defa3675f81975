"""Peak host memory of a sharded checkpoint load versus a full one.

Builds a synthetic ~0.8 GB fp32 llama checkpoint (safetensors, no torch), then measures the
peak RSS growth (VmHWM minus the process's RSS before loading) of:
  - one process loading everything onto one device (the full-copy baseline), and
  - two processes x 4 simulated devices (jax.distributed on 127.0.0.1), mesh model=8: each process
    reads from the memory-mapped safetensors only the slices its 4 devices hold.

    python -m benchmarks.sharded_load_memory [--workdir /tmp/shardload]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
              max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_theta=10000.0, hidden_act="silu")


def build_checkpoint(d: Path) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    if (d / "model.safetensors").exists():
        return (d / "model.safetensors").stat().st_size
    c, rng = CONFIG, np.random.default_rng(0)
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
              p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
              p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    save_file({k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CONFIG))
    return (d / "model.safetensors").stat().st_size


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(args) -> None:
    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from rhead_jax.checkpoints.hf import load_params
    from rhead_jax.sharding import make_mesh, param_shardings
    from rhead_jax.checkpoints.hf import load_config

    cfg = load_config(args.ckpt)
    shardings = None
    if args.num_processes > 1:
        mesh = make_mesh({"data": 1, "model": -1, "expert": 1})
        shardings = param_shardings(cfg, mesh)
    before = _kb("VmRSS")
    _, params = load_params(args.ckpt, cfg, shardings=shardings)
    jax.block_until_ready(params)
    local = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    print("CHILD " + json.dumps({"process": args.process_id, "rss_growth_mb": (_kb("VmHWM") - before) / 1024,
                                 "local_param_mb": local / 2**20}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/rhead_shardload")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--ckpt")
    ap.add_argument("--coordinator")
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        return child(args)
    ckpt = Path(args.workdir) / "ckpt"
    size = build_checkpoint(ckpt)
    cmd = [sys.executable, "-m", "benchmarks.sharded_load_memory", "--child", "--ckpt", str(ckpt)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def parse(out):
        return [json.loads(l[6:]) for l in out.splitlines() if l.startswith("CHILD ")]

    full = parse(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env4 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                                     "--process_id", str(i)], env=env4, stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    sharded = [parse(p.communicate()[0])[0] for p in procs]
    mb = size / 2**20
    print(f"checkpoint: {mb:.0f} MiB fp32 safetensors")
    print(f"full load, 1 process x 1 device : peak RSS growth {full['rss_growth_mb']:.0f} MiB "
          f"({full['rss_growth_mb'] / mb:.2f}x checkpoint), params held {full['local_param_mb']:.0f} MiB")
    for r in sharded:
        print(f"sharded load, process {r['process']} (4 of 8 devices, model=8): peak RSS growth "
              f"{r['rss_growth_mb']:.0f} MiB ({r['rss_growth_mb'] / mb:.2f}x checkpoint), params held "
              f"{r['local_param_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
