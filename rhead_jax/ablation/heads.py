"""Which heads to mask: mask specs, head-score files, the [L, H] head mask, runs and groups.

Mask specs (`config.ablation.mask`, `--mask`):
  none                no head masked
  top:K               the K heads with the largest mean retrieval score in the scores file
  top:K@NAME          the K query heads ranked first by the ranking NAME of --scores (several rankings:
                      `--scores NAME:PATH,NAME:PATH,...`, head-score JSONs or gate TSVs; rhead_jax.rankings
                      says how a KV-head ranking gives K query heads); top:K alone = the first ranking
  random:K            K heads drawn from the heads scoring <= `config.ablation.threshold` (0.1)
                      in the scores file (with several rankings: in the FIRST one, so the random
                      runs are the same whatever the other rankings): never a retrieval head. One
                      permutation of that pool is drawn per seed (numpy default_rng(seed)) and its
                      first K heads are masked, so random:5 of a seed is a subset of its random:10;
                      several seeds (`--seeds`) are run and averaged.
  list:L-H,L-H,...    these heads (0-based layer and query head, the scores file's key format)

Mask modes (`config.mask`): mode "zero" multiplies a masked head's attention output by 0 before
the output projection; "uniform" multiplies its pre-softmax scores by 0, so it attends uniformly to
the visible keys (the original). phase "all" masks prefill and decode; "decode" masks the decode
steps only. Defaults zero/all; uniform/decode reproduces the original's ablation (ORIGINAL.md §7).

Rankings (`load_rankings`): `--scores PATH` (one unnamed head-score file: the specs and run labels
above, as they always were) or `--scores NAME:PATH,NAME:PATH,...` (any number of rankings, each a
head-score JSON or a gate TSV; an unnamed entry is named after its file's stem). A run of top:K@NAME
is stored under `top<K>-h<hash of its heads>`: two rankings, or two invocations, that mask the same
heads share one run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from rhead_jax import io, rankings, scoring
from rhead_jax.rankings import Ranking
from rhead_jax.scoring import head_key, parse_head
from rhead_jax.config import MASK_PHASES
from rhead_jax.errors import UserError

Head = tuple[int, int]
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A parsed mask spec (module docstring). `top:0` / `random:0` / `list:` normalize to `none`."""

    kind: str                          # "none" | "top" | "random" | "list"
    k: int = 0
    heads: tuple[Head, ...] = ()       # list: only
    ranking: str = ""                  # top: only; "" = the only (or first) ranking

    @classmethod
    def parse(cls, text: str) -> "MaskSpec":
        t = str(text).strip()
        kind, sep, rest = t.partition(":")
        kind = kind.strip().lower()
        rest, at, ranking = rest.partition("@")
        if at:
            ranking = ranking.strip()
            if kind != "top" or not ranking:
                raise UserError(f"mask spec {text!r}: only top:K takes a ranking, as top:K@NAME (NAME from "
                                "--scores NAME:PATH,...)")
            spec = cls.parse(f"top:{rest}")
            return spec if spec.kind == "none" else cls("top", spec.k, ranking=ranking)
        if kind == "none" and not rest.strip():
            return cls("none")
        if kind in ("top", "random") and sep:
            try:
                k = int(rest.strip())
            except ValueError:
                raise UserError(f"mask spec {text!r}: K must be an integer, e.g. {kind}:20") from None
            if k < 0:
                raise UserError(f"mask spec {text!r}: K must be >= 0")
            return cls("none") if k == 0 else cls(kind, k)
        if kind == "list" and sep:
            parts = [p for p in rest.split(",") if p.strip()]
            heads = tuple(parse_head(p) for p in parts)
            dup = sorted({h for h in heads if heads.count(h) > 1})
            if dup:
                raise UserError(f"mask spec {text!r} lists head(s) {', '.join(map(head_key, dup))} more than once")
            return cls("list", len(heads), heads) if heads else cls("none")
        raise UserError(f"unknown mask spec {text!r}; use top:K, random:K, list:L-H,L-H,... or none")

    @property
    def text(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "list":
            return "list:" + ",".join(map(head_key, self.heads))
        return f"{self.kind}:{self.k}" + (f"@{self.ranking}" if self.ranking else "")

    @property
    def slug(self) -> str:
        """A file-name-safe label: none, top20, top20-<ranking>, random20, list3-<hash>."""
        if self.kind in ("none",):
            return "none"
        if self.kind == "list":
            return f"list{self.k}-" + hashlib.sha1(self.text.encode()).hexdigest()[:8]
        if self.ranking:
            return f"{self.kind}{self.k}-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in self.ranking)
        return f"{self.kind}{self.k}"

    @property
    def needs_scores(self) -> bool:
        return self.kind in ("top", "random")


def load_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a head-score file `{"L-H": [score, ...]}` with clear errors."""
    if not str(path):
        raise UserError("no head-score file given: pass --scores (e.g. a sweep's workdir/head_scores.json)")
    p = io.as_path(path)
    if not p.exists():
        raise UserError(f"head-score file {path} does not exist; run `python -m rhead_jax.sweep "
                                "--config <model>.py --workdir DIR` first, it writes DIR/head_scores.json")
    try:
        data = rankings.unwrap_released(json.loads(p.read_text()))   # LOCOS's released files too
    except json.JSONDecodeError as e:
        raise UserError(f"head-score file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"head-score file {path}: expected a non-empty JSON object "
                         "{\"<layer>-<head>\": [score, ...]}")
    for key, v in data.items():
        try:
            parse_head(key)
        except ValueError as e:
            raise UserError(f"head-score file {path}: {e}") from None
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise UserError(f"head-score file {path}: head {key!r} must map to a list of numbers")
    return data


def load_rankings(text: str) -> tuple[dict | None, dict[str, Ranking]]:
    """`--scores` -> (the head-score dict when it names ONE unnamed file, else None; {name: Ranking}).

    One unnamed file keeps the single-file behaviour (ranking name "", specs top:K); otherwise every
    comma-separated entry is NAME:PATH or PATH (named after the file's stem), a head-score JSON or a
    gate .tsv. The JSONs are checked like a single file; names must differ."""
    entries = [rankings.split_spec(x.strip()) for x in str(text).split(",") if x.strip()]
    if not entries:
        load_scores("")  # the error naming --scores
    if len(entries) == 1 and entries[0][0] is None and not entries[0][1].endswith(".tsv"):
        data = load_scores(entries[0][1])
        return data, {"": Ranking("", rankings.head_score_array(data), "query", entries[0][1])}
    out: dict[str, Ranking] = {}
    for name, path in entries:
        name = name or os.path.splitext(os.path.basename(path))[0]
        if name in out:
            raise UserError(f"--scores names two rankings {name!r} ({out[name].path}, {path}): label them NAME:PATH")
        if path.endswith(".tsv"):
            out[name] = Ranking(name, rankings.read_gates_tsv(path), "kv", path)
        else:
            out[name] = Ranking(name, rankings.head_score_array(load_scores(path)), "query", path)
    return None, out


def check_heads(heads: Sequence[Head], num_layers: int, num_heads: int, *, what: str = "mask") -> None:
    bad = [h for h in heads if not (0 <= h[0] < num_layers and 0 <= h[1] < num_heads)]
    if bad:
        raise UserError(f"{what}: head(s) {', '.join(map(head_key, bad[:8]))}{' ...' if len(bad) > 8 else ''} "
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


def _rankings_of(scores) -> dict[str, Ranking] | None:
    """{name: Ranking} when `scores` is a Ranking or a mapping of them; None for a head-score dict."""
    if isinstance(scores, Ranking):
        return {scores.name: scores}
    if isinstance(scores, dict) and scores and all(isinstance(v, Ranking) for v in scores.values()):
        return scores
    return None


def resolve_heads(spec: MaskSpec, scores=None, *, num_layers: int | None = None,
                  num_heads: int | None = None, seed: int = 0,
                  threshold: float = scoring.RETRIEVAL_THRESHOLD, group_size: int = 1) -> list[Head]:
    """The heads of a parsed spec (module docstring); top: best first, random: sorted.

    scores: a head-score dict (one file), or a Ranking / {name: Ranking} (top:K@NAME picks one, top:K
    the first; random heads come from the first); group_size: query heads per KV head of the model
    (KV rankings)."""
    if spec.needs_scores and not scores:
        raise UserError(f"mask {spec.text} needs a head-score file (--scores / config.ablation.scores)")
    ranks = _rankings_of(scores)
    if spec.ranking and (ranks is None or spec.ranking not in ranks):
        given = ", ".join(n for n in (ranks or {}) if n) or "one unnamed file"
        raise UserError(f"mask {spec.text}: no ranking named {spec.ranking!r}; --scores gives {given} "
                        "(name them: --scores NAME:PATH,NAME:PATH)")
    if spec.kind == "none":
        heads: list[Head] = []
    elif spec.kind == "list":
        heads = list(spec.heads)
    elif ranks is not None:
        first = next(iter(ranks.values()))
        r = ranks[spec.ranking] if spec.ranking else first
        n = r.per_query(group_size).size
        label = f"ranking {r.name}" if r.name else "the head-score file"
        if spec.kind == "top":
            if spec.k > n:
                raise UserError(f"mask {spec.text}: {label} has only {n} query heads")
            heads = r.top_query_heads(spec.k, group_size)
            ties = r.ties_at_cut(spec.k, group_size)
            if ties:
                logging.warning("mask %s: %d query heads tie at the cut of %s; the tie goes by layer/head order",
                                spec.text, ties, label)
        else:  # random: from the first ranking
            s = first.per_query(group_size)
            pool = [(l, h) for l in range(s.shape[0]) for h in range(s.shape[1]) if s[l, h] <= threshold]
            if num_layers is not None and num_heads is not None:
                pool = [h for h in pool if h[0] < num_layers and h[1] < num_heads]
            if spec.k > len(pool):
                raise UserError(f"mask {spec.text}: only {len(pool)} heads score <= {threshold} in ranking "
                                f"{first.name or 'the head-score file'} (the pool random heads are drawn from); "
                                f"use K <= {len(pool)}")
            order = np.random.default_rng(seed).permutation(len(pool))
            heads = sorted(pool[i] for i in order[:spec.k])
    elif spec.kind == "top":
        if spec.k > len(scores):
            raise UserError(f"mask {spec.text}: the head-score file has only {len(scores)} heads")
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
            raise UserError(f"mask {spec.text}: only {len(pool)} heads score <= {threshold} (the pool random "
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


def build_head_mask(cfg, heads: Sequence[Head], means: np.ndarray | None = None) -> np.ndarray:
    """[num_layers, num_heads] float32: 1 everywhere, 0 at `heads` (cfg: a ModelConfig or (L, H)).
    With `means` [L, H, D] (the mean modes, `calibration_means`): [L, H, 1 + D], the mask then the means."""
    L, H = (cfg.num_layers, cfg.num_heads) if hasattr(cfg, "num_layers") else tuple(cfg)
    heads = [tuple(map(int, h)) for h in heads]
    check_heads(heads, L, H)
    mask = np.ones((L, H), np.float32)
    for l, h in heads:
        mask[l, h] = 0.0
    if means is not None:
        return np.concatenate([mask[..., None], np.asarray(means, np.float32)], axis=-1)
    return mask


def calibration_means(engine, prompts: Sequence[Sequence[int]], mode: str, n: int) -> np.ndarray:
    """[L, H, D] float32: each head's mean, over every token of `n` of the prompts (evenly spaced,
    unmasked), of its query as q_proj gives it ("mean_query", LOCOS's calibration) or of its
    attention output before o_proj ("mean_output"): models.cache.CaptureSpec.head_sums, one
    plain forward over the prompts padded to one length."""
    import jax
    import jax.numpy as jnp

    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward
    from rhead_jax.models.generate import pad_prompts

    pick = [prompts[int(i)] for i in np.unique(np.linspace(0, len(prompts) - 1, min(n, len(prompts))).round())]
    tokens, lens = pad_prompts(pick, engine.config.sweep.k_chunk)
    positions = np.where(np.arange(tokens.shape[1])[None] < lens[:, None], np.arange(tokens.shape[1])[None], -1)
    cfg = engine.cfg

    @jax.jit
    def sums(params, tok, pos):
        caps = forward(params, cfg, tok, pos, capture=CaptureSpec(head_sums=True), logits="none")[2]
        return (caps.q_sum if mode == "mean_query" else caps.out_sum).sum(1)        # [L, H, D]

    total = np.zeros((cfg.num_layers, cfg.num_heads, cfg.head_dim), np.float64)
    for b in range(len(pick)):   # one row at a time: activation memory of one prompt
        total += np.asarray(sums(engine.model.params, jnp.asarray(tokens[b:b + 1]), jnp.asarray(positions[b:b + 1])))
    return (total / lens.sum()).astype(np.float32)


def phase_masks(mask: np.ndarray | None, phase: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prefill_mask, decode_mask) for a phase: "all" -> (mask, mask); "decode" -> (None, mask)."""
    if phase not in MASK_PHASES:
        raise UserError(f"mask phase must be one of {MASK_PHASES}, got {phase!r}")
    if mask is None:
        return None, None
    return (mask if phase == "all" else None), mask


@dataclasses.dataclass(frozen=True)
class Run:
    """One masked-head set: a spec, its seed (random: only) and the resolved heads."""

    spec: MaskSpec
    seed: int | None
    heads: tuple[Head, ...]

    @property
    def label(self) -> str:
        return self.spec.slug + (f"-seed{self.seed}" if self.seed is not None else "")

    @property
    def store(self) -> str:
        """The run's directory under runs/: its label, except top:K@NAME, stored by its heads (as a set),
        so that rankings (and invocations) that mask the same heads share one run."""
        if not self.spec.ranking:
            return self.label
        key = ",".join(map(head_key, sorted(self.heads)))
        return f"top{self.spec.k}-h" + hashlib.sha1(key.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Group:
    """A spec and its runs (one per seed for random:K, else one)."""

    spec: MaskSpec
    runs: tuple[Run, ...]


def main_spec(main: MaskSpec, scores) -> MaskSpec:
    """With named rankings, top:K is the first ranking's: top:K@FIRST."""
    ranks = _rankings_of(scores)
    names = [n for n in ranks if n] if ranks else []
    if names and main.kind == "top" and not main.ranking:
        return MaskSpec("top", main.k, ranking=names[0])
    return main


def plan_groups(main: MaskSpec, *, seeds: Sequence[int], sweep_k: Sequence[int] = (), baseline: bool = True,
                scores, num_layers: int, num_heads: int,
                threshold: float = scoring.RETRIEVAL_THRESHOLD, group_size: int = 1) -> list[Group]:
    """Baseline (none), the main spec, then top:k (of every ranking: top:k@NAME) and random:k for every
    k of sweep_k; duplicates dropped. Every head set is resolved (and every error raised) here, before
    any model work. scores: a head-score dict or {name: Ranking} (resolve_heads)."""
    ranks = _rankings_of(scores)
    names = [n for n in ranks if n] if ranks else []
    main = main_spec(main, scores)
    specs: list[MaskSpec] = []
    if baseline:
        specs.append(MaskSpec("none"))
    specs.append(main)
    for k in sorted(set(sweep_k)):
        if k == 0:
            specs.append(MaskSpec("none"))
            continue
        specs += [MaskSpec("top", k, ranking=n) for n in names] or [MaskSpec("top", k)]
        specs.append(MaskSpec("random", k))
    groups, seen = [], set()
    for spec in specs:
        if spec.text in seen:
            continue
        seen.add(spec.text)
        run_seeds = list(seeds) if spec.kind == "random" else [None]
        runs = tuple(Run(spec, s, tuple(resolve_heads(spec, scores, num_layers=num_layers, num_heads=num_heads,
                                                      seed=s or 0, threshold=threshold, group_size=group_size)))
                     for s in run_seeds)
        groups.append(Group(spec, runs))
    return groups
