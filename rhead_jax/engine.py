"""The one engine under every command: the model on its mesh, the plan, the shared prefix, batches
of prompts generated with (prefill mask, decode mask, capture spec), results written atomically.

    engine = Engine(config)                         # load onto config.mesh (or wrap a loaded model)
    instances = engine.plan_needles()               # the needle grid (refused before any work if too long)
    batches = make_batches(instances, engine.batch_sizes(instances, spec))   # instances of one length, grid order
    spec = engine.spec(capture=True)                # GenerateSpec from config.sweep (+ mask mode)
    shared = engine.shared_prefix(instances, spec)  # the common haystack prefix, prefilled once
    out = engine.generate([i.prompt_ids for i in batch], spec, batch_size=..., shared=shared,
                          keys=[i.key for i in batch], prefill_mask=..., decode_mask=...,
                          prefill_targets=..., decode_targets=...)   # the masses of spec, if any
    store = engine.store(workdir, pinned_json)      # per-batch files, resumable
    engine.run_batches(store, n, run_one, desc=...) # resume, progress, logs

Detection (rhead_jax.detection) scores `out`; ablation tasks (rhead_jax.ablation.tasks) and the
QA / CoT tasks read its tokens. None of them re-assembles loading, padding or the shared prefix.

Shared prefix (rhead_jax.prefix): every prompt starts with the same template and haystack tokens up
to its needle; that prefix is prefilled once (and its branches, config.sweep.prefix_branches), each
row prefills only the rest.

Attention masses (`engine.spec(extra_scores=...)`, rhead_jax.detection's "mass" and "query"
scores): the decode loop sums the newest query's mass on each row's decode targets over its live
steps; the prefill calls sum the mass of each row's queries in its query range on its prefill
targets, and the engine adds the calls up. Those queries must be prefilled in the row's own calls,
so with prefill masses each instance's shared prefix stops before its question (checked).

Batches (rhead_jax.batches) are instances of one length, padded to one shape per length.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax.batches import round_up
from rhead_jax.checkpoints import LoadedModel
from rhead_jax.compilation import COMPILES, count_compiles, enable_compile_cache
from rhead_jax.errors import UserError
from rhead_jax.host_memory import host_memory_returns_to_the_system, release_freed_memory
from rhead_jax.models.attention import AttentionOptions, MassTargets
from rhead_jax.models.generate import GenerateSpec, cache_size_for, pad_prompts
from rhead_jax.needle.prompts import Instance
from rhead_jax.plan import leading_stop_tokens, plan_needles, stop_tokens
from rhead_jax.prefix import SharedPrefix, SharedPrefixes, prefill_rows
from rhead_jax.results_store import ResultStore, input_fingerprints, preemption_notice
from rhead_jax.runner import Runner

__all__ = ["BatchOutput", "EXTRA_SCORES", "Engine", "ResultStore", "barrier", "extra_score_masses", "mesh_from_config",
           "stop_tokens"]

# the extra scores of a needle sweep (config.sweep.extra_scores) -> what they need reduced:
# "mass": decode steps, keys of the answer span; "query": prefill, question queries on the needle's keys;
# "logit", "dla", "spatial": decode steps, the heads' outputs and their parts from the needle's keys
EXTRA_SCORES = {"mass": "decode", "query": "prefill", "logit": "outputs", "dla": "outputs", "spatial": "outputs"}


def extra_score_masses(extra_scores) -> dict[str, tuple[str, ...]]:
    """GenerateSpec fields (prefill_masses, decode_masses: one "span" target each; decode_outputs) of
    the extra scores."""
    unknown = [n for n in extra_scores if n not in EXTRA_SCORES]
    if unknown:
        raise UserError(f"unknown extra score(s) {unknown}; known: {sorted(EXTRA_SCORES)}")
    phases = {EXTRA_SCORES[n] for n in extra_scores}
    return {"prefill_masses": ("span",) if "prefill" in phases else (),
            "decode_masses": ("span",) if "decode" in phases else (), "decode_outputs": "outputs" in phases}


def mesh_from_config(config):
    """None (one device, no sharding) unless config.mesh asks for more than one device."""
    sizes = dict(config.mesh)
    if all(v == 1 for v in sizes.values()):
        return None
    from rhead_jax.sharding import make_mesh

    return make_mesh(sizes)


def barrier(name: str) -> None:
    """All processes meet here (no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class BatchOutput:
    """One generated batch on the host; rows past `real` are padding and are dropped here.

    prompts [B, P] (right-padded ids), starts [B] (tokens taken from the shared prefix),
    tokens [B, N] (-1 after a row stopped), num_tokens [B], topk_index / topk_weight
    [B, N, L, H, k] or None (no capture); prefill_mass / decode_mass [B, L, H, M] float64 or None:
    spec.prefill_masses summed over the row's prefill calls, spec.decode_masses summed over its
    live decode steps; logit_terms [B, N, L, H, 3] float32 or None: spec.decode_outputs' terms of
    each decode step (models.generate.Generation)."""

    prompts: np.ndarray
    starts: np.ndarray
    tokens: np.ndarray
    num_tokens: np.ndarray
    topk_index: np.ndarray | None
    topk_weight: np.ndarray | None
    prefill_mass: np.ndarray | None = None
    decode_mass: np.ndarray | None = None
    logit_terms: np.ndarray | None = None

    def generated(self, b: int) -> list[int]:
        return self.tokens[b, :self.num_tokens[b]].tolist()


class Engine:
    """The model of `config.model` on the mesh of `config.mesh`, and the programs that run it."""

    def __init__(self, config, model: LoadedModel | None = None):
        from rhead_jax.checkpoints import load_model

        self.config = config
        count_compiles()
        cache = enable_compile_cache(config.compile_cache)
        if cache:
            logging.info("persistent compilation cache: %s", cache)
        self.mesh = mesh_from_config(config)
        self.trim = jax.devices()[0].platform == "cpu" and host_memory_returns_to_the_system()
        if model is None:
            model = load_model(config.model.path, dtype=config.model.dtype, mesh=self.mesh)
        elif self.mesh is not None:
            from rhead_jax.sharding import shard_params

            model = dataclasses.replace(model, params=shard_params(model.params, model.cfg, self.mesh))
        self.model = model
        self.loaded_at = time.time()     # start-up: planning and time to the first batch count from here
        self._first_batch_logged = False
        self.runner = Runner(model.cfg, model.params, self.mesh)
        self.name = config.model.name or model.name
        self.is_writer = jax.process_index() == 0
        self._inputs: dict | None = None   # input_fingerprints, computed by the first store()
        self.timings = {"shared_prefix_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0,
                        "decode_row_steps": 0}
        self.prefixes = SharedPrefixes(config, self.runner, self.timings)
        if self.mesh is not None:
            logging.info("mesh %s over %d devices (%d processes)", dict(self.mesh.shape), self.mesh.size,
                         jax.process_count())

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # -- plan ----------------------------------------------------------------------------------

    def plan_needles(self) -> list[Instance]:
        """The needle grid's instances (rhead_jax.plan); refused before any work if too long."""
        t = time.time()
        instances = plan_needles(self.config, self.tokenizer, self.cfg.max_position_embeddings)
        logging.info("plan: %d instances in %.2fs", len(instances), time.time() - t)
        return instances

    def spec(self, *, capture: bool, max_new_tokens: int | None = None,
             stops: tuple[int, ...] | None = None, extra_scores: tuple[str, ...] = ()) -> GenerateSpec:
        """Generation settings from config.sweep and config.mask.mode. capture: the top-1 attended
        slot of every head at every decode step (what the copy score needs); off otherwise.
        extra_scores: names of EXTRA_SCORES whose attention masses to reduce as well."""
        s = self.config.sweep
        leading = ()
        if stops is None:  # the needle tests' rule (rhead_jax.plan): newlines before the answer pass in default mode
            stops = stop_tokens(self.tokenizer, faithful=s.faithful)
            leading = leading_stop_tokens(self.tokenizer, faithful=s.faithful)
        return GenerateSpec(max_new_tokens=max_new_tokens or s.max_new_tokens, stop_tokens=stops,
                            leading_stop_tokens=leading,
                            top_k=1 if capture else 0, mask_mode=self.config.mask.mode,
                            prefill_chunk=s.prefill_chunk,
                            attn=self.attention_options(),
                            **extra_score_masses(extra_scores))

    def attention_options(self) -> AttentionOptions:
        """The tiles of config.sweep and its attention kernel, checked against the devices' platform."""
        s = self.config.sweep
        try:
            return AttentionOptions.for_platform(self.runner.platform, s.attention, q_chunk=s.q_chunk,
                                                 k_chunk=s.k_chunk)
        except ValueError as e:
            raise UserError(f"config.sweep.attention: {e}") from None

    def batch_sizes(self, instances: Sequence[Instance], spec: GenerateSpec) -> dict[int, int]:
        """Rows decoded together, per length: config.sweep.batch_size, or fewer where that many rows'
        KV cache (`cache_size_for` the length's longest padded prompt, every layer's slots) would
        hold more than config.sweep.batch_kv_mib; at least one; the length's tests spread evenly over
        as few batches (padding rows cost full compute). A function of the plan alone (a resumed run
        gets the same batches)."""
        s, c = self.config.sweep, self.cfg
        slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(c.dtype).itemsize
        sizes = {}
        for length in sorted({i.length for i in instances}):
            P = max(round_up(i.num_prompt_tokens, s.pad_multiple) for i in instances if i.length == length)
            fits = int(s.batch_kv_mib * 2 ** 20 // (slot * cache_size_for(P, spec))) if s.batch_kv_mib else s.batch_size
            fits = max(1, min(s.batch_size, fits))
            count = sum(i.length == length for i in instances)
            sizes[length] = -(-count // -(-count // fits))    # as few batches, evened out (9 in 5 + 4, not 7 + 2)
        return sizes

    # -- shared prefix -------------------------------------------------------------------------

    def shared_prefix(self, instances: Sequence[Instance], spec: GenerateSpec, prefill_mask=None,
                      *, label: str = "", runner=None, once: bool = False) -> SharedPrefix | None:
        """The shared prefix of `instances`, built once per mask and runner (rhead_jax.prefix.SharedPrefixes.get:
        what `prefill_mask`, `label`, `runner` and `once` mean)."""
        return self.prefixes.get(instances, spec, prefill_mask, label=label, runner=runner, once=once)

    # -- one batch -----------------------------------------------------------------------------

    def generate(self, rows: Sequence[Sequence[int]], spec: GenerateSpec, *, batch_size: int | None = None,
                 shared: SharedPrefix | None = None, keys: Sequence[str] | None = None,
                 prefill_mask=None, decode_mask=None, prefill_targets: MassTargets | None = None,
                 decode_targets: MassTargets | None = None, output_span=None, runner=None) -> BatchOutput:
        """Greedy generation for one batch of prompts (token id lists) with optional shared prefix
        (`keys` name each row's instance in it) and head masks; only the real rows come back.
        prefill_targets / decode_targets: host MassTargets (one row per prompt) of spec.prefill_masses /
        spec.decode_masses (models.attention.mass_targets builds them); output_span [rows, 2]: the
        key positions of spec.decode_outputs' span per prompt.
        `runner`: whose programs and cache run it (None: the engine's Runner; a mixed KV cache's
        MixedRunner, rhead_jax.mixedkv, takes no head masks and no mass targets).

        Each row is prefilled on its own, from the end of its shared prefix to its last prompt
        token but one, in calls of the widths `prefill_widths(spec.prefill_chunk)`; then all rows
        decode together. So the programs compiled for a batch shape are: one cache set-up, at most
        four prefill widths and one decode loop, whatever the prompts' depths and needles."""
        real = len(rows)
        r = runner or self.runner
        d = r.data_size
        n_rows = round_up(max(batch_size or real, real), d)
        prompts, lens = pad_prompts(list(rows) + [rows[-1]] * (n_rows - real), self.config.sweep.pad_multiple)
        size = cache_size_for(prompts.shape[1], spec)
        if shared is not None:
            keys = list(keys) + [keys[-1]] * (n_rows - real)
            starts = np.array([shared.lengths[k] for k in keys], np.int32)
            source = np.array([shared.source.get(k, -1) for k in keys], np.int32)
            if (source < 0).all():
                cache = r.rows(shared.cache, starts, size)
            elif shared.branches is None:
                raise ValueError("the prefix branches were freed: an instance of a shared_prefix(once=True) "
                                 "was generated twice")
            else:
                cache = r.rows(shared.cache, starts, size, branches=shared.branches, source=source)
            shared.taken(keys)
        else:
            starts = np.zeros(n_rows, np.int32)
            cache = r.init_cache(n_rows, size)

        def pad_rows(targets: MassTargets) -> MassTargets:   # padding rows repeat the last row, like prompts
            return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], n_rows - real, 0)]), targets)

        if spec.prefill_masses:
            if prefill_targets is None:
                raise ValueError(f"spec.prefill_masses={spec.prefill_masses} needs prefill_targets")
            prefill_targets = pad_rows(prefill_targets)
            first_query = prefill_targets.queries[:, :, 0].min(1)
            if (starts > first_query).any():
                raise ValueError("queries whose attention mass is summed lie in the shared prefix "
                                 f"(starts {starts.tolist()}, first queries {first_query.tolist()}); build the "
                                 "shared prefix with this spec (Engine.shared_prefix stops it before the question)")
        if spec.decode_masses:
            if decode_targets is None:
                raise ValueError(f"spec.decode_masses={spec.decode_masses} needs decode_targets")
            decode_targets = pad_rows(decode_targets)
        if spec.decode_outputs:
            if output_span is None:
                raise ValueError("spec.decode_outputs needs output_span")
            output_span = np.asarray(output_span, np.int32)
            output_span = np.concatenate([output_span, np.repeat(output_span[-1:], n_rows - real, 0)])
        t0 = time.time()
        cache, calls = prefill_rows(r, cache, prompts, starts, lens - 1, real, spec, prefill_mask, prefill_targets)
        jax.block_until_ready(cache)
        t1 = time.time()
        first = prompts[np.arange(n_rows), lens - 1]
        gen = r.decode(first, lens, cache, spec, decode_mask=decode_mask, targets=decode_targets,
                       **({"output_span": output_span} if spec.decode_outputs else {}))
        cap = spec.top_k > 0
        n_tok = np.asarray(gen.num_tokens)  # outputs are replicated (readable on every host)
        prefill_mass = None
        if spec.prefill_masses:   # the calls' masses, [L, d, H, M] each, added up per row on the host
            L, H = self.cfg.num_layers, self.cfg.num_heads
            prefill_mass = np.zeros((n_rows, L, H, len(spec.prefill_masses)), np.float64)
            for members, mass in calls:
                prefill_mass[members] += np.asarray(mass, np.float64).swapaxes(0, 1)
            prefill_mass = prefill_mass[:real]
        out = BatchOutput(prompts=prompts[:real], starts=starts[:real], tokens=np.asarray(gen.tokens)[:real],
                          num_tokens=n_tok[:real],
                          topk_index=np.asarray(gen.topk_index)[:real] if cap else None,
                          topk_weight=np.asarray(gen.topk_weight)[:real] if cap else None,
                          prefill_mass=prefill_mass,
                          decode_mass=np.asarray(gen.mass, np.float64)[:real] if spec.decode_masses else None,
                          logit_terms=np.asarray(gen.logit_terms)[:real] if spec.decode_outputs else None)
        self.timings["prefill_s"] += t1 - t0
        self.timings["decode_s"] += time.time() - t1
        self.timings["decode_steps"] += int(n_tok.max())
        self.timings["decode_row_steps"] += n_rows * int(n_tok.max())
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # -- results -------------------------------------------------------------------------------

    def store(self, root: str, pinned_json: str, *, arrays: str = "") -> ResultStore:
        """The result store of `root`, pinned to `pinned_json` and to the content of the inputs
        (rhead_jax.results_store.input_fingerprints of the checkpoint, haystack and needles);
        `arrays`: the kind of arrays file each batch has too (ResultStore)."""
        if self._inputs is None:
            from rhead_jax.needle.haystack import DEFAULT_HAYSTACK_PATH, DEFAULT_NEEDLES_PATH

            c = self.config
            paths = {"model": self.model.directory,
                     "haystack": c.haystack or DEFAULT_HAYSTACK_PATH, "needles": c.needles or DEFAULT_NEEDLES_PATH}
            if str(c.model.path).endswith(".gguf"):
                paths["model.gguf"] = c.model.path   # its converted directory is cached by name
            self._inputs = input_fingerprints({k: p for k, p in paths.items() if p and os.path.exists(p)})
        return ResultStore(root, pinned_json, inputs=self._inputs, writer=self.is_writer, arrays=arrays)

    def run_batches(self, store: ResultStore, sizes: Sequence[int], run_one: Callable[[int], list[dict]], *,
                    desc: str, bar: tqdm | None = None) -> list[list[dict]]:
        """Run every batch `store` lacks or holds torn (run_one(b) -> its results), writing each
        atomically; returns all batches' results in order. On several hosts every process runs the
        same batches (process 0's scan decides which) and process 0 alone writes; the batches of
        earlier runs are read from the workdir (gs://, shared by the hosts). SIGTERM ends the run
        between writes with rhead_jax.errors.Preempted."""
        barrier(f"{desc}_start")
        have = store.scan(len(sizes))
        done = _agreed_done([b in have for b in range(len(sizes))])
        todo = [b for b in range(len(sizes)) if not done[b]]
        logging.info("%s: %d tests in %d batches, %d to run (%d already done)", desc, sum(sizes), len(sizes),
                     len(todo), len(sizes) - len(todo))
        own_bar = bar is None
        if own_bar:
            bar = tqdm(total=sum(sizes), initial=sum(sizes) - sum(sizes[b] for b in todo), desc=desc, unit="test")
        computed: dict[int, list[dict]] = {}
        with preemption_notice(store, desc):
            for b in todo:
                t = time.time()
                if not self._first_batch_logged:
                    self._first_batch_logged = True
                    logging.info("%s: first batch starts %.2fs after the model was loaded", desc, t - self.loaded_at)
                results = run_one(b)
                store.write(b, results)
                if getattr(self, "trim", False):   # (tests run this with stand-in engines)
                    release_freed_memory()
                computed[b] = results
                bar.update(len(results))
                logging.info("%s: batch %d/%d (%d tests) in %.1fs", desc, b + 1, len(sizes), len(results),
                             time.time() - t)
        if own_bar:
            bar.close()
        t = self.timings
        logging.info("%s: %s; time in shared prefix %.1fs, prefill %.1fs, decode %.1fs for %d steps (%d row-steps); "
                     "compiles included", desc, COMPILES, t["shared_prefix_s"], t["prefill_s"], t["decode_s"],
                     t["decode_steps"], t["decode_row_steps"])
        barrier(f"{desc}_done")
        return [computed[b] if b in computed else have[b] if b in have else store.read(b) for b in range(len(sizes))]


def _agreed_done(done: list[bool]) -> list[bool]:
    """Process 0's list of finished batches, on every process (so all run the same batches)."""
    if jax.process_count() == 1 or not done:
        return done
    from jax.experimental import multihost_utils

    return [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(done, np.int32))]
