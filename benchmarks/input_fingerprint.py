"""What a resume pays to check its inputs (rhead_jax.results_store.input_fingerprints): the sampled
fingerprint of a checkpoint directory vs a whole-file sha256 of the same files, in one invocation.

    python -m benchmarks.input_fingerprint                 # the embedded SmolLM2-135M-Instruct
    python -m benchmarks.input_fingerprint --model_dir /path/to/hf_checkpoint

Both read through the page cache after the first pass (the whole-file pass runs second, so a cold
cache favours the sampled one only on its first file); the ratio is what matters.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=None, help="a HF checkpoint directory (default: the embedded SmolLM2)")
    args = ap.parse_args()
    from rhead_jax.results_store import input_fingerprints

    if args.model_dir:
        d = Path(args.model_dir)
    else:
        from rhead_jax.checkpoints.gguf_import import default_model_dir

        d = default_model_dir()
    files = sorted(f for f in d.iterdir() if f.is_file())
    t = time.perf_counter()
    input_fingerprints({"model": d})
    sampled = time.perf_counter() - t
    t = time.perf_counter()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    whole = time.perf_counter() - t
    size = sum(f.stat().st_size for f in files)
    print(f"{d}: {len(files)} files, {size / 2**20:.0f} MiB; sampled fingerprint {sampled:.3f}s, "
          f"whole-file sha256 {whole:.3f}s: {whole / sampled:.0f}x")


if __name__ == "__main__":
    main()
