"""Masking ablations of retrieval heads (Wu et al. 2024, Fig. 1 and §4; ORIGINAL.md §7).

`python -m rhead_jax.ablate` is a thin absl entry over `run_ablation`. The pieces:

  parse_mask_spec(text, scores, ...) -> [(layer, head), ...]   which heads to mask
  build_head_mask(cfg, heads)        -> [L, H] float32 ones with zeros at the masked heads
  classify_response(...)             -> the paper's failure taxonomy for one NIAH answer
  run_ablation(config, workdir, ...) -> the grid (or a QA / CoT task file) with heads masked

Mask specs (`config.ablation.mask`, `--mask`):
  none                no head masked
  top:K               the K heads with the largest mean retrieval score in the scores file
  random:K            K heads drawn from the heads scoring <= `config.ablation.threshold` (0.1)
                      in the scores file: never a retrieval head. One permutation of that pool is
                      drawn per seed (numpy default_rng(seed)) and its first K heads are masked, so
                      random:5 of a seed is a subset of its random:10; several seeds (`--seeds`) are
                      run and averaged.
  list:L-H,L-H,...    these heads (0-based layer and query head, the scores file's key format)

Mask modes (`config.mask`): mode "zero" multiplies a masked head's attention output by 0 before
the output projection; "uniform" multiplies its pre-softmax scores by 0, so it attends uniformly to
the visible keys (the original). phase "all" masks prefill and decode; "decode" masks the decode
steps only. Defaults zero/all; uniform/decode reproduces the original's ablation (ORIGINAL.md §7).
With phase "all" the shared-prefix prefill runs with the mask too: the cached keys and values of
later layers depend on the masked heads.

Tasks (`config.ablation.task`): "niah" (the needle grid of config.sweep; accuracy = mean ROUGE-1
recall of the answer span, 0-1), "qa:PATH" (extractive QA, accuracy = mean SQuAD F1; EM reported
too) or "cot:PATH" (math word problems with chain-of-thought; accuracy = share solved), see
rhead_jax.qa.

Failure taxonomy (NIAH; paper §4.1). Words are the ROUGE tokenizer's (lowercase, non-alphanumerics
to spaces), Porter-stemmed like ROUGE; "content words" exclude `STOPWORDS`. In order:
  correct           ROUGE-1 recall of the answer == 1 (full retrieval)
  empty             the response has no words at all
  incomplete        part of the needle's answer, not all of it (recall < 1): at least half of the
                    answer's distinct content words are in the response, OR the response contains a
                    verbatim fragment of the answer of `FRAGMENT` (3) consecutive words with at least
                    one content word ("eat a sandwich", "a sunny day")
  wrong_extraction  a run of `extraction_ngram` (default 5) consecutive response words occurs
                    verbatim in the haystack (the context with the needle removed): the model
                    copied the wrong part of the context
  hallucination     anything else: neither a real part of the answer nor a copied haystack passage
                    (a lone answer word such as "eat" in "eat your meals" does not count)
Single words shared with the haystack are NOT taken as extraction: the haystack is ordinary prose,
so common words overlap by chance. Each instance also records `content_recall`, the copied
passage (`haystack_copy`) and how many response words lie in copied n-grams (`copied_words`).

Workdir layout (local or gs://, every file written atomically):
  runs/<task>/<mode>-<phase>/<run label>/   one ResultStore per masked-head set: sweep_config.json
                                            (pinned; a different setting is refused) + batches/
  results.json                              this invocation's summary (schema below)
  heatmap_<group>.png                       Fig. 1 style: context length x depth, colour = score
  sweep_k.png / sweep_k.csv / sweep_k.md    accuracy vs number of masked heads, top vs random
  report.html                               the figures and tables (rhead_jax.report)
A run's batches are reused by any later invocation that asks for the same run (same heads, mode,
phase and grid), so `--sweep_k` after `--mask top:20` recomputes nothing for top:20.

results.json (accuracies are fractions 0-1; a "group" is one spec, e.g. random:20, over its seeds):
  model, task, mask {spec, mode, phase}, scores, retrieval_threshold, seeds
  accuracy, accuracy_std       the --mask group: mean over its runs (std over seeds; 0 otherwise)
  tests                        tests in that group, summed over its runs
  metrics                      niah {rouge1_recall}; qa {em, f1}; cot {accuracy}
  masked_heads                 [[layer, head], ...] (top: best first); random: one such list per seed
  accuracy_by_cell             niah: [{length, depth, accuracy}] (mean over needles and seeds)
  categories                   niah: {correct, incomplete, wrong_extraction, hallucination, empty} counts
  grid, taxonomy               niah: {lengths, depths, needles}; {extraction_ngram, categories, rules}
  baseline                     the "none" group (or null when not run)
  groups                       {spec: {spec, kind, k, runs, seeds, accuracy, accuracy_std, accuracy_by_run,
                               tests, masked_heads, metrics[, accuracy_by_cell, categories]}}
  sweep_k                      null, or {k, top, random, random_std, seeds, rows: [{k, top, random,
                               random_std, random_by_seed}]} (k = 0 is the unmasked baseline)
  runs                         {run label: {spec, seed, heads, tests, accuracy, metrics, ..., instances}};
                               niah instances: {key, length, depth, needle_index, response, generated,
                               rouge1_recall, score, category, content_recall, answer_fragment, haystack_copy,
                               copied_words};
                               qa/cot instances: {key, index, question, answer, response, generated,
                               em, f1 | prediction, correct, score}
  files                        the files written next to results.json
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import detection, io, qa, scoring, sweep_config
from rhead_jax.models.attention import AttentionOptions
from rhead_jax.models.generate import GenerateSpec, cache_size_for, pad_prompts
from rhead_jax.runner import Runner

MASK_MODES = ("zero", "uniform")
MASK_PHASES = ("all", "decode")
TASKS = ("niah", "qa", "cot")
CATEGORIES = ("correct", "incomplete", "wrong_extraction", "hallucination", "empty")
FAILURES = CATEGORIES[1:]
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as into onto over under
about up out off than then so too very is are was were be been being am it its this that these those
there here their they them he she his her him we our us you your i my me do does did doing done have
has had what which who whom whose when where why how not no nor can could will would shall should may
might must just also only all any some each every both such own same other more most""".split())
# Fig. 1's colormap (the needle-in-a-haystack test's red -> yellow -> green)
FIG1_COLORS = ("#F0496E", "#EBB839", "#0CD79F")
FRAGMENT = 3  # taxonomy: words in a verbatim answer fragment that makes an answer "incomplete"


# ============================================================================================ config
def ablation_config() -> ml_collections.ConfigDict:
    """The sweep's schema (sweep_config.default_config) plus the `mask` and `ablation` sections."""
    c = sweep_config.default_config()
    c.mask = ml_collections.ConfigDict(dict(
        mode="zero",         # "zero": masked head's output x 0; "uniform": its attention becomes uniform
        phase="all",         # "all": prefill and decode; "decode": decode steps only (the original)
    ))
    c.ablation = ml_collections.ConfigDict(dict(
        scores="",           # head-score file {"L-H": [scores]} (a sweep's head_scores.json); top:/random: need it
        mask="top:20",       # top:K | random:K | list:L-H,L-H,... | none
        seeds=(0,),          # random:K: one draw per seed, results averaged over seeds ('(0,1,2)' on the CLI)
        sweep_k=(),          # e.g. (0, 5, 10, 20): accuracy vs number of masked heads, top-k vs random
        baseline=True,       # also run with no head masked (the reference accuracy)
        task="niah",         # "niah" (config.sweep's grid) | "qa:PATH" | "cot:PATH" (rhead_jax.qa)
        threshold=scoring.RETRIEVAL_THRESHOLD,  # random heads come from heads with mean score <= this
        extraction_ngram=5,  # taxonomy: this many consecutive response words found in the haystack
        qa_max_new_tokens=32,    # decode cap for qa: tasks (stops at a newline or EOS)
        cot_max_new_tokens=256,  # decode cap for cot: tasks (stops at EOS only)
    ))
    return c


def merge_config(dst: ml_collections.ConfigDict, src) -> ml_collections.ConfigDict:
    """Recursively copy `src`'s values into `dst` (unknown keys are added; `validate_config` refuses them)."""
    for k, v in src.items():
        if isinstance(v, ml_collections.ConfigDict) and isinstance(dst.get(k), ml_collections.ConfigDict):
            merge_config(dst[k], v)
        elif isinstance(dst.get(k), tuple) and isinstance(v, list):
            dst[k] = tuple(v)
        else:
            dst[k] = v
    return dst


def _load_config_file(path: str, arg: str = ""):
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    name = "_rhead_user_config_" + hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def get_config(base: str = "") -> ml_collections.ConfigDict:
    """Config-file entry point for `python -m rhead_jax.ablate`: ml_collections loads this file as
    `ablation.py:<config file>`, so any sweep config (configs/*.py) gains the `mask` and `ablation`
    sections and `--config.mask.mode=uniform` style overrides work."""
    c = ablation_config()
    if base:
        path, _, arg = base.partition(":")
        merge_config(c, _load_config_file(path, arg))
    return c


def wrap_config_argv(argv: Sequence[str]) -> list[str]:
    """`--config X` -> `--config=<this file>:X`, after resolving bare names like the sweep
    (rhead_jax.cli): ml_collections then loads `get_config(X)` above, so overrides such as
    `--config.mask.mode=uniform` apply to the merged config."""
    from rhead_jax import cli

    here = str(Path(__file__).resolve())
    argv = cli.resolve_config_argv(list(argv))
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out.append(f"--config={here}:{argv[i + 1]}")
            i += 2
            continue
        if a.startswith("--config="):
            a = f"--config={here}:{a[len('--config='):]}"
        out.append(a)
        i += 1
    return out


def with_overrides(config, **overrides) -> ml_collections.ConfigDict:
    """A copy of `config` (merged into the ablation schema) with `config.ablation` fields replaced
    by the keyword arguments that are not None (scores, mask, seeds, sweep_k, task, baseline)."""
    c = ablation_config()
    merge_config(c, config)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in c.ablation:
            raise TypeError(f"unknown ablation override {k!r}; valid: {', '.join(c.ablation.keys())}")
        c.ablation[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    return c


def parse_task(text: str) -> tuple[str, str | None]:
    """"niah" -> ("niah", None); "qa:PATH" / "cot:PATH" -> (kind, PATH)."""
    text = str(text).strip()
    if text == "niah":
        return "niah", None
    kind, sep, path = text.partition(":")
    if kind in ("qa", "cot") and sep and path.strip():
        return kind, path.strip()
    raise ValueError(f"unknown task {text!r}; use niah, qa:PATH (JSONL of context/question/answer) or "
                     "cot:PATH (JSONL of question/answer)")


def validate_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuse unknown keys (listing the valid ones) and bad values; returns `c`."""
    valid = sweep_config._paths(ablation_config())
    unknown = sorted(sweep_config._paths(c) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
    plain = ml_collections.ConfigDict({k: v for k, v in c.items() if k not in ("mask", "ablation")})
    sweep_config.validate(plain)
    if c.mask.mode not in MASK_MODES:
        raise ValueError(f"config.mask.mode must be one of {MASK_MODES}, got {c.mask.mode!r}")
    if c.mask.phase not in MASK_PHASES:
        raise ValueError(f"config.mask.phase must be one of {MASK_PHASES}, got {c.mask.phase!r}")
    a = c.ablation
    MaskSpec.parse(a.mask)
    parse_task(a.task)
    seeds = list(a.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"config.ablation.seeds must be a non-empty list of integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.ablation.seeds has duplicates: {seeds}")
    ks = list(a.sweep_k)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks):
        raise ValueError(f"config.ablation.sweep_k must list integers >= 0, got {ks}")
    if not 0 <= float(a.threshold):
        raise ValueError(f"config.ablation.threshold must be >= 0, got {a.threshold}")
    if a.extraction_ngram < 2:
        raise ValueError(f"config.ablation.extraction_ngram must be >= 2, got {a.extraction_ngram}")
    if a.qa_max_new_tokens < 1 or a.cot_max_new_tokens < 1:
        raise ValueError("config.ablation.qa_max_new_tokens and cot_max_new_tokens must be >= 1")
    return c


# ============================================================================================ head sets
Head = tuple[int, int]
_HEAD_KEY = re.compile(r"^(\d+)-(\d+)$")


def parse_head(key: str) -> Head:
    m = _HEAD_KEY.match(str(key).strip())
    if not m:
        raise ValueError(f"malformed head {key!r}: expected LAYER-HEAD with 0-based integers, e.g. 16-19")
    return int(m.group(1)), int(m.group(2))


def head_key(head: Head) -> str:
    return f"{head[0]}-{head[1]}"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A parsed mask spec (module docstring). `top:0` / `random:0` / `list:` normalize to `none`."""

    kind: str                          # "none" | "top" | "random" | "list"
    k: int = 0
    heads: tuple[Head, ...] = ()       # list: only

    @classmethod
    def parse(cls, text: str) -> "MaskSpec":
        t = str(text).strip()
        kind, sep, rest = t.partition(":")
        kind = kind.strip().lower()
        if kind == "none" and not rest.strip():
            return cls("none")
        if kind in ("top", "random") and sep:
            try:
                k = int(rest.strip())
            except ValueError:
                raise ValueError(f"mask spec {text!r}: K must be an integer, e.g. {kind}:20") from None
            if k < 0:
                raise ValueError(f"mask spec {text!r}: K must be >= 0")
            return cls("none") if k == 0 else cls(kind, k)
        if kind == "list" and sep:
            parts = [p for p in rest.split(",") if p.strip()]
            heads = tuple(parse_head(p) for p in parts)
            dup = sorted({h for h in heads if heads.count(h) > 1})
            if dup:
                raise ValueError(f"mask spec {text!r} lists head(s) {', '.join(map(head_key, dup))} more than once")
            return cls("list", len(heads), heads) if heads else cls("none")
        raise ValueError(f"unknown mask spec {text!r}; use top:K, random:K, list:L-H,L-H,... or none")

    @property
    def text(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "list":
            return "list:" + ",".join(map(head_key, self.heads))
        return f"{self.kind}:{self.k}"

    @property
    def slug(self) -> str:
        """A file-name-safe label: none, top20, random20, list3-<hash>."""
        if self.kind in ("none",):
            return "none"
        if self.kind == "list":
            return f"list{self.k}-" + hashlib.sha1(self.text.encode()).hexdigest()[:8]
        return f"{self.kind}{self.k}"

    @property
    def needs_scores(self) -> bool:
        return self.kind in ("top", "random")


def load_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a head-score file `{"L-H": [score, ...]}` with clear errors."""
    if not str(path):
        raise ValueError("no head-score file given: pass --scores (e.g. a sweep's workdir/head_scores.json)")
    p = io.as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"head-score file {path} does not exist; run `python -m rhead_jax.sweep "
                                "--config <model>.py --workdir DIR` first, it writes DIR/head_scores.json")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"head-score file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"head-score file {path}: expected a non-empty JSON object "
                         "{\"<layer>-<head>\": [score, ...]}")
    for key, v in data.items():
        try:
            parse_head(key)
        except ValueError as e:
            raise ValueError(f"head-score file {path}: {e}") from None
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ValueError(f"head-score file {path}: head {key!r} must map to a list of numbers")
    return data


def check_heads(heads: Sequence[Head], num_layers: int, num_heads: int, *, what: str = "mask") -> None:
    bad = [h for h in heads if not (0 <= h[0] < num_layers and 0 <= h[1] < num_heads)]
    if bad:
        raise ValueError(f"{what}: head(s) {', '.join(map(head_key, bad[:8]))}{' ...' if len(bad) > 8 else ''} "
                         f"out of range for the model's {num_layers} layers x {num_heads} query heads "
                         f"(valid: 0-0 .. {num_layers - 1}-{num_heads - 1})")


def check_scores(scores: dict, num_layers: int, num_heads: int, path: str = "") -> None:
    """Every key of the scores file must name a head of the model (else it is another model's file)."""
    check_heads([parse_head(k) for k in scores], num_layers, num_heads,
                what=f"head-score file {path} (from a different model?)")
    if len(scores) != num_layers * num_heads:
        logging.warning("head-score file %s has %d heads, the model %d x %d = %d", path, len(scores),
                        num_layers, num_heads, num_layers * num_heads)


def random_pool(scores: dict, threshold: float = scoring.RETRIEVAL_THRESHOLD) -> list[Head]:
    """Heads a random mask may draw: mean score <= threshold, sorted by (layer, head)."""
    means = scoring.head_means(scores)
    return sorted(parse_head(k) for k, m in means.items() if m <= threshold)


def resolve_heads(spec: MaskSpec, scores: dict | None = None, *, num_layers: int | None = None,
                  num_heads: int | None = None, seed: int = 0,
                  threshold: float = scoring.RETRIEVAL_THRESHOLD) -> list[Head]:
    """The heads of a parsed spec (module docstring); top: best first, random: sorted."""
    if spec.needs_scores and scores is None:
        raise ValueError(f"mask {spec.text} needs a head-score file (--scores / config.ablation.scores)")
    if spec.kind == "none":
        heads: list[Head] = []
    elif spec.kind == "list":
        heads = list(spec.heads)
    elif spec.kind == "top":
        if spec.k > len(scores):
            raise ValueError(f"mask {spec.text}: the head-score file has only {len(scores)} heads")
        heads = [parse_head(k) for k, _ in scoring.top_heads(scores, spec.k)]
        weak = [k for k, m in scoring.top_heads(scores, spec.k) if m <= threshold]
        if weak:
            logging.warning("mask %s: %d of the heads score <= %g (not retrieval heads): %s", spec.text,
                            len(weak), threshold, ", ".join(weak))
    else:  # random
        pool = random_pool(scores, threshold)
        if num_layers is not None and num_heads is not None:
            pool = [h for h in pool if h[0] < num_layers and h[1] < num_heads]
        if spec.k > len(pool):
            raise ValueError(f"mask {spec.text}: only {len(pool)} heads score <= {threshold} (the pool random "
                             f"heads are drawn from, never retrieval heads); use K <= {len(pool)}")
        order = np.random.default_rng(seed).permutation(len(pool))
        heads = sorted(pool[i] for i in order[:spec.k])
    if num_layers is not None and num_heads is not None:
        check_heads(heads, num_layers, num_heads, what=f"mask {spec.text}")
    return heads


def parse_mask_spec(text: str, scores: dict | None = None, *, num_layers: int | None = None,
                    num_heads: int | None = None, seed: int = 0,
                    threshold: float = scoring.RETRIEVAL_THRESHOLD) -> list[Head]:
    """Mask spec text -> [(layer, head), ...] (module docstring for the syntax and rules)."""
    return resolve_heads(MaskSpec.parse(text), scores, num_layers=num_layers, num_heads=num_heads,
                         seed=seed, threshold=threshold)


def build_head_mask(cfg, heads: Sequence[Head]) -> np.ndarray:
    """[num_layers, num_heads] float32: 1 everywhere, 0 at `heads` (cfg: a ModelConfig or (L, H))."""
    L, H = (cfg.num_layers, cfg.num_heads) if hasattr(cfg, "num_layers") else tuple(cfg)
    heads = [tuple(map(int, h)) for h in heads]
    check_heads(heads, L, H)
    mask = np.ones((L, H), np.float32)
    for l, h in heads:
        mask[l, h] = 0.0
    return mask


def phase_masks(mask: np.ndarray | None, phase: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prefill_mask, decode_mask) for a phase: "all" -> (mask, mask); "decode" -> (None, mask)."""
    if phase not in MASK_PHASES:
        raise ValueError(f"mask phase must be one of {MASK_PHASES}, got {phase!r}")
    if mask is None:
        return None, None
    return (mask if phase == "all" else None), mask


# ============================================================================================ runs
@dataclasses.dataclass(frozen=True)
class Run:
    """One masked-head set: a spec, its seed (random: only) and the resolved heads."""

    spec: MaskSpec
    seed: int | None
    heads: tuple[Head, ...]

    @property
    def label(self) -> str:
        return self.spec.slug + (f"-seed{self.seed}" if self.seed is not None else "")


@dataclasses.dataclass(frozen=True)
class Group:
    """A spec and its runs (one per seed for random:K, else one)."""

    spec: MaskSpec
    runs: tuple[Run, ...]


def plan_groups(main: MaskSpec, *, seeds: Sequence[int], sweep_k: Sequence[int] = (), baseline: bool = True,
                scores: dict | None, num_layers: int, num_heads: int,
                threshold: float = scoring.RETRIEVAL_THRESHOLD) -> list[Group]:
    """Baseline (none), the main spec, then top:k and random:k for every k of sweep_k; duplicates
    dropped. Every head set is resolved (and every error raised) here, before any model work."""
    specs: list[MaskSpec] = []
    if baseline:
        specs.append(MaskSpec("none"))
    specs.append(main)
    for k in sorted(set(sweep_k)):
        specs += [MaskSpec("none")] if k == 0 else [MaskSpec("top", k), MaskSpec("random", k)]
    groups, seen = [], set()
    for spec in specs:
        if spec.text in seen:
            continue
        seen.add(spec.text)
        run_seeds = list(seeds) if spec.kind == "random" else [None]
        runs = tuple(Run(spec, s, tuple(resolve_heads(spec, scores, num_layers=num_layers, num_heads=num_heads,
                                                      seed=s or 0, threshold=threshold)))
                     for s in run_seeds)
        groups.append(Group(spec, runs))
    return groups


# ============================================================================================ taxonomy
def words(text: str) -> list[str]:
    """ROUGE's tokens without stemming: lowercase, non-alphanumerics to spaces."""
    from rouge_score import tokenize
    return tokenize.tokenize(text, None)


def stems(text: str) -> list[str]:
    """ROUGE's tokens with its own Porter stemming (words longer than 3 characters)."""
    from rouge_score import tokenizers
    return tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


def content_stems(text: str) -> set[str]:
    return set(stems(" ".join(w for w in words(text) if w not in STOPWORDS)))


def haystack_ngrams(segments: Sequence[str], n: int) -> frozenset:
    """Every n-gram of stemmed words within each segment (no n-gram spans two segments)."""
    out = set()
    for seg in segments:
        s = stems(seg)
        out.update(tuple(s[i:i + n]) for i in range(len(s) - n + 1))
    return frozenset(out)


def classify_response(response: str, answer: str, *, haystack: Sequence[str] | frozenset = (),
                      recall: float | None = None, ngram: int = 5) -> dict:
    """The paper's failure taxonomy for one answer (module docstring for the rules).

    haystack: the context with the needle removed, as text segments (or their `haystack_ngrams`).
    Returns {"category", "content_recall", "answer_fragment" (bool), "haystack_copy" (str or None),
    "copied_words"}.
    """
    from rhead_jax.needle.rouge import rouge1_recall

    if recall is None:
        recall = rouge1_recall(answer, response)
    resp = stems(response)
    target = content_stems(answer) or set(stems(answer))
    content_recall = len(target & set(resp)) / len(target) if target else 0.0
    ans = stems(answer)
    frags = {tuple(ans[i:i + FRAGMENT]) for i in range(len(ans) - FRAGMENT + 1)
             if set(ans[i:i + FRAGMENT]) & target}
    fragment = any(tuple(resp[i:i + FRAGMENT]) in frags for i in range(len(resp) - FRAGMENT + 1))
    grams = haystack if isinstance(haystack, frozenset) else haystack_ngrams(list(haystack), ngram)
    hits = [i for i in range(len(resp) - ngram + 1) if tuple(resp[i:i + ngram]) in grams]
    covered = {j for i in hits for j in range(i, i + ngram)}
    copy = None
    if hits:
        raw = words(response)
        copy = " ".join(raw[hits[0]:hits[0] + ngram])
    if recall >= 1.0:
        cat = "correct"
    elif not resp:
        cat = "empty"
    elif content_recall >= 0.5 or fragment:
        cat = "incomplete"
    elif hits:
        cat = "wrong_extraction"
    else:
        cat = "hallucination"
    return {"category": cat, "content_recall": content_recall, "answer_fragment": fragment, "haystack_copy": copy,
            "copied_words": len(covered)}


# ============================================================================================ tasks
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


_SLIM_DROP = ("copy_counts", "scores", "needle", "question", "answer")


class NiahTask:
    """The needle grid of config.sweep, run through detection's planning, batching and run_batch."""

    kind = "niah"

    def __init__(self, config, model, runner: Runner):
        self.config, self.model, self.runner = config, model, runner
        self.instances = detection.plan_instances(config, model)
        per_length = collections.Counter(i.length for i in self.instances)
        # never pad a batch beyond the largest group of one length (padding rows cost full compute)
        self.batch_size = min(config.sweep.batch_size, max(per_length.values()))
        self.batches = detection.make_batches(self.instances, self.batch_size)
        self.spec = dataclasses.replace(detection.generate_spec(config, model.tokenizer), mask_mode=config.mask.mode)
        self._shared: dict[str, detection.SharedPrefix] = {}
        self._ngrams: dict[str, frozenset] = {}

    @property
    def tag(self) -> str:
        return "niah"

    def pinned(self) -> dict:
        c = self.config
        return {"needles": c.needles, "haystack": c.haystack, "sweep": c.sweep.to_dict(),
                "batch_size_used": self.batch_size}

    def _shared_prefix(self, prefill_mask, label: str):
        if not self.config.sweep.share_prefix:
            return None
        key = "unmasked" if prefill_mask is None else label
        if key not in self._shared:
            if prefill_mask is not None:  # keep at most one masked prefix alive
                for k in [k for k in self._shared if k != "unmasked"]:
                    del self._shared[k]
            t = time.time()
            max_p = max(_round_up(i.num_prompt_tokens, self.config.sweep.pad_multiple) for i in self.instances)
            shared = detection.build_shared_prefix(self.model, self.instances, self.spec,
                                                   cache_size_for(max_p, self.spec), head_mask=prefill_mask,
                                                   runner=self.runner)
            jax.block_until_ready(shared.cache.k)
            logging.info("shared prefix (%s): %d tokens in %.1fs", key, shared.tokens, time.time() - t)
            self._shared[key] = shared
        return self._shared[key]

    def run(self, b: int, prefill_mask, decode_mask, label: str) -> list[dict]:
        batch = [self.instances[i] for i in self.batches[b]]
        shared = self._shared_prefix(prefill_mask, label)
        results = detection.run_batch(self.model, batch, self.spec, pad_multiple=self.config.sweep.pad_multiple,
                                      batch_size=self.batch_size, shared=shared, prefill_mask=prefill_mask,
                                      decode_mask=decode_mask, runner=self.runner)
        return [{k: v for k, v in r.items() if k not in _SLIM_DROP} for r in results]

    def _haystack(self, key: str) -> frozenset:
        if key not in self._ngrams:
            inst = next(i for i in self.instances if i.key == key)
            ids = np.asarray(inst.context_ids)
            a, b = inst.needle_pos, inst.needle_pos + len(inst.needle_ids)
            tok = self.model.tokenizer
            segs = [tok.decode(ids[:a].tolist(), skip_special_tokens=True),
                    tok.decode(ids[b:].tolist(), skip_special_tokens=True)]
            self._ngrams[key] = haystack_ngrams(segs, self.config.ablation.extraction_ngram)
        return self._ngrams[key]

    def records(self, results: Sequence[dict]) -> list[dict]:
        by_key = {i.key: i for i in self.instances}
        out = []
        for r in results:
            inst = by_key[r["key"]]
            tax = classify_response(r["response"], inst.answer, haystack=self._haystack(r["key"]),
                                    recall=r["rouge1_recall"], ngram=self.config.ablation.extraction_ngram)
            out.append({"key": r["key"], "length": r["length"], "depth": r["depth"],
                        "needle_index": r["needle_index"], "response": r["response"],
                        "generated": r["generated"], "rouge1_recall": r["rouge1_recall"],
                        "score": r["rouge1_recall"], **tax})
        return out

    def summarize(self, records: Sequence[dict]) -> dict:
        cells = collections.defaultdict(list)
        for r in records:
            cells[(r["length"], r["depth"])].append(r["score"])
        cats = collections.Counter(r["category"] for r in records)
        return {"tests": len(records),
                "accuracy": float(np.mean([r["score"] for r in records])) if records else 0.0,
                "accuracy_by_cell": [{"length": L, "depth": d, "accuracy": float(np.mean(v)), "tests": len(v)}
                                     for (L, d), v in sorted(cells.items())],
                "metrics": {"rouge1_recall": float(np.mean([r["score"] for r in records])) if records else 0.0},
                "categories": {c: cats.get(c, 0) for c in CATEGORIES}}


class TextTask:
    """An extractive-QA or chain-of-thought task file (rhead_jax.qa), generated with heads masked."""

    def __init__(self, config, model, runner: Runner, kind: str, path: str):
        self.config, self.model, self.runner, self.kind, self.path = config, model, runner, kind, path
        self.items = qa.load_tasks(path, kind)
        tok = model.tokenizer
        self.prompts = [qa.build_prompt_ids(tok, it, kind, chat=config.model.chat) for it in self.items]
        a, s = config.ablation, config.sweep
        n_new = a.qa_max_new_tokens if kind == "qa" else a.cot_max_new_tokens
        limit = model.cfg.max_position_embeddings
        for i, p in enumerate(self.prompts):
            if len(p) + n_new > limit:
                raise ValueError(f"{path}: item {i} has a prompt of {len(p)} tokens; with {n_new} new tokens it "
                                 f"exceeds the model's max_position_embeddings={limit}")
        if kind == "qa":
            stops = detection.stop_tokens(tok, faithful=False)
        else:
            stops = (int(tok.eos_token_id),) if tok.eos_token_id is not None else ()
        self.spec = GenerateSpec(max_new_tokens=n_new, stop_tokens=stops, top_k=0, mask_mode=config.mask.mode,
                                 prefill_chunk=s.prefill_chunk,
                                 attn=AttentionOptions(q_chunk=s.q_chunk, k_chunk=s.k_chunk))
        self.batch_size = min(s.batch_size, len(self.items))
        self.batches = [list(range(i, min(i + self.batch_size, len(self.items))))
                        for i in range(0, len(self.items), self.batch_size)]

    @property
    def tag(self) -> str:
        return f"{self.kind}-{Path(self.path).stem}"

    def pinned(self) -> dict:
        a = self.config.ablation
        return {"task_file": str(self.path), "max_new_tokens": self.spec.max_new_tokens,
                "sweep": self.config.sweep.to_dict(), "batch_size_used": self.batch_size}

    def run(self, b: int, prefill_mask, decode_mask, label: str) -> list[dict]:
        idx = self.batches[b]
        # pad short batches (repeating the last item) to one shape that divides the data axis
        rows = idx + [idx[-1]] * (_round_up(self.batch_size, self.runner.data_size) - len(idx))
        pm = self.config.sweep.pad_multiple
        arr, lens = pad_prompts([self.prompts[i] for i in rows], pm)
        cache = self.runner.init_cache(len(rows), cache_size_for(arr.shape[1], self.spec))
        width = _round_up(max(int(lens.max()) - 1, 1), pm)
        gen = self.runner.generate(arr, lens, cache, spec=self.spec, prefill_width=width,
                                   prefill_mask=prefill_mask, decode_mask=decode_mask)
        toks, n = np.asarray(gen.tokens), np.asarray(gen.num_tokens)
        out = []
        for row, i in enumerate(idx):
            generated = toks[row, :n[row]].tolist()
            response = self.model.tokenizer.decode(generated, skip_special_tokens=True).strip()
            out.append({"key": f"item{i:04d}", "index": i, "prompt_tokens": len(self.prompts[i]),
                        "generated": generated, "response": response})
        return out

    def records(self, results: Sequence[dict]) -> list[dict]:
        out = []
        for r in results:
            item = self.items[r["index"]]
            m = qa.score_response(self.kind, r["response"], item)
            out.append({"key": r["key"], "index": r["index"], "question": item["question"],
                        "answer": item["answer"], "response": r["response"],
                        "generated": r["generated"], **m, "score": qa.item_accuracy(self.kind, m)})
        return out

    def summarize(self, records: Sequence[dict]) -> dict:
        return {"tests": len(records),
                "accuracy": float(np.mean([r["score"] for r in records])) if records else 0.0,
                "metrics": qa.aggregate(self.kind, records)}


# ============================================================================================ summaries
def group_summary(group: Group, run_summaries: dict[str, dict]) -> dict:
    """Mean (and std over seeds) of a group's runs."""
    sums = [run_summaries[r.label] for r in group.runs]
    accs = [s["accuracy"] for s in sums]
    out = {"spec": group.spec.text, "kind": group.spec.kind, "k": group.spec.k,
           "runs": [r.label for r in group.runs],
           "seeds": [r.seed for r in group.runs] if group.spec.kind == "random" else None,
           "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "accuracy_by_run": {r.label: s["accuracy"] for r, s in zip(group.runs, sums)},
           "tests": sum(s["tests"] for s in sums)}
    if group.spec.kind == "random":
        out["masked_heads"] = [[list(h) for h in r.heads] for r in group.runs]
    else:
        out["masked_heads"] = [list(h) for h in group.runs[0].heads]
    metrics = collections.defaultdict(list)
    for s in sums:
        for k, v in s["metrics"].items():
            metrics[k].append(v)
    out["metrics"] = {k: float(np.mean(v)) for k, v in metrics.items()}
    if "accuracy_by_cell" in sums[0]:
        cells = collections.defaultdict(list)
        for s in sums:
            for c in s["accuracy_by_cell"]:
                cells[(c["length"], c["depth"])].append(c["accuracy"])
        out["accuracy_by_cell"] = [{"length": L, "depth": d, "accuracy": float(np.mean(v))}
                                   for (L, d), v in sorted(cells.items())]
        out["categories"] = {c: sum(s["categories"][c] for s in sums) for c in CATEGORIES}
    return out


def sweep_k_table(ks: Sequence[int], groups: dict[str, dict], seeds: Sequence[int]) -> dict:
    """Accuracy against the number of masked heads: top-k and random-k (mean, std, per seed)."""
    rows = []
    for k in sorted(set(ks)):
        if k == 0:
            g = groups["none"]
            rows.append({"k": 0, "top": g["accuracy"], "random": g["accuracy"], "random_std": 0.0,
                         "random_by_seed": {str(s): g["accuracy"] for s in seeds}})
            continue
        top, rnd = groups[f"top:{k}"], groups[f"random:{k}"]
        rows.append({"k": k, "top": top["accuracy"], "random": rnd["accuracy"], "random_std": rnd["accuracy_std"],
                     "random_by_seed": {str(r.split("-seed")[-1]): a for r, a in rnd["accuracy_by_run"].items()}})
    return {"k": [r["k"] for r in rows], "top": [r["top"] for r in rows], "random": [r["random"] for r in rows],
            "random_std": [r["random_std"] for r in rows], "seeds": list(seeds), "rows": rows}


def sweep_k_csv(table: dict) -> str:
    seeds = [str(s) for s in table["seeds"]]
    lines = ["k,top_accuracy,random_accuracy_mean,random_accuracy_std," + ",".join(f"random_seed{s}" for s in seeds)]
    for r in table["rows"]:
        lines.append(f"{r['k']},{r['top']:.4f},{r['random']:.4f},{r['random_std']:.4f},"
                     + ",".join(f"{r['random_by_seed'][s]:.4f}" for s in seeds))
    return "\n".join(lines) + "\n"


def sweep_k_markdown(table: dict, metric: str = "accuracy") -> str:
    lines = [f"| heads masked (k) | top-k retrieval heads {metric} | k random non-retrieval heads {metric} "
             f"(mean ± std over {len(table['seeds'])} seed{'s' if len(table['seeds']) != 1 else ''}) |",
             "|---:|---:|---:|"]
    for r in table["rows"]:
        lines.append(f"| {r['k']} | {100 * r['top']:.1f} | {100 * r['random']:.1f} ± {100 * r['random_std']:.1f} |")
    return "\n".join(lines) + "\n"


# ============================================================================================ plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fig1_heatmap(cells: Sequence[dict], path, title: str = "") -> None:
    """Fig. 1 style: context length (x) x needle depth (y), colour = score 0-100 (red-yellow-green)."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _plt()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = 100 * c["accuracy"]
    cmap = LinearSegmentedColormap.from_list("fig1", FIG1_COLORS)
    fig, ax = plt.subplots(figsize=(min(12.0, 3.6 + 0.75 * len(lengths)), min(8.0, 2.0 + 0.45 * len(depths))))
    im = ax.pcolormesh(grid, cmap=cmap, vmin=0, vmax=100, edgecolors="white", linewidth=1.0)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j + 0.5, i + 0.5, f"{v:.0f}", ha="center", va="center", fontsize=8, color="#222")
    ax.set_xticks(np.arange(len(lengths)) + 0.5)
    ax.set_xticklabels([str(L) for L in lengths], rotation=45 if len(lengths) > 8 else 0, fontsize=8)
    ax.set_yticks(np.arange(len(depths)) + 0.5)
    ax.set_yticklabels([f"{d:g}" for d in depths], fontsize=8)
    ax.invert_yaxis()  # depth 0 at the top, as in the paper
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score (ROUGE-1 recall x 100)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep_k(table: dict, path, title: str = "", metric: str = "accuracy (%)") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    k = np.asarray(table["k"])
    ax.plot(k, 100 * np.asarray(table["top"]), "o-", color="#d62728", label="top-k retrieval heads masked")
    ax.errorbar(k, 100 * np.asarray(table["random"]), yerr=100 * np.asarray(table["random_std"]), fmt="s--",
                color="#1f77b4", capsize=3, label=f"k random non-retrieval heads ({len(table['seeds'])} seeds)")
    ax.set_xlabel("number of masked heads (k)")
    ax.set_ylabel(metric)
    ax.set_ylim(-3, 103)
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================ report
def _html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    import html
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _heads_html(heads) -> str:
    if heads and isinstance(heads[0][0], list):
        return "<br>".join(" ".join(head_key(h) for h in hs) for hs in heads)
    return " ".join(head_key(h) for h in heads) or "—"


def report_sections(results: dict, files: dict[str, Path]) -> list[tuple[str, Any]]:
    """The ablation's sections for rhead_jax.report.write_report(extra_sections=...)."""
    niah = results["task"] == "niah"
    rows = []
    for g in results["groups"].values():
        cats = " ".join(f"{c}: {g['categories'][c]}" for c in CATEGORIES) if niah else ""
        rows.append([g["spec"], len(g["runs"]), f"{100 * g['accuracy']:.1f}",
                     f"{100 * g['accuracy_std']:.1f}" if g["kind"] == "random" else "",
                     ", ".join(f"{k} {100 * v:.1f}" for k, v in g["metrics"].items()),
                     cats, f'<div class="heads">{_heads_html(g["masked_heads"])}</div>'])
    m = results["mask"]
    note = (f'<p class="note">Model <b>{results["model"]}</b>, task <b>{results["task"]}</b>, mask mode '
            f'<b>{m["mode"]}</b>, phase <b>{m["phase"]}</b>. Accuracy: '
            + ("mean ROUGE-1 recall of the answer span x 100." if niah else
               "mean SQuAD F1 x 100." if results["task"].startswith("qa") else "share of problems solved x 100.")
            + " Random heads are drawn once per seed from heads scoring ≤ "
            f'{results["retrieval_threshold"]} (never retrieval heads).</p>')
    sections = [("Ablation: accuracy with heads masked",
                 note + _html_table(["mask", "runs", "accuracy", "std over seeds", "metrics",
                                     "answers (taxonomy)" if niah else "", "masked heads"], rows))]
    if niah:
        heat = [files[k] for k in files if k.startswith("heatmap_")]
        if heat:
            sections.append(("Needle in a haystack with heads masked (Fig. 1 style)", heat))
        rules = ("<p class=\"note\">Failed answers (recall &lt; 1): <b>empty</b> no words; <b>incomplete</b> "
                 f"≥ half of the answer's content words present, or a verbatim {FRAGMENT}-word fragment of the "
                 "answer; <b>wrong_extraction</b> a run of "
                 f"{results['taxonomy']['extraction_ngram']} consecutive response words occurs verbatim in the "
                 "haystack; <b>hallucination</b> otherwise. See rhead_jax/ablation.py.</p>")
        sections.append(("Failure taxonomy", rules))
    if results.get("sweep_k"):
        t = results["sweep_k"]
        trows = [[r["k"], f"{100 * r['top']:.1f}", f"{100 * r['random']:.1f} ± {100 * r['random_std']:.1f}"]
                 for r in t["rows"]]
        sections.append(("Accuracy vs number of masked heads: top-k vs random",
                         [files["sweep_k.png"], _html_table(["k", "top-k retrieval heads", "k random heads"], trows)]))
    return sections


# ============================================================================================ outputs
def _atomic_write_bytes(path, data: bytes | str) -> None:
    """Like rhead_jax.io.atomic_write_text, but REPLACES an existing file (etils' rename refuses
    to): the outputs of a resumed or extended ablation are rewritten."""
    path = io.as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)


def format_summary(results: dict) -> str:
    m = results["mask"]
    lines = [f"== ablation of {results['model']} on {results['task']} (mask mode {m['mode']}, phase {m['phase']}) =="]
    for g in results["groups"].values():
        std = f" ± {100 * g['accuracy_std']:.1f}" if g["kind"] == "random" and len(g["runs"]) > 1 else ""
        cats = ""
        if "categories" in g:
            cats = "  [" + ", ".join(f"{c} {g['categories'][c]}" for c in CATEGORIES if g["categories"][c]) + "]"
        lines.append(f"{g['spec']:>14}: accuracy {100 * g['accuracy']:.1f}{std} over {g['tests']} tests{cats}")
    if results.get("sweep_k"):
        lines.append(sweep_k_markdown(results["sweep_k"]).rstrip())
    return "\n".join(lines)


def _run_json(config, task, run: Run) -> str:
    """What a run's results depend on: pinned in its ResultStore (a mismatch is refused)."""
    return json.dumps({"model": config.model.to_dict(), "task": task.tag, **task.pinned(),
                       "mask": {"mode": config.mask.mode, "phase": config.mask.phase},
                       "run": run.label, "heads": [list(h) for h in run.heads]}, sort_keys=True, indent=1)


def run_ablation(config, workdir: str, *, model=None, is_writer: bool | None = None, scores: str | None = None,
                 mask: str | None = None, seeds: Sequence[int] | None = None, sweep_k: Sequence[int] | None = None,
                 task: str | None = None, baseline: bool | None = None) -> dict:
    """Run (or resume) an ablation into `workdir`; returns the results.json object.

    Keyword arguments that are not None replace the config.ablation fields of the same name.
    With config.mesh asking for several devices, runs are sharded like the sweep's
    (rhead_jax.runner); on several hosts only process 0 writes files (is_writer=None).
    """
    from rhead_jax.checkpoints import load_model
    from rhead_jax.report import write_report

    t0 = time.time()
    config = validate_config(with_overrides(config, scores=scores, mask=mask, seeds=seeds, sweep_k=sweep_k,
                                            task=task, baseline=baseline))
    a = config.ablation
    kind, task_path = parse_task(a.task)
    main = MaskSpec.parse(a.mask)
    ks = sorted(set(a.sweep_k))
    need = main.needs_scores or any(k > 0 for k in ks)
    score_data = load_scores(a.scores) if (a.scores or need) else None  # fail before loading the model
    if kind != "niah":
        qa.load_tasks(task_path, kind)

    mesh = detection.mesh_from_config(config)
    if model is None:
        model = load_model(config.model.path, dtype=config.model.dtype, mesh=mesh)
    elif mesh is not None:
        from rhead_jax.sharding import shard_params

        model = dataclasses.replace(model, params=shard_params(model.params, model.cfg, mesh))
    runner = Runner(model.cfg, model.params, mesh)
    if is_writer is None:
        is_writer = jax.process_index() == 0
    name = config.model.name or model.name
    L, H = model.cfg.num_layers, model.cfg.num_heads
    if score_data is not None:
        check_scores(score_data, L, H, a.scores)
    groups = plan_groups(main, seeds=list(a.seeds), sweep_k=ks, baseline=a.baseline, scores=score_data,
                         num_layers=L, num_heads=H, threshold=a.threshold)
    the_task = (NiahTask(config, model, runner) if kind == "niah"
                else TextTask(config, model, runner, kind, task_path))

    runs: dict[str, Run] = {}
    for g in groups:
        for r in g.runs:
            runs.setdefault(r.label, r)
    root = io.as_path(workdir)
    run_root = root / "runs" / the_task.tag / f"{config.mask.mode}-{config.mask.phase}"
    stores = {lbl: detection.ResultStore(str(run_root / lbl), _run_json(config, the_task, r), writer=is_writer)
              for lbl, r in runs.items()}
    nb = len(the_task.batches)
    todo = {lbl: [b for b in range(nb) if not stores[lbl].done(b)] for lbl in runs}
    n_todo = sum(len(v) for v in todo.values())
    logging.info("%s: %d run(s) x %d batches (%d tests each); %d batches to run, %d already done", name,
                 len(runs), nb, sum(map(len, the_task.batches)), n_todo, len(runs) * nb - n_todo)

    sizes = [len(b) for b in the_task.batches]
    total = len(runs) * sum(sizes)
    bar = tqdm(total=total, initial=total - sum(sizes[b] for v in todo.values() for b in v),
               desc=f"ablate {name}", unit="test")
    for lbl, run in runs.items():
        if not todo[lbl]:
            continue
        head_mask = build_head_mask(model.cfg, run.heads) if run.heads else None
        prefill_mask, decode_mask = phase_masks(head_mask, config.mask.phase)
        for b in todo[lbl]:
            t = time.time()
            res = the_task.run(b, prefill_mask, decode_mask, lbl)
            stores[lbl].write(b, res)
            bar.update(len(res))
            logging.info("%s: batch %d/%d (%d tests) in %.1fs", lbl, b + 1, nb, len(res), time.time() - t)
    bar.close()

    run_records = {lbl: the_task.records([r for b in range(nb) for r in stores[lbl].read(b)]) for lbl in runs}
    run_sums = {lbl: the_task.summarize(recs) for lbl, recs in run_records.items()}
    order = {"none": 0, "top": 1, "random": 2, "list": 3}
    groups = sorted(groups, key=lambda g: (g.spec.k, order[g.spec.kind]))  # none, top:5, random:5, top:10, ...
    group_sums = {g.spec.text: group_summary(g, run_sums) for g in groups}
    main_g = group_sums[main.text]
    results: dict[str, Any] = {
        "model": name, "task": a.task,
        "mask": {"spec": main.text, "mode": config.mask.mode, "phase": config.mask.phase},
        "scores": a.scores or None, "retrieval_threshold": a.threshold, "seeds": list(a.seeds),
        "accuracy": main_g["accuracy"], "accuracy_std": main_g["accuracy_std"], "tests": main_g["tests"],
        "metrics": main_g["metrics"], "masked_heads": main_g["masked_heads"],
    }
    if kind == "niah":
        results["accuracy_by_cell"] = main_g["accuracy_by_cell"]
        results["categories"] = main_g["categories"]
        results["grid"] = {"lengths": sorted(set(config.sweep.lengths)), "depths": sorted(set(config.sweep.depths)),
                           "needles": len({i.needle_index for i in the_task.instances})}
        results["taxonomy"] = {"extraction_ngram": a.extraction_ngram, "categories": list(CATEGORIES),
                               "rules": "see rhead_jax/ablation.py (module docstring)"}
    results["baseline"] = group_sums.get("none")
    results["groups"] = group_sums
    results["sweep_k"] = sweep_k_table(ks, group_sums, list(a.seeds)) if ks else None
    results["runs"] = {lbl: {"spec": r.spec.text, "seed": r.seed, "heads": [list(h) for h in r.heads],
                             **run_sums[lbl], "instances": run_records[lbl]} for lbl, r in runs.items()}

    files: dict[str, Path] = {}
    if is_writer:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            metric = "accuracy (%)" if kind != "qa" else "F1 (%)"
            if kind == "niah":
                for g in groups:
                    gs = group_sums[g.spec.text]
                    f = tmp / f"heatmap_{g.spec.slug}.png"
                    seeds_txt = f", {len(g.runs)} seeds" if len(g.runs) > 1 else ""
                    plot_fig1_heatmap(gs["accuracy_by_cell"], f,
                                      f"{name}: {g.spec.text} masked ({config.mask.mode}/{config.mask.phase}"
                                      f"{seeds_txt})\naccuracy {100 * gs['accuracy']:.1f}")
                    files[f.name] = f
            if results["sweep_k"]:
                f = tmp / "sweep_k.png"
                plot_sweep_k(results["sweep_k"], f, f"{name} on {the_task.tag}: heads masked "
                             f"({config.mask.mode}/{config.mask.phase})", metric=metric)
                files[f.name] = f
                for fname, text in (("sweep_k.csv", sweep_k_csv(results["sweep_k"])),
                                    ("sweep_k.md", sweep_k_markdown(results["sweep_k"]))):
                    (tmp / fname).write_text(text)
                    files[fname] = tmp / fname
            results["files"] = sorted(files) + ["results.json", "report.html"]
            report = write_report(tmp / "report", {}, extra_sections=report_sections(results, files),
                                  title=f"Retrieval-head ablation: {name}")
            for fname, f in files.items():
                _atomic_write_bytes(root / fname, f.read_bytes())
            _atomic_write_bytes(root / "report.html", report.read_bytes())
        _atomic_write_bytes(root / "results.json", json.dumps(results, indent=1))
    print(format_summary(results), flush=True)
    logging.info("ablation done in %.1fs", time.time() - t0)
    return results
