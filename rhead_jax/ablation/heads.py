"""Which heads to mask: mask specs, head-score files, the [L, H] head mask, runs and groups.

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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from rhead_jax import io, scoring
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
        raise UserError("no head-score file given: pass --scores (e.g. a sweep's workdir/head_scores.json)")
    p = io.as_path(path)
    if not p.exists():
        raise UserError(f"head-score file {path} does not exist; run `python -m rhead_jax.sweep "
                                "--config <model>.py --workdir DIR` first, it writes DIR/head_scores.json")
    try:
        data = json.loads(p.read_text())
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


def resolve_heads(spec: MaskSpec, scores: dict | None = None, *, num_layers: int | None = None,
                  num_heads: int | None = None, seed: int = 0,
                  threshold: float = scoring.RETRIEVAL_THRESHOLD) -> list[Head]:
    """The heads of a parsed spec (module docstring); top: best first, random: sorted."""
    if spec.needs_scores and scores is None:
        raise UserError(f"mask {spec.text} needs a head-score file (--scores / config.ablation.scores)")
    if spec.kind == "none":
        heads: list[Head] = []
    elif spec.kind == "list":
        heads = list(spec.heads)
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
