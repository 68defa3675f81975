"""Rotary position embeddings: default, linear, dynamic NTK, YaRN and Llama-3 scaling.

Frequencies follow transformers' `modeling_rope_utils` exactly (fp32), and the rotation uses the
"rotate_half" layout of HF checkpoints (llama.cpp's interleaved layout is undone at import).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rhead_jax.models.config import ModelConfig
from rhead_jax.models.hf_config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def static_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Position-independent inverse frequencies [dim // 2] and the cos/sin attention factor."""
    inv = _base_inv_freq(rope.theta, dim)
    if rope.rope_type in ("default", "dynamic"):
        return inv, 1.0
    if rope.rope_type == "linear":
        return inv / np.float32(rope.factor), 1.0
    if rope.rope_type == "llama3":
        factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_position_embeddings
        low_wav, high_wav = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wav, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wav) & ~(wavelen > low_wav)
        return np.where(medium, smoothed, out).astype(np.float32), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")


def _yarn(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    factor, base = rope.factor, rope.theta

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.attention_factor
    if attn is None:
        if rope.mscale and rope.mscale_all_dim:
            attn = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attn = get_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    orig = rope.original_max_position_embeddings

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrap_factor = 1 - ramp
    inv = interp * (1 - extrap_factor) + extrap * extrap_factor
    return inv.astype(np.float32), float(attn)


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, rope: RopeConfig | None = None
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [B, T, D] (fp32) for integer positions [B, T] (negative = padding), of
    `rope` (default cfg.rope; a local layer's may differ, cfg.ropes).

    Dynamic NTK: like transformers, the base grows with the largest position in the call,
    seq_len = max(positions) + 1, once that exceeds `max_position_embeddings`.
    """
    dim = cfg.head_dim
    rope = cfg.rope if rope is None else rope
    inv, attn_factor = static_inv_freq(rope, dim)
    inv = jnp.asarray(inv)
    if rope.rope_type == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        factor = rope.factor
        base = rope.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attn_factor, jnp.sin(emb) * attn_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, ..., D] by cos/sin [B, T, D] (cast to x's dtype, as HF does)."""
    extra = x.ndim - cos.ndim
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    cos, sin = cos.reshape(shape).astype(x.dtype), sin.reshape(shape).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
