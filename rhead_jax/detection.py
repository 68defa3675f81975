"""Retrieval-head detection over a needle grid: the copy score of every head, on the engine.

The sweep (rhead_jax.sweep) is a thin absl entry point over `run_sweep`; loading, batching, the
shared-prefix prefill, generation with capture and the resumable result files are the engine's
(rhead_jax.engine). This module scores what the engine generates and writes the original's files.

Extra scores from the same pass (config.sweep.extra_scores), per test and head, each written as
`head_scores_<name>.json` in the original format (the kept tests, by the same ROUGE gate):

  mass   the mean, over the test's decode steps that produced a token (the steps the copy score
         counts), of the attention that the head's newest query puts on the answer span
         (Instance.span) at that step.
  query  QRHead's query-focused score for NIAH: the mean, over the question's tokens
         (Instance.question_span, all prefilled: they precede the last prompt token), of the
         attention that the head puts, at that token's query during the prefill, on the needle's
         tokens (Instance.needle_span: the tokens inserted into the context, at the context's
         offset in the prompt + needle_pos). QRHead (Zhang et al., "Query-Focused Retrieval
         Heads Improve Long-Context Reasoning and Re-ranking", EMNLP 2025,
         github.com/princeton-pli/QRHead) SUMS, over the query's tokens, the attention on the
         tokens of the GOLD document; we AVERAGE over the question's tokens (so the score is a
         probability mass in [0, 1]) and take the needle sentence as the gold document.

  logit  LOCOS's contrastive logit contribution (Gema, Alex, Minervini 2026, github.com/aryopg/locos,
         detectors/logit_contrib.py): per answer step t with generated token y_t and head (l, h),
         phi[t, j] = alpha[t, j] * u[y_t] . (W_O[l, h] v[j]); the step's score is the sum of phi over
         the needle's tokens (Instance.needle_span) minus the sum over the other visible keys times
         (needle tokens / other keys); the test's score is the mean over its answer steps.
  dla    the same without the spatial contrast: the sum of phi over all keys (the head's direct
         logit attribution to y_t, LOCOS's detectors/dla.py).
  spatial the same without the OV term: alpha in place of phi (attention on the needle minus the
         rescaled attention elsewhere).

  Answer steps: the decode steps whose generated token is not a stop token (the steps the copy
  score counts, less the one that produced the newline / EOS). LOCOS keeps, of those, the steps
  whose tokens spell the gold answer; ours keeps the whole response, and the ROUGE gate decides
  which tests count, as for every score here. A test without an answer step scores 0.
  Unembedding: u[y] is the raw unembedding row of y (the LM head's column, or the embedding row
  with tied embeddings, as SmolLM2 and Gemma have). The final RMSNorm (its 1/rms and its weight)
  and Gemma's final logit soft-cap are outside the linear path and are NOT applied, as in LOCOS
  (which reads lm_head.weight rows); o_proj's bias is no head's and is left out.

The mass scores are reduced inside the attention kernels (rhead_jax.models.attention, "span"
target); the logit scores from each decode step's head outputs and their parts from the needle's
keys (models.cache.CaptureSpec.span_outputs), then the generated token's unembedding row
(models.decoder.head_logit_contributions): memory stays O(T), one pass, no T x T map. The copy
score and head_scores.json are unchanged by any of them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from rhead_jax import config as config_lib
from rhead_jax import captures, diagnosis, io, rounds, scoring, stability
from rhead_jax.batches import make_batches
from rhead_jax.checkpoints import LoadedModel
from rhead_jax.engine import EXTRA_SCORES, Engine
from rhead_jax.models.decoder import LOGIT_TERMS
from rhead_jax.errors import UserError
from rhead_jax.models.attention import mass_targets
from rhead_jax.models.generate import GenerateSpec
from rhead_jax.needle.prompts import Instance
from rhead_jax.needle.rouge import keep_test, rouge1_recall
from rhead_jax.prefix import SharedPrefix, question_start
from rhead_jax.report import kinds as kinds_lib


def extra_targets(instances: Sequence[Instance], extra_scores: Sequence[str]) -> dict[str, Any]:
    """Engine.generate's prefill_targets / decode_targets for the extra scores (module docstring)."""
    B = len(instances)
    out: dict[str, Any] = {}
    if "mass" in extra_scores:
        out["decode_targets"] = mass_targets(B, 1, span=[i.span for i in instances])
    if "query" in extra_scores:
        for inst in instances:
            question_start(inst)
            if inst.needle_span is None:
                raise UserError(f"the needle's tokens of instance {inst.key} were not found in its prompt; drop "
                                "\"query\" from config.sweep.extra_scores")
            if inst.question_span[1] > inst.num_prompt_tokens - 1:
                raise UserError(f"the question of instance {inst.key} reaches the last prompt token, which is "
                                "decoded, not prefilled; drop \"query\" from config.sweep.extra_scores")
        out["prefill_targets"] = mass_targets(B, 1, span=[i.needle_span for i in instances],
                                              queries=[i.question_span for i in instances])
    logit = [n for n in extra_scores if n in LOGIT_TERMS]
    if logit:
        for inst in instances:
            if inst.needle_span is None:
                raise UserError(f"the needle's tokens of instance {inst.key} were not found in its prompt; drop "
                                f"{logit} from config.sweep.extra_scores")
        out["output_span"] = np.array([i.needle_span for i in instances], np.int32)
    return out


def score_batch(engine: Engine, instances: Sequence[Instance], spec: GenerateSpec, *,
                batch_size: int | None = None, shared: SharedPrefix | None = None, prefill_mask=None,
                decode_mask=None, keep_attention: bool = False,
                extra_scores: Sequence[str] = (), return_output: bool = False):
    """Generate and score one batch of instances (all of one length); one dict per instance.

    keep_attention adds each test's captured top-1 slots and weights ([steps, L, H]) to its dict
    (tests, notebooks). extra_scores (names of EXTRA_SCORES; `spec` must come from
    `engine.spec(extra_scores=...)`) adds `extra_scores: {name: [L][H]}` to each dict.
    return_output: return (the dicts, the engine's BatchOutput), e.g. for rhead_jax.captures.pack."""
    out_b = engine.generate([i.prompt_ids for i in instances], spec, batch_size=batch_size, shared=shared,
                            keys=[i.key for i in instances], prefill_mask=prefill_mask, decode_mask=decode_mask,
                            **extra_targets(instances, extra_scores))
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
        if extra_scores:
            out[-1]["extra_scores"] = {name: per_test_extra_score(name, out_b, b, inst, spec.stop_tokens).tolist()
                                       for name in extra_scores}
        if keep_attention:
            n = out_b.num_tokens[b]
            out[-1]["top_slot"] = top[b, :n, ..., 0].tolist()
            out[-1]["top_weight"] = out_b.topk_weight[b, :n, ..., 0].tolist()
    return (out, out_b) if return_output else out


def answer_steps(tokens: np.ndarray, num_tokens: int, stops: Sequence[int]) -> np.ndarray:
    """The answer steps of a row (module docstring): indices t < num_tokens with tokens[t] not a stop."""
    t = np.arange(int(num_tokens))
    return t[~np.isin(tokens[:num_tokens], list(stops))]


def per_test_extra_score(name: str, out_b, b: int, inst: Instance, stops: Sequence[int] = ()) -> np.ndarray:
    """[L, H] float64 extra score `name` of row b of a BatchOutput (module docstring); stops: the
    stop tokens (the logit scores' answer steps leave them out)."""
    if name in LOGIT_TERMS:
        steps = answer_steps(out_b.tokens[b], out_b.num_tokens[b], stops)
        terms = out_b.logit_terms[b, steps, :, :, LOGIT_TERMS.index(name)].astype(np.float64)
        return terms.mean(0) if len(steps) else np.zeros(terms.shape[1:])
    if name == "mass":
        return out_b.decode_mass[b, :, :, 0] / int(out_b.num_tokens[b])
    if name == "query":
        q0, q1 = inst.question_span
        return out_b.prefill_mass[b, :, :, 0] / (q1 - q0)
    raise ValueError(f"unknown extra score {name!r}; known: {sorted(EXTRA_SCORES)}")


def head_scores_from(results: Sequence[dict], num_layers: int, num_heads: int, *,
                     score: str | None = None) -> dict[str, list]:
    """The original's output: `{"L-H": [score of each KEPT test, grid order]}` of the copy score,
    or of the extra score `score` (results' "extra_scores")."""
    kept = [r for r in results if r["kept"]]
    rows = [r["scores"] if score is None else r["extra_scores"][score] for r in kept]
    return {f"{l}-{h}": [s[l][h] for s in rows] for l in range(num_layers) for h in range(num_heads)}


def summarize(results: Sequence[dict], head_scores: dict[str, list], *, top: int = 20) -> dict:
    """summary.json's content; with kept tests also how sure the scores are (rhead_jax.stability; its
    full table is `python -m rhead_jax.analyze`'s stability.json): the top heads' 95% bootstrap
    intervals, the retrieval-head count as a range, the heads whose interval contains 0.1."""
    means = scoring.head_means(head_scores)
    n_ret = sum(m > scoring.RETRIEVAL_THRESHOLD for m in means.values())
    out = {
        "tests": len(results),
        "tests_kept": sum(r["kept"] for r in results),
        "accuracy": float(np.mean([r["rouge1_recall"] for r in results])) if results else 0.0,
        "heads": len(means),
        "retrieval_heads": n_ret,
        "retrieval_head_share": n_ret / max(len(means), 1),
        "top_heads": [[k, round(v, 4)] for k, v in scoring.top_heads(head_scores, top)],
    }
    if out["tests_kept"]:
        st = stability.stability(head_scores, curve=False)
        out.update(top_heads_ci={k: st["ci"][k] for k, _ in out["top_heads"]},
                   retrieval_heads_range=st["retrieval_heads_range"], uncertain_heads=st["straddle"])
    return out


def format_summary(name: str, summary: dict, results: Sequence[dict]) -> str:
    lines = [f"== retrieval heads of {name} =="]
    if "gate" in summary:   # few or no tests kept: said up front (rhead_jax.diagnosis)
        lines.append(diagnosis.thin_warning(summary["gate"]))
    lines += [f"tests: {summary['tests']}, kept by the ROUGE gate: {summary['tests_kept']}, "
              f"accuracy (mean ROUGE-1 recall): {summary['accuracy']:.3f}",
              f"heads with mean score > 0.1: {summary['retrieval_heads']} of {summary['heads']} "
              f"({100 * summary['retrieval_head_share']:.1f}%)"]
    if not summary["tests_kept"]:
        lines.append("top heads: none (no test kept by the ROUGE gate)")
    else:
        ci = summary["top_heads_ci"]
        lo, hi = summary["retrieval_heads_range"]
        lines[-1] += f"; over 0.1 by the 95% intervals: {lo} to {hi} heads"
        lines.append(f"top heads (layer-head mean [95% bootstrap interval over the {summary['tests_kept']} kept "
                     "tests]): "
                     + ", ".join(f"{k} {v:.2f} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" for k, v in summary["top_heads"]))
    if "by_kind" in summary:
        lines.append("retrieval heads by layer kind: " + kinds_lib.format_kinds(summary["by_kind"]))
    for name, extra in summary.get("extra_scores", {}).items():
        lines.append(f"top heads by {name} (head_scores_{name}.json): "
                     + ", ".join(f"{k}: {v:.3f}" for k, v in extra["top_heads"]))
    if "stop" in summary:
        st = summary["stop"]
        lines.insert(1, f"stop_when_stable: ran {st['tests_run']} of {st['tests_total']} tests ({st['rounds_run']} of "
                        f"{st['rounds_total']} rounds): {st['reason']}")
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
    extra = tuple(config.sweep.extra_scores)
    spec = engine.spec(capture=True, extra_scores=extra)
    save = config.sweep.save_captures
    if save:   # more captured positions per head; the score reads the first, the same top 1
        spec = dataclasses.replace(spec, top_k=config.sweep.capture_top_k)
    bs = engine.batch_sizes(instances, spec)     # rows per batch, per length
    stop_when_stable = config.sweep.stop_when_stable
    batches, rounds_of = rounds.round_batches(instances, bs) if stop_when_stable else (make_batches(instances, bs),
                                                                                        None)
    store = engine.store(workdir, config_lib.sweep_json(config),
                         arrays=captures.kind(config.sweep.capture_top_k) if save else "")

    def run_one(b: int) -> list[dict]:
        batch = [instances[i] for i in batches[b]]
        results, out_b = score_batch(engine, batch, spec, batch_size=bs[batch[0].length], extra_scores=extra,
                                     return_output=True, shared=engine.shared_prefix(instances, spec, once=True))
        if save:   # before the results file: a batch is done only with both (rhead_jax.results_store)
            store.write_arrays(b, captures.pack(out_b, batch, engine.tokenizer))
        return results

    if stop_when_stable:   # rounds over the grid until the top 10 is settled (rhead_jax.rounds)
        per_batch, stop = rounds.run_rounds(engine, store, batches, rounds_of, run_one, desc=f"sweep {engine.name}",
                                            num_heads=engine.cfg.num_heads)
        grid_pos = {inst.key: n for n, inst in enumerate(instances)}
        results = sorted((r for rs in per_batch for r in rs), key=lambda r: grid_pos[r["key"]])
    else:
        per_batch = engine.run_batches(store, [len(b) for b in batches], run_one, desc=f"sweep {engine.name}")
        results = [r for rs in per_batch for r in rs]
    hs = head_scores_from(results, engine.cfg.num_layers, engine.cfg.num_heads)
    summary = summarize(results, hs)
    # each layer's kind (local: a sliding window; global) for the analysis' marks (rhead_jax.report.kinds)
    summary.update(layer_kinds=kinds_lib.layer_kinds(engine.cfg.windows), layer_windows=list(engine.cfg.windows))
    if kinds_lib.is_hybrid(summary["layer_kinds"]):
        summary["by_kind"] = kinds_lib.kind_summary(hs, summary["layer_kinds"])
    if stop_when_stable:
        summary["stop"] = stop
    gate = diagnosis.gate_report(results)
    if gate["thin"]:
        summary["gate"] = gate
    extra_hs = {name: head_scores_from(results, engine.cfg.num_layers, engine.cfg.num_heads, score=name)
                for name in extra}
    if extra:
        summary["extra_scores"] = {name: {"file": f"head_scores_{name}.json",
                                          "top_heads": [[k, round(v, 4)] for k, v in scoring.top_heads(e, 20)]}
                                   for name, e in extra_hs.items()}
    if engine.is_writer:
        root = io.as_path(workdir)
        io.atomic_write_json(root / "head_scores.json", hs)
        for name, e in extra_hs.items():
            io.atomic_write_json(root / f"head_scores_{name}.json", e)
        io.atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
        io.atomic_write_json(root / "summary.json", {"model": engine.name, **summary}, indent=1)
    print(format_summary(engine.name, summary, results), flush=True)
    logging.info("sweep done in %.1fs", time.time() - t0)
    return summary
