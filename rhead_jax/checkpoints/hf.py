"""Hugging Face checkpoint directory -> (ModelConfig, params), without torch.

The parameter template comes from `jax.eval_shape` (no allocation); every leaf is then built with
`jax.make_array_from_callback`, whose callback reads from the memory-mapped safetensors only the
slice a device holds. With no sharding given that is the whole array on one device; with the
shardings of a mesh ([pods]) each process reads just its shards, one layer tensor at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import logging

from rhead_jax.checkpoints.safetensors_io import CheckpointError, TensorStore
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import param_shapes


def load_hf_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist (or is not a directory)")
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a HF checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def load_config(directory: str | Path, *, dtype: str | None = None) -> ModelConfig:
    """The model config of a checkpoint; a config.json the converter refuses names the checkpoint."""
    hf = load_hf_config(directory)
    try:
        return ModelConfig.from_hf(hf, dtype=dtype)
    except ValueError as e:  # the same error, naming the checkpoint it came from
        raise type(e)(f"checkpoint {directory}: {e}") from e


# One entry per per-layer leaf: a function (store, layer prefix) -> array in our layout.
LayerGetter = Callable[[TensorStore, str], np.ndarray]


def _layer_getters(cfg: ModelConfig, store: TensorStore) -> tuple[dict[str, LayerGetter], set[str]]:
    """The getters, and the per-layer tensor names (after 'model.layers.N.') they read."""
    d, H, K, D, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    read: set[str] = set()

    def t(name, fn=lambda w: w):
        read.add(name)
        return lambda s, pre: fn(s.get(pre + name))

    g: dict[str, LayerGetter] = {
        "attn_norm": t("input_layernorm.weight"),
        "mlp_norm": t("pre_feedforward_layernorm.weight" if cfg.sandwich_norms
                      else "post_attention_layernorm.weight"),
        "q": t("self_attn.q_proj.weight", lambda w: w.T.reshape(d, H, D)),
        "k": t("self_attn.k_proj.weight", lambda w: w.T.reshape(d, K, D)),
        "v": t("self_attn.v_proj.weight", lambda w: w.T.reshape(d, K, D)),
        "o": t("self_attn.o_proj.weight", lambda w: w.T.reshape(H, D, d)),
    }
    if cfg.qkv_bias:
        g |= {"q_bias": t("self_attn.q_proj.bias", lambda b: b.reshape(H, D)),
              "k_bias": t("self_attn.k_proj.bias", lambda b: b.reshape(K, D)),
              "v_bias": t("self_attn.v_proj.bias", lambda b: b.reshape(K, D))}
    if cfg.o_bias:
        g["o_bias"] = t("self_attn.o_proj.bias")
    if cfg.qk_norm:
        g |= {"q_norm": t("self_attn.q_norm.weight"), "k_norm": t("self_attn.k_norm.weight")}
    if cfg.sandwich_norms:  # Gemma 2/3
        g |= {"post_attn_norm": t("post_attention_layernorm.weight"),
              "post_mlp_norm": t("post_feedforward_layernorm.weight")}
    if not cfg.is_moe:
        g |= {"gate": t("mlp.gate_proj.weight", np.transpose), "up": t("mlp.up_proj.weight", np.transpose),
              "down": t("mlp.down_proj.weight", np.transpose)}
        if cfg.mlp_bias:
            g |= {"gate_bias": t("mlp.gate_proj.bias"), "up_bias": t("mlp.up_proj.bias"),
                  "down_bias": t("mlp.down_proj.bias")}
        return g, read
    E = cfg.num_experts
    if "model.layers.0.block_sparse_moe.gate.weight" in store:  # legacy per-expert layout
        def experts(w_name):
            read.update(f"block_sparse_moe.experts.{e}.{w_name}.weight" for e in range(E))
            return lambda s, pre: np.stack(
                [s.get(f"{pre}block_sparse_moe.experts.{e}.{w_name}.weight").T for e in range(E)])
        g |= {"router": t("block_sparse_moe.gate.weight", np.transpose),
              "gate": experts("w1"), "up": experts("w3"), "down": experts("w2")}
    else:  # transformers 5 fused layout: gate_up_proj [E, 2f, d], down_proj [E, d, f]
        g |= {"router": t("mlp.gate.weight", np.transpose),
              "gate": t("mlp.experts.gate_up_proj", lambda w: w[:, :f, :].transpose(0, 2, 1)),
              "up": t("mlp.experts.gate_up_proj", lambda w: w[:, f:, :].transpose(0, 2, 1)),
              "down": t("mlp.experts.down_proj", lambda w: w.transpose(0, 2, 1))}
    return g, read


# Where a multimodal checkpoint (model_type gemma3) keeps its language model: transformers 4
# saved `language_model.model.*`, transformers 5 `model.language_model.*`; text-only ones `model.*`.
_TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Tensors of a multimodal checkpoint that the text decoder does not read.
_OTHER_TOWERS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_prefix(store: TensorStore) -> str:
    """The prefix before 'embed_tokens.weight' / 'layers.N.' in this checkpoint."""
    for pre in _TEXT_PREFIXES:
        if pre + "embed_tokens.weight" in store:
            return pre
    return "model."


def _consumed_names(cfg: ModelConfig, layer_names: set[str], pre: str = "model.") -> set[str]:
    """Names of checkpoint tensors the getters read (for the 'unused tensor' check)."""
    used = {pre + "embed_tokens.weight", pre + "norm.weight", "lm_head.weight",
            "language_model.lm_head.weight"}  # tied: lm_head ignored
    used.update(f"{pre}layers.{i}.{n}" for i in range(cfg.num_layers) for n in layer_names)
    return used


def load_params(directory: str | Path, cfg: ModelConfig | None = None, *, dtype: str | None = None,
                shardings=None):
    """Read a HF checkpoint directory into our parameter tree.

    Args:
      directory: holds config.json and *.safetensors (single file or sharded with an index).
      cfg: the model config; read from config.json when None.
      dtype: override the parameter dtype ("float32" / "bfloat16").
      shardings: optional pytree of jax.sharding.Sharding matching the param tree; each process
        then reads only the slices of the devices it addresses.

    Returns:
      (cfg, params)
    """
    directory = Path(directory)
    if cfg is None:
        cfg = load_config(directory, dtype=dtype)
    elif dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    store = TensorStore(directory)
    template = param_shapes(cfg)
    getters, layer_names = _layer_getters(cfg, store)

    pre = _text_prefix(store)
    consumed = _consumed_names(cfg, layer_names, pre)
    unknown = [n for n in store.names() if n not in consumed and not n.endswith("rotary_emb.inv_freq")
               and not n.startswith(_OTHER_TOWERS)]
    if unknown:
        raise CheckpointError(
            f"checkpoint {directory} holds tensors this architecture does not use, e.g. {unknown[:5]}; "
            "the config.json probably does not match the weights")

    def top_getter(name: str, fn=lambda w: w):
        return lambda: fn(store.get(name))

    def expect(arr: np.ndarray, shape, what: str) -> np.ndarray:
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(
                f"{directory}: {what} has shape {tuple(arr.shape)} after conversion, expected "
                f"{tuple(shape)} from config.json; the config and the weights disagree")
        return arr

    def build(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct, sharding):
        dt = leaf.dtype
        if path[0] == "layers":
            getter = getters[path[1]]
            def fetch(index):
                idx = index if index else (slice(None),) * len(leaf.shape)
                layers = range(*idx[0].indices(leaf.shape[0]))
                parts = [expect(getter(store, f"{pre}layers.{i}."), leaf.shape[1:], f"layer {i} {path[1]}")
                         [idx[1:]] for i in layers]
                return np.stack(parts).astype(dt, copy=False)
        else:
            name = {"embed": pre + "embed_tokens.weight", "final_norm": pre + "norm.weight",
                    "lm_head": "lm_head.weight"}[path[0]]
            getter = top_getter(name, np.transpose if path[0] == "lm_head" else (lambda w: w))

            def fetch(index):
                arr = expect(getter(), leaf.shape, name)
                return np.asarray(arr[index] if index else arr).astype(dt)

        if sharding is None:
            return jax.device_put(fetch(None))
        return jax.make_array_from_callback(leaf.shape, sharding, fetch)

    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    shard_leaves = (jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
                    if shardings is not None else [None] * len(flat))
    leaves = []
    for (kpath, leaf), sh in zip(flat, shard_leaves):
        path = tuple(k.key for k in kpath)
        leaves.append(build(path, leaf, sh))
    logging.info("loaded %d tensors from %s (%s)", len(leaves), directory, cfg.dtype)
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves)
