"""Converted params as an orbax checkpoint: save once, restore straight into target shardings.

Converting a HF checkpoint (transposes, expert stacking, dtype casts) costs a full read of the
safetensors; an orbax checkpoint of the converted tree restores shard by shard on every host with
no conversion, directly into the shardings of the sweep's mesh.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes


def save_params(path: str | Path, params, cfg: ModelConfig) -> None:
    """Write params (and the model config beside them) to `path` (local or gs://)."""
    path = Path(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute() / "params", params)
    (Path(path) / "model_config.json").write_text(json.dumps(_cfg_to_json(cfg), indent=1))


def restore_params(path: str | Path, cfg: ModelConfig | None = None, *, shardings=None):
    """Restore into `shardings` (a pytree of jax.sharding.Sharding; None: the default device)."""
    path = Path(path)
    if cfg is None:
        cfg = _cfg_from_json(json.loads((path / "model_config.json").read_text()))
    template = param_shapes(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, template)
    target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path.absolute() / "params", target)
    return cfg, params


def _cfg_to_json(cfg: ModelConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _cfg_from_json(d: dict) -> ModelConfig:
    from rhead_jax.models.hf_config import RopeConfig

    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    if d.get("local_rope") is not None:   # Gemma 3's local layers
        d["local_rope"] = RopeConfig(**d["local_rope"])
    if d.get("sliding_window") is not None:
        d["sliding_window"] = tuple(d["sliding_window"])
    return ModelConfig(**d)
