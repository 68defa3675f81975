"""Retrieval-head detection over a needle grid: batching, shared-prefix prefill, scoring, results.

The sweep (rhead_jax.sweep) is a thin absl entry point over `run_sweep`.

Batches: instances of one length, in grid order, `batch_size` at a time. The batch list is a
function of the grid alone, so a resumed sweep recomputes exactly the batches an uninterrupted one
would (same shapes, same numbers) and its final files are byte-identical.

Shared prefix: every prompt starts with the same template and haystack tokens up to its needle.
One reference prompt (the longest haystack prefix) is prefilled once; each instance then copies
that KV cache up to the longest prefix it shares with the reference, checked token by token,
and prefills only the rest. Exact: a prefix token's keys and values depend only on the tokens
before it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import io, scoring
from rhead_jax.checkpoints import LoadedModel
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.decoder import KVCache
from rhead_jax.models.generate import GenerateSpec, cache_size_for
from rhead_jax.runner import Runner
from rhead_jax.needle.grid import build_grid
from rhead_jax.needle.haystack import load_haystack, load_needles
from rhead_jax.needle.prompts import Instance
from rhead_jax.needle.rouge import keep_test, rouge1_recall


# ----------------------------------------------------------------------------- stop tokens


def stop_tokens(tokenizer, *, faithful: bool) -> tuple[int, ...]:
    """Ids that end a test. Faithful: a token that decodes to exactly a newline (the original's
    check). Default: any token containing a newline, and the tokenizer's EOS."""
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in ids])
    if faithful:
        return tuple(i for i, t in zip(ids, texts) if t == "\n")
    out = {i for i, t in zip(ids, texts) if "\n" in t}
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return tuple(sorted(out))


# ----------------------------------------------------------------------------- plan


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_batches(instances: Sequence[Instance], batch_size: int) -> list[list[int]]:
    """Indices of instances grouped by length (grid order kept), at most batch_size per batch."""
    batches: list[list[int]] = []
    for i, inst in enumerate(instances):
        if batches and len(batches[-1]) < batch_size and instances[batches[-1][0]].length == inst.length:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


@dataclasses.dataclass
class SharedPrefix:
    """The reference prompt's KV cache (batch 1) and each instance's usable prefix length."""

    cache: KVCache
    lengths: dict[str, int]      # instance key -> tokens taken from the shared cache
    reference: str               # key of the reference instance
    tokens: int                  # tokens prefilled for the reference

    def rows(self, keys: Sequence[str], size: int, runner: Runner) -> KVCache:
        """A [B]-row cache of `size` slots whose row b holds its instance's shared prefix."""
        return runner.rows(self.cache, np.array([self.lengths[k] for k in keys], np.int32), size)


def build_shared_prefix(model: LoadedModel, instances: Sequence[Instance], spec: GenerateSpec,
                        cache_size: int, head_mask=None, *, runner: Runner | None = None) -> SharedPrefix:
    """The shared prefix of `instances`. `head_mask` [L, H] (None: unmasked) must be the PREFILL
    mask of the batches that use it (`run_batch(prefill_mask=...)`): masked heads change the
    prefix's keys and values in later layers."""
    runner = runner or Runner(model.cfg, model.params)
    ref = max(instances, key=lambda i: (i.needle_pos, i.length, i.depth))
    ref_ids = np.asarray(ref.prompt_ids)
    lengths = {}
    for inst in instances:
        ids = np.asarray(inst.prompt_ids)
        lengths[inst.key] = min(common_prefix(ids, ref_ids), len(ids) - 1)
    n = max(lengths.values())
    cache = runner.init_cache(1, cache_size)
    if n > 0:
        width = _round_up(n, spec.prefill_chunk) if n > spec.prefill_chunk else n
        toks = np.zeros((1, width), np.int32)
        toks[0, :n] = ref_ids[:n]
        pos = np.where(np.arange(width) < n, np.arange(width), -1)[None].astype(np.int32)
        cache = runner.prefill(toks, pos, cache, spec, head_mask=head_mask)
    return SharedPrefix(cache=cache, lengths=lengths, reference=ref.key, tokens=n)


# ----------------------------------------------------------------------------- one batch


def run_batch(model: LoadedModel, instances: Sequence[Instance], spec: GenerateSpec, *,
              pad_multiple: int, batch_size: int | None = None, shared: SharedPrefix | None = None,
              prefill_mask=None, decode_mask=None, runner: Runner | None = None,
              keep_attention: bool = False) -> list[dict[str, Any]]:
    """Generate and score one batch of instances (all of one length); one dict per instance.

    A short batch is padded to `batch_size` rows (repeating its last instance, results dropped)
    so every batch of a length shares one compiled program. keep_attention adds each test's
    captured top-1 slots and weights ([steps, L, H]) to its dict (tests, notebooks).
    """
    runner = runner or Runner(model.cfg, model.params)
    real = len(instances)
    rows = _round_up(max(batch_size or real, real), runner.data_size)
    if real < rows:
        instances = list(instances) + [instances[-1]] * (rows - real)
    B = len(instances)
    lens = np.array([i.num_prompt_tokens for i in instances], np.int32)
    P = _round_up(int(lens.max()), pad_multiple)
    prompts = np.zeros((B, P), np.int32)
    for b, inst in enumerate(instances):
        prompts[b, :lens[b]] = inst.prompt_ids
    size = cache_size_for(P, spec)
    if shared is not None:
        cache = shared.rows([i.key for i in instances], size, runner)
        starts = np.array([shared.lengths[i.key] for i in instances])
    else:
        cache = runner.init_cache(B, size)
        starts = np.zeros(B, np.int64)
    width = _round_up(max(int((lens - 1 - starts).max()), 1), pad_multiple)
    gen = runner.generate(prompts, lens, cache, spec=spec, prefill_width=width, prefill_mask=prefill_mask,
                          decode_mask=decode_mask)
    span = np.array([i.span for i in instances], np.int32)
    # outputs are replicated (readable on every host); score on this host's device
    top, tokens, n_tok = np.asarray(gen.topk_index), np.asarray(gen.tokens), np.asarray(gen.num_tokens)
    counts = np.asarray(scoring.copy_counts(top, tokens, prompts, span[:, 0], span[:, 1]))
    out = []
    for b, inst in enumerate(instances[:real]):
        generated = tokens[b, :n_tok[b]].tolist()
        response = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
        recall = rouge1_recall(inst.answer, response)
        span_len = int(span[b, 1] - span[b, 0])
        out.append({
            "key": inst.key, "length": inst.length, "depth": inst.depth, "needle_index": inst.needle_index,
            "needle": inst.needle.needle, "question": inst.question, "answer": inst.answer,
            "prompt_tokens": inst.num_prompt_tokens, "span": [int(span[b, 0]), int(span[b, 1])],
            "shared_prefix_tokens": int(starts[b]), "generated": generated, "response": response,
            "rouge1_recall": recall, "kept": keep_test(recall),
            "copy_counts": counts[b].tolist(),
            "scores": [[scoring.original_float(int(c), span_len) for c in row] for row in counts[b]],
        })
        if keep_attention:
            out[-1]["top_slot"] = top[b, :n_tok[b], ..., 0].tolist()
            out[-1]["top_weight"] = np.asarray(gen.topk_weight[b, :n_tok[b], ..., 0]).tolist()
    return out


# ----------------------------------------------------------------------------- the sweep


def generate_spec(config, tokenizer) -> GenerateSpec:
    s = config.sweep
    return GenerateSpec(max_new_tokens=s.max_new_tokens, stop_tokens=stop_tokens(tokenizer, faithful=s.faithful),
                        top_k=1, mask_mode="zero", prefill_chunk=s.prefill_chunk,
                        attn=AttentionOptions(q_chunk=s.q_chunk, k_chunk=s.k_chunk))


def plan_instances(config, model: LoadedModel) -> list[Instance]:
    """The grid's instances; lengths that cannot fit the model are refused before any work."""
    s = config.sweep
    limit = model.cfg.max_position_embeddings - s.max_new_tokens
    too_long = [L for L in s.lengths if L > limit]
    if too_long:
        raise ValueError(
            f"context length(s) {too_long} plus {s.max_new_tokens} generated tokens exceed the model's "
            f"max_position_embeddings={model.cfg.max_position_embeddings}; drop them from config.sweep.lengths")
    haystack = load_haystack(config.haystack or None)
    needles = load_needles(config.needles or None)
    return build_grid(model.tokenizer, haystack, needles, list(s.lengths), list(s.depths),
                      chat=config.model.chat, faithful=s.faithful, max_positions=limit)


class ResultStore:
    """Per-batch result files in `workdir/batches/`, written atomically; the config is pinned in
    `workdir/sweep_config.json` so a resume with different settings is refused."""

    def __init__(self, workdir: str, config_json: str, *, writer: bool = True):
        self.root = io.as_path(workdir)
        self.writer = writer
        meta = self.root / "sweep_config.json"
        if meta.exists():
            if meta.read_text() != config_json:
                raise ValueError(
                    f"workdir {workdir} holds a sweep with a different configuration ({meta}); use a new "
                    "--workdir, or delete that one to start over")
        elif writer:
            io.atomic_write_text(meta, config_json)

    def _batch_path(self, b: int):
        return self.root / "batches" / f"batch_{b:05d}.json"

    def done(self, b: int) -> bool:
        return self._batch_path(b).exists()

    def write(self, b: int, results: list[dict]) -> None:
        if self.writer:
            io.atomic_write_json(self._batch_path(b), results)

    def read(self, b: int) -> list[dict]:
        return io.read_json(self._batch_path(b))


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


def mesh_from_config(config):
    """None (one device, no sharding) unless config.mesh asks for more than one device."""
    sizes = dict(config.mesh)
    if all(v == 1 for v in sizes.values()):
        return None
    from rhead_jax.sharding import make_mesh

    return make_mesh(sizes)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_sweep(config, workdir: str, *, model: LoadedModel | None = None) -> dict:
    """Run (or resume) the sweep of `config` into `workdir`; returns the summary dict.

    On several hosts every process runs the same batches (the mesh spans them all) and process 0
    alone writes files.
    """
    from rhead_jax.checkpoints import load_model

    t0 = time.time()
    mesh = mesh_from_config(config)
    if model is None:
        model = load_model(config.model.path, dtype=config.model.dtype, mesh=mesh)
    elif mesh is not None:
        from rhead_jax.sharding import shard_params

        model = dataclasses.replace(model, params=shard_params(model.params, model.cfg, mesh))
    runner = Runner(model.cfg, model.params, mesh)
    is_writer = jax.process_index() == 0
    if mesh is not None:
        logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    name = config.model.name or model.name
    instances = plan_instances(config, model)
    spec = generate_spec(config, model.tokenizer)
    batches = make_batches(instances, config.sweep.batch_size)
    store = ResultStore(workdir, config.to_json(sort_keys=True, indent=1), writer=is_writer)
    _barrier("sweep_start")
    todo = [b for b in range(len(batches)) if not store.done(b)]
    logging.info("%s: %d instances in %d batches, %d to run (%d already done)", name, len(instances),
                 len(batches), len(todo), len(batches) - len(todo))

    shared = None
    timings = {"shared_prefix_s": 0.0, "batches_s": 0.0}
    if todo and config.sweep.share_prefix:
        t = time.time()
        max_p = max(_round_up(i.num_prompt_tokens, config.sweep.pad_multiple) for i in instances)
        shared = build_shared_prefix(model, instances, spec, cache_size_for(max_p, spec), runner=runner)
        jax.block_until_ready(shared.cache.k)
        timings["shared_prefix_s"] = time.time() - t
        saved = sum(shared.lengths.values())
        total = sum(i.num_prompt_tokens - 1 for i in instances)
        logging.info("shared prefix: %d reference tokens prefilled once; saves %d of %d prefill tokens (%.0f%%)",
                     shared.tokens, saved - shared.tokens, total, 100 * (saved - shared.tokens) / max(total, 1))

    bar = tqdm(total=len(instances), initial=len(instances) - sum(len(batches[b]) for b in todo),
               desc=f"sweep {name}", unit="test")
    computed: dict[int, list[dict]] = {}  # this run's batches: non-writer hosts need no shared disk
    for b in todo:
        t = time.time()
        batch = [instances[i] for i in batches[b]]
        results = run_batch(model, batch, spec, pad_multiple=config.sweep.pad_multiple,
                            batch_size=config.sweep.batch_size, shared=shared, runner=runner)
        store.write(b, results)
        computed[b] = results
        timings["batches_s"] += time.time() - t
        bar.update(len(batch))
        logging.info("batch %d/%d (length %d, %d tests) in %.1fs", b + 1, len(batches), batch[0].length,
                     len(batch), time.time() - t)
    bar.close()
    _barrier("sweep_batches_done")

    results = [r for b in range(len(batches)) for r in (computed[b] if b in computed else store.read(b))]
    hs = head_scores_from(results, model.cfg.num_layers, model.cfg.num_heads)
    summary = summarize(results, hs)
    if is_writer:
        root = io.as_path(workdir)
        io.atomic_write_json(root / "head_scores.json", hs)
        io.atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
        io.atomic_write_json(root / "summary.json", {"model": name, **summary}, indent=1)
    print(format_summary(name, summary, results), flush=True)
    logging.info("sweep done in %.1fs (shared prefix %.1fs, batches %.1fs)", time.time() - t0,
                 timings["shared_prefix_s"], timings["batches_s"])
    return summary
