"""run_detectors: the detectors' sequences through the engine's model on its mesh, the files."""
from __future__ import annotations

import time

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import io, scoring
from rhead_jax.batches import round_up
from rhead_jax.checkpoints import LoadedModel
from rhead_jax.detectors.sequences import DETECTORS, detector_targets, query_counts, random_repeats
from rhead_jax.engine import Engine
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.generate import GenerateSpec


def format_table(scores: dict[str, dict[str, list]], top: int = 10) -> str:
    """The top heads of each detector, one column per detector: `L-H score`."""
    cols = {name: scoring.top_heads(hs, top) for name, hs in scores.items()}
    lines = ["rank  " + "".join(f"{name:<18}" for name in cols)]
    for r in range(top):
        cells = [f"{cols[n][r][0]:>6} {cols[n][r][1]:.3f}    " if r < len(cols[n]) else " " * 18 for n in cols]
        lines.append(f"{r + 1:>4}  " + "".join(f"{c:<18}" for c in cells))
    return "\n".join(lines)


def run_detectors(config, workdir: str, *, model: LoadedModel | None = None) -> dict:
    """Score every head as an induction, duplicate-token and previous-token head (rhead_jax.detectors)
    on config.detectors' sequences; writes the files into `workdir`, returns the summary."""
    t0 = time.time()
    d = config.detectors
    engine = Engine(config, model)
    cfg = engine.cfg
    seq = random_repeats(engine.tokenizer, cfg.vocab_size, length=d.length, repeats=d.repeats, samples=d.samples,
                         seed=d.seed, max_positions=cfg.max_position_embeddings)
    s = config.sweep
    spec = GenerateSpec(max_new_tokens=0, top_k=0, mask_mode=config.mask.mode, prefill_chunk=s.prefill_chunk,
                        attn=AttentionOptions.for_platform(engine.runner.platform, q_chunk=s.q_chunk,
                                                           k_chunk=s.k_chunk),
                        prefill_masses=DETECTORS)
    T = seq.num_tokens
    rows = round_up(min(s.batch_size, d.samples), engine.runner.data_size)   # one program for every batch
    size = round_up(T, s.k_chunk)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T))
    targets = detector_targets(rows, seq)
    counts = query_counts(targets)[0]                                          # [M]
    logging.info("detectors: %d samples of %d tokens (%s%d x %d), %d rows per call", d.samples, T,
                 "BOS + " if seq.start else "", d.length, d.repeats, rows)
    per_sample = []                                                            # [L, H, M] per sample
    with tqdm(total=d.samples, desc=f"detectors {engine.name}", unit="sample") as bar:
        for lo in range(0, d.samples, rows):
            toks = seq.tokens[lo:lo + rows]
            real = len(toks)
            toks = np.concatenate([toks, np.repeat(toks[-1:], rows - real, 0)])
            mass = np.asarray(engine.runner.masses(toks, positions, targets, spec, size), np.float64)
            per_sample += [mass[:, b] / counts for b in range(real)]
            bar.update(real)
    L, H = cfg.num_layers, cfg.num_heads
    scores = {name: {f"{l}-{h}": [float(p[l, h, m]) for p in per_sample] for l in range(L) for h in range(H)}
              for m, name in enumerate(DETECTORS)}
    wall = time.time() - t0
    summary = {"model": engine.name, "length": d.length, "repeats": d.repeats, "samples": d.samples, "seed": d.seed,
               "bos": bool(seq.start), "tokens_per_sample": T,
               "files": {name: f"head_scores_{name}.json" for name in DETECTORS},
               "top_heads": {name: [[k, round(v, 4)] for k, v in scoring.top_heads(hs, 20)]
                             for name, hs in scores.items()},
               "wall_s": round(wall, 1)}
    if engine.is_writer:
        root = io.as_path(workdir)
        for name, hs in scores.items():
            io.atomic_write_json(root / f"head_scores_{name}.json", hs)
        io.atomic_write_json(root / "summary.json", summary, indent=1)
    print(f"== detector heads of {engine.name}: {d.samples} samples of {'BOS + ' if seq.start else ''}"
          f"{d.length} random tokens x {d.repeats} ==\n" + format_table(scores), flush=True)
    logging.info("detectors done in %.1fs", wall)
    return summary
