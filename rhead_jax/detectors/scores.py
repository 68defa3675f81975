"""Detector scores from full attention probabilities: the dense reference of the kernels' masses,
and how a hand-built attention pattern scores."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rhead_jax.detectors.sequences import DETECTORS, query_counts
from rhead_jax.models.attention import MassTargets, mass_from_probs


def scores_from_probs(probs, targets: MassTargets, masses: tuple[str, ...] = DETECTORS) -> np.ndarray:
    """probs [L, B, H, T, S] (query at position t, key at slot s = position s; S >= T) -> scores
    [L, B, H, M]: each target's attention mass averaged over the queries of its range."""
    probs = jnp.asarray(probs, jnp.float32)
    L, B, H, T, S = probs.shape
    q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    k_pos = jnp.broadcast_to(jnp.where(jnp.arange(S) < T, jnp.arange(S), -1).astype(jnp.int32), (B, S))
    one_layer = lambda p: mass_from_probs(p[:, :, None], q_pos, k_pos, masses, targets)[:, :, 0]  # noqa: E731
    mass = np.asarray(jax.vmap(one_layer)(probs), np.float64)          # [L, B, H, M]
    return mass / query_counts(targets)[None, :, None, :]
