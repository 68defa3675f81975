"""The shared prefix and its branches: what the prompts of a grid have in common, prefilled once.

Shared prefix: every prompt starts with the same template and haystack tokens up to its needle.
One reference prompt (the longest haystack prefix) is prefilled once; each instance then copies
that KV cache up to the longest prefix it shares with the reference, checked token by token,
and prefills only the rest. Exact: a prefix token's keys and values depend only on the tokens
before it. A masked prefill (ablation phase "all") needs its own prefix: the masked heads change
the keys and values of later layers. Prefix branches (config.sweep.prefix_branches, `choose_branches`)
are more such prompts, one row each, for instances that share more with each other than with
the reference: at depth 0 the needle comes first, so a shorter haystack is a prefix of a longer
one with the same needle; on the SmolLM2 grid three branches save another 3,200 of 18,400 prefill
tokens, for 141 MiB of resident cache.

`prefill_rows` prefills each row of a cache on its own, from its start (the end of its shared
prefix) to its end: the branches here, every batch in rhead_jax.engine.Engine.generate.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from rhead_jax.batches import round_up
from rhead_jax.errors import UserError
from rhead_jax.models.attention import MassTargets
from rhead_jax.models.decoder import KVCache
from rhead_jax.models.generate import (GenerateSpec, cache_size_for, cache_slots, pad_prompts, prefill_pieces,
                                      prefill_widths)
from rhead_jax.needle.prompts import Instance

__all__ = ["SharedPrefix", "SharedPrefixes", "choose_branches", "common_prefix", "prefill_rows", "question_start"]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def question_start(inst: Instance) -> int:
    """The first prompt index of the instance's question (Instance.question_span); refused if unknown."""
    if inst.question_span is None:
        raise UserError(f"the question's tokens of instance {inst.key} were not found in its prompt (a tokenizer "
                        "without offsets, or a template that rewrites the question); drop \"query\" from "
                        "config.sweep.extra_scores")
    return inst.question_span[0]


@dataclasses.dataclass
class SharedPrefix:
    """The reference prompt's KV cache (batch 1), the branches' (one row each), and each
    instance's usable prefix length and where it comes from."""

    cache: KVCache
    lengths: dict[str, int]      # instance key -> tokens taken from the shared caches
    reference: str               # key of the reference instance
    tokens: int                  # tokens prefilled for the reference
    branches: KVCache | None = None                          # [R] rows (padded to the data axis)
    source: dict[str, int] = dataclasses.field(default_factory=dict)   # key -> branch row; absent: reference
    branch_tokens: int = 0       # tokens prefilled for the branches
    pending: set[str] | None = None  # with `once`: the branches' instances not generated yet

    def taken(self, keys: Sequence[str]) -> None:
        """`keys` got their rows; with `once`, the branches are dropped (their memory freed) when
        every instance that takes from them has."""
        if self.pending is not None and self.branches is not None:
            self.pending -= set(keys)
            if not self.pending:
                self.branches = None


def choose_branches(ids: Sequence[np.ndarray], caps: Sequence[int], base: Sequence[int], max_branches: int,
                    min_gain: int = 64) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Greedy prefix branches over prompts `ids`: instance i may take at most caps[i] tokens from a
    shared cache and already takes base[i] from the reference.

    A branch is the first n tokens of one prompt c, prefilled once; every instance takes from it
    min(common prefix with c, caps[i], n) tokens. Each round adds the branch with the largest net
    saving (tokens the instances no longer prefill, less the branch's own n) while it saves at
    least `min_gain`. On the needle grid the branches are the depth-0 prompts, one per needle: at
    depth 0 a shorter haystack is a prefix of a longer one, and only the question differs.

    Returns ([(c, n) per branch], starts, source) with source[i] = the branch i takes from, -1 = the
    reference."""
    N = len(ids)
    lcp = np.array([[common_prefix(ids[i], ids[j]) if i != j else len(ids[i]) for j in range(N)] for i in range(N)]
                   if max_branches > 0 else np.zeros((N, N)), np.int64)
    caps_a = np.asarray(caps, np.int64)
    starts, source = np.asarray(base, np.int64).copy(), np.full(N, -1)
    branches: list[tuple[int, int]] = []
    while len(branches) < max_branches:
        best = None
        for c in range(N):
            take = np.minimum(lcp[:, c], caps_a)
            users = take > starts
            if not users.any():
                continue
            n = int(take[users].max())
            gain = int((take[users] - starts[users]).sum()) - n
            if best is None or gain > best[0]:
                best = (gain, c, n, users, take)
        if best is None or best[0] < min_gain:
            break
        gain, c, n, users, take = best
        starts[users] = np.minimum(take[users], n)
        source[users] = len(branches)
        branches.append((c, n))
    return branches, starts.tolist(), source.tolist()


def prefill_rows(r, cache, prompts, starts, ends, real: int, spec: GenerateSpec, prefill_mask,
                 prefill_targets: MassTargets | None = None):
    """Prefill row b of `cache` with prompts[b, starts[b]:ends[b]], each row on its own in calls
    of the widths `prefill_widths(spec.prefill_chunk)` (a row block of one row per data shard
    at a time; blocks of padding rows, b >= real, are skipped). Returns (cache, calls): with
    spec.prefill_masses, calls lists (rows of the block, mass [L, d, H, M]) per call."""
    d = r.data_size
    n_blocks = prompts.shape[0] // d
    widths = prefill_widths(spec.prefill_chunk)
    calls = []
    for j in range(n_blocks):
        members = [s * n_blocks + j for s in range(d)]  # row j of every data shard
        if all(b >= real for b in members):
            continue  # padding rows: never read back, not worth a prefill
        done = 0
        for w in prefill_pieces(max(int(ends[b] - starts[b]) for b in members), widths):
            toks = np.zeros((d, w), np.int32)
            pos = np.full((d, w), -1, np.int32)
            for i, b in enumerate(members):
                lo = int(starts[b]) + done
                hi = min(lo + w, int(ends[b]))
                if hi > lo:
                    toks[i, :hi - lo] = prompts[b, lo:hi]
                    pos[i, :hi - lo] = np.arange(lo, hi)
            if spec.prefill_masses:
                block_targets = jax.tree.map(lambda x: x[members], prefill_targets)
                cache, mass = r.prefill_block(cache, j, toks, pos, spec, head_mask=prefill_mask,
                                              targets=block_targets)
                calls.append((members, mass))
            else:
                cache = r.prefill_block(cache, j, toks, pos, spec, head_mask=prefill_mask)
            done += w
    return cache, calls


class SharedPrefixes:
    """The shared prefixes of one engine's batches, each built on first use (`get`); the time spent
    building them adds up in timings["shared_prefix_s"]."""

    def __init__(self, config, runner, timings: dict):
        self.config, self.runner, self.timings = config, runner, timings
        self._shared: dict[Any, SharedPrefix] = {}

    def get(self, instances: Sequence[Instance], spec: GenerateSpec, prefill_mask=None,
            *, label: str = "", runner=None, once: bool = False) -> SharedPrefix | None:
        """The shared prefix of `instances` (None when config.sweep.share_prefix is off).

        `prefill_mask` [L, H] (None: unmasked) must be the PREFILL mask of the batches that use it;
        `runner` (None: the engine's) the runner of those batches (a mixed KV cache's,
        rhead_jax.mixedkv). The unmasked prefix is kept; of masked or other runners' only the latest
        (`label`) stays alive. With spec.prefill_masses (the question's queries) each instance's part
        stops before its question. `once`: each instance is generated at most once (a sweep), so
        the prefix branches are freed as soon as the last instance that takes from them has been.
        """
        if not self.config.sweep.share_prefix:
            return None
        r = runner or self.runner
        before_question = bool(spec.prefill_masses)
        key = ("unmasked" if prefill_mask is None and runner is None else label) + (
            " before questions" if before_question else "")
        if key in self._shared:
            return self._shared[key]
        if not key.startswith("unmasked"):
            for k in [k for k in self._shared if not k.startswith("unmasked")]:
                del self._shared[k]
        t = time.time()
        pm = self.config.sweep.pad_multiple
        size = cache_size_for(max(round_up(i.num_prompt_tokens, pm) for i in instances), spec)
        ref = max(instances, key=lambda i: (i.needle_pos, i.length, i.depth))
        ref_ids = np.asarray(ref.prompt_ids)
        lengths = {}
        for inst in instances:
            ids = np.asarray(inst.prompt_ids)
            lengths[inst.key] = min(common_prefix(ids, ref_ids), len(ids) - 1)
            if before_question:
                lengths[inst.key] = min(lengths[inst.key], question_start(inst))
        n = max(lengths.values())
        cache = r.prefix_cache(size)
        if n > 0:
            width = round_up(n, spec.prefill_chunk) if n > spec.prefill_chunk else n
            toks = np.zeros((1, width), np.int32)
            toks[0, :n] = ref_ids[:n]
            pos = np.where(np.arange(width) < n, np.arange(width), -1)[None].astype(np.int32)
            cache = r.prefill(toks, pos, cache, spec, head_mask=prefill_mask)
        shared = SharedPrefix(cache=cache, lengths=lengths, reference=ref.key, tokens=n)
        if runner is None and self.config.sweep.prefix_branches > 0:
            self._add_branches(shared, instances, spec, prefill_mask, before_question)
            if once:
                shared.pending = set(shared.source)
        jax.block_until_ready((shared.cache, shared.branches))
        self.timings["shared_prefix_s"] += time.time() - t
        saved = sum(shared.lengths.values())
        total = sum(i.num_prompt_tokens - 1 for i in instances)
        spent = n + shared.branch_tokens
        logging.info("shared prefix (%s): %d reference tokens%s prefilled once in %.1fs; saves %d of %d prefill "
                     "tokens (%.0f%%)", key, n,
                     f" and {shared.branch_tokens} in {len(set(shared.source.values()))} branches"
                     if shared.branches is not None else "",
                     time.time() - t, saved - spent, total, 100 * (saved - spent) / max(total, 1))
        self._shared[key] = shared
        return shared

    def _add_branches(self, shared: SharedPrefix, instances: Sequence[Instance], spec: GenerateSpec,
                      prefill_mask, before_question: bool) -> None:
        """Prefill up to config.sweep.prefix_branches more prompt prefixes (`choose_branches`) into
        one cache of a row each, and point the instances that gain from them there."""
        ids = [np.asarray(i.prompt_ids) for i in instances]
        caps = [min(len(x) - 1, question_start(i)) if before_question else len(x) - 1
                for x, i in zip(ids, instances)]
        base = [shared.lengths[i.key] for i in instances]
        chosen, starts, source = choose_branches(ids, caps, base, self.config.sweep.prefix_branches)
        if not chosen:
            return
        r, d = self.runner, self.runner.data_size
        real = len(chosen)
        rows = [ids[c][:n] for c, n in chosen]
        rows += [rows[-1]] * (round_up(real, d) - real)
        prompts, lens = pad_prompts(rows, self.config.sweep.pad_multiple)
        cache = r.branch_cache(len(rows), cache_slots(int(lens.max()), spec.attn))
        plain = dataclasses.replace(spec, prefill_masses=())   # branches end before every question
        cache, _ = prefill_rows(r, cache, prompts, np.zeros(len(rows), np.int32), lens, real, plain, prefill_mask)
        shared.branches = cache
        shared.branch_tokens = int(lens[:real].sum())
        for inst, start, src in zip(instances, starts, source):
            shared.lengths[inst.key] = start
            if src >= 0:
                shared.source[inst.key] = src
