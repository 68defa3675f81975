"""Meshes, logical axis rules and shardings for params, KV cache and batches.

One table (`PARAM_AXES`) names the logical axes of every parameter leaf; one table (`RULES`)
maps logical axes to mesh axes. A dimension that the mesh axis does not divide is replicated
instead (e.g. 8 KV heads on a 16-way model axis, or SmolLM2's 9 heads on 2): `logical_to_spec`
logs every such fallback once.

Mesh axes: "data" (instances of a batch), "model" (heads and MLP columns), "expert" (MoE experts).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rhead_jax.errors import UserError
from rhead_jax.models.cache import KVCache
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes
from rhead_jax.models.generate import Generation

MESH_AXES = ("data", "model", "expert")

# logical axes of each parameter leaf (path joined with "/"); "layers" is the scanned layer axis
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers/attn_norm": ("layers", "embed"),
    "layers/mlp_norm": ("layers", "embed"),
    "layers/post_attn_norm": ("layers", "embed"),  # Gemma 2/3 sandwich norms
    "layers/post_mlp_norm": ("layers", "embed"),
    "layers/q": ("layers", "embed", "q_heads", "head_dim"),
    "layers/k": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/v": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/o": ("layers", "q_heads", "head_dim", "embed"),
    "layers/q_bias": ("layers", "q_heads", "head_dim"),
    "layers/k_bias": ("layers", "kv_heads", "head_dim"),
    "layers/v_bias": ("layers", "kv_heads", "head_dim"),
    "layers/o_bias": ("layers", "embed"),
    "layers/q_norm": ("layers", "head_dim"),
    "layers/k_norm": ("layers", "head_dim"),
    "layers/gate_bias": ("layers", "mlp"),
    "layers/up_bias": ("layers", "mlp"),
    "layers/down_bias": ("layers", "embed"),
    "layers/router": ("layers", "embed", "expert"),
    # dense MLP
    "layers/gate": ("layers", "embed", "mlp"),
    "layers/up": ("layers", "embed", "mlp"),
    "layers/down": ("layers", "mlp", "embed"),
    # MoE MLP (one more leading expert axis)
    "layers/gate@moe": ("layers", "expert", "embed", "mlp"),
    "layers/up@moe": ("layers", "expert", "embed", "mlp"),
    "layers/down@moe": ("layers", "expert", "mlp", "embed"),
}

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "expert": "expert",
    "embed": None,
    "head_dim": None,
    "layers": None,
    "cache_seq": None,
}

CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
              "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
              "pos": ("batch", "cache_seq"), "length": ("batch",),
              # a windowed cache's local-layer rings (None in a plain cache): the ring is not split
              "ring_k": ("layers", "batch", "kv_heads", None, "head_dim"),
              "ring_v": ("layers", "batch", "kv_heads", None, "head_dim"), "ring_pos": ("batch", None)}

_logged: set = set()


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int, *, what: str = "config.mesh") -> dict[str, int]:
    """Concrete ("data", "model", "expert") sizes for `num_devices` devices from a config.mesh-style
    mapping (missing axes are 1; one size may be -1: the remaining devices). Pure: no devices needed.

    Raises UserError (a ValueError) when the sizes cannot cover exactly `num_devices` devices; its
    message tells the user to fix `what` (where the sizes came from)."""
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    n = num_devices
    if sizes.count(-1) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s < 1 and s != -1 for s in sizes):
        raise UserError(f"mesh sizes must be >= 1 (or -1 for the rest), got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise UserError(f"{n} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}; set "
                            f"{what} sizes whose product divides {n}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"{n} are available; set {what} sizes whose product is {n} (or use -1)")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """A ("data", "model", "expert") mesh from sizes (`mesh_shape`); one size may be -1 (the rest).

    Axis types are Auto on purpose: the sweep step is compiled with jit in/out shardings and GSPMD
    propagates shardings through the model, as `pjit` did. Where the physical torus cannot hold an
    axis (e.g. model=8 on a 4x4x4 v5p slice), the axes span several physical axes instead.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = tuple(mesh_shape(mesh_config, len(devices)).values())
    axis_types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        # e.g. model=8 on a 4x4x4 torus: let an axis span several physical axes
        from jax.experimental import mesh_utils

        logging.warning("jax.make_mesh(%s) failed (%s); splitting physical axes instead", sizes, e)
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(axes, shape, mesh: Mesh, *, what: str = "") -> P:
    """PartitionSpec for a leaf with logical `axes` and `shape`, replicating what doesn't divide."""
    spec = []
    for ax, dim in zip(axes, shape):
        mesh_ax = RULES.get(ax) if ax else None
        if mesh_ax is not None and mesh.shape[mesh_ax] > 1:
            if dim % mesh.shape[mesh_ax]:
                key = (what, ax, dim, mesh.shape[mesh_ax])
                if key not in _logged:
                    _logged.add(key)
                    logging.info("%s: %s=%d is not divisible by mesh axis %s=%d; replicating it",
                                 what or "array", ax, dim, mesh_ax, mesh.shape[mesh_ax])
                mesh_ax = None
        else:
            mesh_ax = None
        spec.append(mesh_ax)
    return P(*spec)


def param_axes(cfg: ModelConfig, path: str) -> tuple[str | None, ...]:
    if cfg.is_moe and path in ("layers/gate", "layers/up", "layers/down"):
        return PARAM_AXES[path + "@moe"]
    return PARAM_AXES[path]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings matching the parameter tree of `cfg`."""
    template = param_shapes(cfg)

    def one(kpath, leaf):
        path = "/".join(k.key for k in kpath)
        return NamedSharding(mesh, logical_to_spec(param_axes(cfg, path), leaf.shape, mesh, what=path))

    return jax.tree_util.tree_map_with_path(one, template)


def cache_shardings(cache_shape: KVCache, mesh: Mesh) -> KVCache:
    return KVCache(**{name: NamedSharding(mesh, logical_to_spec(CACHE_AXES[name], getattr(cache_shape, name).shape,
                                                                mesh, what=f"cache/{name}"))
                      for name in CACHE_AXES if getattr(cache_shape, name) is not None})


def batch_sharding(shape, mesh: Mesh) -> NamedSharding:
    """Leading axis on "data" (when it divides), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, what="batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full as a global (possibly multi-host) array."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    shardings = param_shardings(cfg, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def describe(cfg: ModelConfig, mesh: Mesh) -> str:
    """One line per parameter kind: its PartitionSpec on this mesh (for logs and dry runs)."""
    sh = param_shardings(cfg, mesh)
    flat = jax.tree_util.tree_flatten_with_path(sh)[0]
    return "\n".join(f"  {'/'.join(k.key for k in kp):20s} {s.spec}" for kp, s in flat)


def generation_shardings(mesh: Mesh) -> Generation:
    """Generation outputs are small: replicate them so every process can read them."""
    r = replicated(mesh)
    return Generation(tokens=r, num_tokens=r, topk_index=r, topk_weight=r, mass=r, logit_terms=r)


__all__ = ["mesh_shape", "make_mesh", "param_shardings", "cache_shardings", "batch_sharding", "replicated",
           "put_global", "shard_params", "describe", "generation_shardings", "RULES", "PARAM_AXES"]
