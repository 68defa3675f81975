"""Comparing head rankings: two head-score files of one model (the paper's pairs: top-k overlap,
Spearman), the top-k overlap of every two files, and every two rankings of any detector per query
head and per KV head (`compare_rankings`: rankings.json).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from rhead_jax.analysis.headscores import read_json, shape_of
from rhead_jax.errors import UserError
from rhead_jax.scoring import head_means, parse_head, top_heads


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (scipy.stats.rankdata). NaN if
    either side is constant (scipy.stats.spearmanr would warn and return NaN too).

    The correlation of the ranks is written out rather than taken from scipy.stats.spearmanr: that
    one agrees to ~1e-16 but not bit for bit, and pairs.json keeps its exact digits (and symmetry)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = stats.rankdata(a), stats.rankdata(b)  # method="average": ties share the mean of their ranks
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db / denom) if denom > 0 else float("nan")


def top_overlap(a: dict[str, list[float]], b: dict[str, list[float]], k: int = 20) -> tuple[int, list[str]]:
    """|top-k(A) ∩ top-k(B)| and the common heads, in A's order."""
    top_a = [h for h, _ in top_heads(a, k)]
    top_b = {h for h, _ in top_heads(b, k)}
    common = [h for h in top_a if h in top_b]
    return len(common), common


def compare_pair(a: dict[str, list[float]], b: dict[str, list[float]], k: int = 20,
                 name_a: str = "a", name_b: str = "b") -> dict:
    """Top-k overlap and Spearman correlation of all heads' means (the paper's 'intrinsic' property)."""
    if set(a) != set(b):
        raise UserError(f"{name_a} {shape_of(a)} and {name_b} {shape_of(b)} do not have the same heads: "
                        "--pair compares two files of one architecture")
    k = min(k, len(a))
    n, common = top_overlap(a, b, k)
    ma, mb = head_means(a), head_means(b)
    keys = sorted(a, key=parse_head)
    rho = spearman([ma[h] for h in keys], [mb[h] for h in keys])
    return {"a": name_a, "b": name_b, "k": k, "overlap": n, "overlap_frac": n / k if k else 0.0,
            "spearman": None if math.isnan(rho) else rho, "common": common}


VARIANT_SUFFIXES = ("-chat", "-instruct", "-it", "_chat", "_instruct")


def detect_pairs(data: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs of files the paper compares, from their names: a base model and its -Chat / -Instruct
    variant (Qwen1.5-14B.json, Qwen1.5-14B-Chat.json), and Mistral and Mixtral. Only files with the same
    heads are paired."""
    stems = {Path(n).stem.lower(): n for n in data}
    found = []
    for stem, name in stems.items():
        for suf in VARIANT_SUFFIXES:
            if stem.endswith(suf) and stem[: -len(suf)] in stems:
                found.append((stems[stem[: -len(suf)]], name))
    found += [(a, b) for a in data if "mistral" in a.lower() for b in data if "mixtral" in b.lower()]
    return [(a, b) for a, b in found if set(data[a]) == set(data[b])]


def overlap_matrix(data: dict[str, dict], k: int = 20) -> dict:
    """Top-k overlap of every two files ({"k", "files", "matrix"}; None where the heads differ)."""
    names = list(data)
    tops = {n: {h for h, _ in top_heads(data[n], k)} for n in names}
    matrix = [[len(tops[a] & tops[b]) if set(data[a]) == set(data[b]) else None for b in names] for a in names]
    return {"k": k, "files": names, "matrix": matrix}


def topk_probability(values: np.ndarray, k: int) -> np.ndarray:
    """P(head in the top k) when the heads tied at the k-th score are drawn uniformly at random:
    1 above the k-th score, (k - heads above) / heads tied at it, 0 below (same shape as values)."""
    v = np.asarray(values, np.float64).ravel()
    if k <= 0:
        return np.zeros(v.shape)
    if k >= v.size:
        return np.ones(v.shape)
    cut = np.sort(v)[::-1][k - 1]
    above, tied = v > cut, v == cut
    return np.where(above, 1.0, np.where(tied, (k - above.sum()) / tied.sum(), 0.0))


def expected_overlap(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Top-k overlap of two score arrays of one shape: the expected number of shared heads when ties at
    each cut are broken at random (an integer when no tie straddles a cut; gates clipped to 1 often
    do), the chance level k^2 / N, and how many heads tie at each cut."""
    pa, pb = topk_probability(a, k), topk_probability(b, k)
    n = pa.size

    def ties(p):
        return int(((p > 0) & (p < 1)).sum())

    ov = float(pa @ pb)
    return {"k": int(k), "overlap": ov, "frac": ov / k if k else 0.0, "chance": k * k / n if n else 0.0,
            "ties": [ties(pa), ties(pb)]}


def model_group_size(model: str) -> int:
    """G = query heads / KV heads of a model: a preset name (rhead_jax.presets, e.g. Mistral-7B-v0.2, or a
    configs/ stem: smollm2_135m), a HF config.json, or a checkpoint directory holding one."""
    from rhead_jax import presets

    p = Path(str(model))
    cfg_path = p / "config.json" if p.is_dir() else p
    if cfg_path.is_file():
        cfg = read_json(cfg_path, "model config")
        if not isinstance(cfg, dict) or "num_attention_heads" not in cfg:
            raise UserError(f"model config {cfg_path} has no num_attention_heads: give a HF config.json")
    else:
        try:
            cfg = presets.preset_hf_config(str(model))
        except KeyError:
            raise UserError(f"--model {model!r}: neither a config.json, a checkpoint directory nor a preset "
                            f"({', '.join(presets.preset_names())})") from None
    h = int(cfg["num_attention_heads"])
    k = int(cfg.get("num_key_value_heads") or h)
    if h % k:
        raise UserError(f"model {model}: {h} query heads are not a multiple of {k} KV heads")
    return h // k


def compare_rankings(ranks: Sequence, group_size: int | None = None, ks: Sequence = (20,)) -> dict:
    """Every two rankings (rhead_jax.rankings.Ranking), per query head and per KV head where their
    shapes allow (rankings.comparable): Spearman correlation of all heads' scores and top-k overlap
    (`expected_overlap`) for each k of `ks` (integers, or percentages of the level's heads: '25%').

    Per KV head, a query ranking is the max over the KV head's query heads: a KV head matters as soon
    as one of the heads that read its cache retrieves (and this is what DuoAttention's per-KV gates
    decide: keep the cache or not). Per query head, a KV ranking is repeated over its group, so its
    heads tie in groups of G: Spearman uses average ranks, the overlap the expected value over ties.

    Returns rankings.json's object: {"group_size", "k", "rankings": [{name, path, kind, layers, heads,
    group_size}], "pairs": [{a, b, levels: {level: {heads, group_size, spearman, overlap: [{k_spec, k,
    overlap, frac, chance, ties}]}}, note}], "matrix": {level: {names, spearman, overlap: {k_spec: ...}}}}.
    A KV ranking that can be compared with none of the others is refused (its model is not there)."""
    from rhead_jax import rankings as rk

    ks = [str(k) for k in ks]
    for k in ks:  # syntax first
        rk.resolve_k(k, 1)
    groups = rk.group_sizes(ranks, group_size)
    pairs = []
    partners = {r.name: 0 for r in ranks}
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            levels, note = rk.comparable(a, b, groups[a.name], groups[b.name])
            row = {"a": a.name, "b": b.name, "levels": {}, "note": note}
            for level, g in levels.items():
                sa, sb = a.at(level, g or 1).ravel(), b.at(level, g or 1).ravel()
                rho = spearman(sa, sb)
                row["levels"][level] = {
                    "heads": int(sa.size), "group_size": g, "spearman": None if math.isnan(rho) else rho,
                    "overlap": [{"k_spec": k, **expected_overlap(sa, sb, rk.resolve_k(k, sa.size))} for k in ks]}
            if levels:
                partners[a.name] += 1
                partners[b.name] += 1
            pairs.append(row)
    if len(ranks) > 1:
        for r in ranks:
            if r.kind == "kv" and not partners[r.name]:
                shapes = ", ".join(f"{o.name} {o.shape[0]}x{o.shape[1]}" for o in ranks if o is not r)
                g = groups[r.name]
                raise UserError(f"gate file {r.path or r.name} ({r.shape[0]} layers x {r.shape[1]} KV heads) matches "
                                f"none of the other rankings ({shapes}): a head-score file of its model has "
                                f"{r.shape[0]} layers and {r.shape[1]} x G query heads"
                                + (f" (G = {g} given)" if g else "") + "; check the files or --group_size")
    matrix = {}
    for level in rk.LEVELS:
        names = [r.name for r in ranks if any(level in p["levels"] and r.name in (p["a"], p["b"]) for p in pairs)]
        if not names:
            continue
        idx = {n: i for i, n in enumerate(names)}
        sp = [[1.0 if a == b else None for b in names] for a in names]
        ov = {k: [[1.0 if a == b else None for b in names] for a in names] for k in ks}
        for p in pairs:
            lv = p["levels"].get(level)
            if lv is None:
                continue
            i, j = idx[p["a"]], idx[p["b"]]
            sp[i][j] = sp[j][i] = lv["spearman"]
            for o in lv["overlap"]:
                ov[o["k_spec"]][i][j] = ov[o["k_spec"]][j][i] = o["frac"]
        matrix[level] = {"names": names, "spearman": sp, "overlap": ov}
    return {"group_size": group_size, "k": ks,
            "rankings": [{"name": r.name, "path": r.path, "kind": r.kind, "layers": r.shape[0], "heads": r.shape[1],
                          "group_size": groups[r.name]} for r in ranks],
            "pairs": pairs, "matrix": matrix}

