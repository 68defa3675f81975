"""Retrieval-head detection over a needle grid: the copy score of every head, on the engine.

The sweep (rhead_jax.sweep) is a thin absl entry point over `run_sweep`; loading, batching, the
shared-prefix prefill, generation with capture and the resumable result files are the engine's
(rhead_jax.engine). This module scores what the engine generates and writes the original's files.
"""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from rhead_jax import config as config_lib
from rhead_jax import io, scoring
from rhead_jax.checkpoints import LoadedModel
from rhead_jax.engine import Engine, SharedPrefix, make_batches
from rhead_jax.models.generate import GenerateSpec
from rhead_jax.needle.prompts import Instance
from rhead_jax.needle.rouge import keep_test, rouge1_recall


def score_batch(engine: Engine, instances: Sequence[Instance], spec: GenerateSpec, *,
                batch_size: int | None = None, shared: SharedPrefix | None = None, prefill_mask=None,
                decode_mask=None, keep_attention: bool = False) -> list[dict[str, Any]]:
    """Generate and score one batch of instances (all of one length); one dict per instance.

    keep_attention adds each test's captured top-1 slots and weights ([steps, L, H]) to its dict
    (tests, notebooks)."""
    out_b = engine.generate([i.prompt_ids for i in instances], spec, batch_size=batch_size, shared=shared,
                            keys=[i.key for i in instances], prefill_mask=prefill_mask, decode_mask=decode_mask)
    span = np.array([i.span for i in instances], np.int32)
    top, tokens = out_b.topk_index, out_b.tokens
    counts = np.asarray(scoring.copy_counts(top, tokens, out_b.prompts, span[:, 0], span[:, 1]))
    out = []
    for b, inst in enumerate(instances):
        generated = out_b.generated(b)
        response = engine.decode(generated)
        recall = rouge1_recall(inst.answer, response)
        span_len = int(span[b, 1] - span[b, 0])
        out.append({
            "key": inst.key, "length": inst.length, "depth": inst.depth, "needle_index": inst.needle_index,
            "needle": inst.needle.needle, "question": inst.question, "answer": inst.answer,
            "prompt_tokens": inst.num_prompt_tokens, "span": [int(span[b, 0]), int(span[b, 1])],
            "shared_prefix_tokens": int(out_b.starts[b]), "generated": generated, "response": response,
            "rouge1_recall": recall, "kept": keep_test(recall),
            "copy_counts": counts[b].tolist(),
            "scores": [[scoring.original_float(int(c), span_len) for c in row] for row in counts[b]],
        })
        if keep_attention:
            n = out_b.num_tokens[b]
            out[-1]["top_slot"] = top[b, :n, ..., 0].tolist()
            out[-1]["top_weight"] = out_b.topk_weight[b, :n, ..., 0].tolist()
    return out


def head_scores_from(results: Sequence[dict], num_layers: int, num_heads: int) -> dict[str, list]:
    """The original's output: `{"L-H": [score of each KEPT test, grid order]}`."""
    kept = [r for r in results if r["kept"]]
    return {f"{l}-{h}": [r["scores"][l][h] for r in kept] for l in range(num_layers) for h in range(num_heads)}


def summarize(results: Sequence[dict], head_scores: dict[str, list], *, top: int = 20) -> dict:
    means = scoring.head_means(head_scores)
    n_ret = sum(m > scoring.RETRIEVAL_THRESHOLD for m in means.values())
    return {
        "tests": len(results),
        "tests_kept": sum(r["kept"] for r in results),
        "accuracy": float(np.mean([r["rouge1_recall"] for r in results])) if results else 0.0,
        "heads": len(means),
        "retrieval_heads": n_ret,
        "retrieval_head_share": n_ret / max(len(means), 1),
        "top_heads": [[k, round(v, 4)] for k, v in scoring.top_heads(head_scores, top)],
    }


def format_summary(name: str, summary: dict, results: Sequence[dict]) -> str:
    lines = [f"== retrieval heads of {name} ==",
             f"tests: {summary['tests']}, kept by the ROUGE gate: {summary['tests_kept']}, "
             f"accuracy (mean ROUGE-1 recall): {summary['accuracy']:.3f}",
             f"heads with mean score > 0.1: {summary['retrieval_heads']} of {summary['heads']} "
             f"({100 * summary['retrieval_head_share']:.1f}%)",
             "top heads (layer-head: mean score): " + ", ".join(f"{k}: {v:.3f}" for k, v in summary["top_heads"])]
    lines.append("per test: " + ", ".join(f"{r['key']}={r['rouge1_recall']:.2f}{'' if r['kept'] else '(dropped)'}"
                                          for r in results))
    return "\n".join(lines)


def run_sweep(config, workdir: str, *, model: LoadedModel | None = None) -> dict:
    """Run (or resume) the sweep of `config` into `workdir`; returns the summary dict.

    On several hosts every process runs the same batches (the mesh spans them all) and process 0
    alone writes files.
    """
    t0 = time.time()
    engine = Engine(config, model)
    instances = engine.plan_needles()
    spec = engine.spec(capture=True)
    bs = config.sweep.batch_size
    batches = make_batches(instances, bs)
    store = engine.store(workdir, config_lib.sweep_json(config))

    def run_one(b: int) -> list[dict]:
        batch = [instances[i] for i in batches[b]]
        return score_batch(engine, batch, spec, batch_size=bs, shared=engine.shared_prefix(instances, spec))

    per_batch = engine.run_batches(store, [len(b) for b in batches], run_one, desc=f"sweep {engine.name}")
    results = [r for rs in per_batch for r in rs]
    hs = head_scores_from(results, engine.cfg.num_layers, engine.cfg.num_heads)
    summary = summarize(results, hs)
    if engine.is_writer:
        root = io.as_path(workdir)
        io.atomic_write_json(root / "head_scores.json", hs)
        io.atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
        io.atomic_write_json(root / "summary.json", {"model": engine.name, **summary}, indent=1)
    print(format_summary(engine.name, summary, results), flush=True)
    logging.info("sweep done in %.1fs", time.time() - t0)
    return summary
