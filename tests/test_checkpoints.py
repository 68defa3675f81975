"""The HF checkpoint loader and config parser: layouts it must accept, and clear refusals.

Every refusal is checked for its type AND for naming the offending file / field / tensor, so a
user with a broken download or an unsupported config knows what to fix.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rhead_jax.checkpoints.hf import load_config, load_params
from rhead_jax.checkpoints.safetensors_io import CheckpointError
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import forward
from rhead_jax.models.hf_config import ConfigError

INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- helpers


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    """A writable copy of a (read-only, session-shared) tiny model directory."""
    return Path(shutil.copytree(src, tmp_path / name))


def _read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _write_config(d: Path, cfg: dict) -> None:
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _replace_weights(d: Path, tensors: dict[str, np.ndarray]) -> None:
    """Replace every weight file of `d` by a single model.safetensors holding `tensors`."""
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / INDEX).unlink(missing_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, d / "model.safetensors",
              metadata={"format": "pt"})


def _assert_trees_equal(a, b) -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _logits(params, cfg, seed=0):
    tok = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 16))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    out, _, _ = forward(params, cfg, jnp.asarray(tok), pos)
    return np.asarray(out)


# --------------------------------------------------------------------------- directory layout


def test_missing_directory_is_refused(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match="no_such_model") as e:
        load_params(missing)
    assert "does not exist" in str(e.value)


def test_missing_directory_is_refused_when_config_is_given(tmp_path, tiny_model_dir):
    cfg = load_config(tiny_model_dir("llama2"))
    with pytest.raises(CheckpointError, match="no_such_model.*does not exist"):
        load_params(tmp_path / "no_such_model", cfg)


def test_directory_without_config_json_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_params(d)


def test_malformed_config_json_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')  # cut short
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        load_params(d)


def test_directory_without_safetensors_is_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_model_dir("llama2") / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\0" * 16)  # a torch-only checkpoint
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in .*ckpt"):
        load_params(d)


# --------------------------------------------------------------------------- sharded checkpoints


def _shard(d: Path, n_shards: int = 3) -> list[str]:
    """Split d's model.safetensors into n shards plus an index, as save_pretrained does."""
    tensors = _tensors(d)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for i, f in enumerate(files):
        part = names[i::n_shards]
        save_file({k: tensors[k] for k in part}, d / f, metadata={"format": "pt"})
        weight_map |= {k: f for k in part}
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_save_pretrained_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_model_dir):
    from tests.hf_tiny import load_torch

    src = tiny_model_dir("qwen2")
    d = tmp_path / "sharded"
    load_torch(src).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 1 and (d / INDEX).exists()
    _, single = load_params(src)
    _, sharded = load_params(d)
    _assert_trees_equal(sharded, single)


@pytest.mark.parametrize("family", ["llama2", "mixtral"])
def test_sharded_checkpoint_loads_like_single_file(family, tmp_path, tiny_model_dir):
    src = tiny_model_dir(family)
    d = _copy(src, tmp_path)
    _shard(d)
    assert not (d / "model.safetensors").exists()
    cfg1, single = load_params(src)
    cfg2, sharded = load_params(d)
    assert cfg1 == cfg2
    _assert_trees_equal(sharded, single)


def test_missing_shard_is_named(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    files = _shard(d)
    (d / files[1]).unlink()
    with pytest.raises(CheckpointError, match=re.escape(files[1])) as e:
        load_params(d)
    assert files[0] not in str(e.value) and files[2] not in str(e.value)


def test_index_without_weight_map_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    _shard(d)
    (d / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json.*weight_map"):
        load_params(d)


def test_missing_tensor_is_named(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    tensors = _tensors(d)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _replace_weights(d, tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_params(d)


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("keep", ["half", "header_cut", "4_bytes", "empty"])
def test_truncated_safetensors_is_refused(keep, tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    n = {"half": len(data) // 2, "header_cut": 8 + header_len // 2, "4_bytes": 4, "empty": 0}[keep]
    f.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as e:
        load_params(d)
    msg = str(e.value)
    if keep == "half":  # the header survived: the first tensor past the cut is named
        assert "truncated" in msg and re.search(r"tensor '[\w.]+'", msg)
    else:
        assert "safetensors" in msg


def test_git_lfs_pointer_instead_of_weights_is_refused(tmp_path, tiny_model_dir):
    """A `git clone` without git-lfs leaves small text pointers where the weights should be."""
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    (d / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a2148f2c3e0e1f5b5b1d5b0f6cbb1e9b6a0e0ad6a4a7c8e9f0a1b2c3d4e5f\n"
        "size 269060552\n")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_params(d)


# --------------------------------------------------------------------------- config vs weights


def test_shape_mismatch_between_config_and_weights_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    hf = _read_config(d)
    hf["intermediate_size"] = 128  # the weights have 96
    _write_config(d, hf)
    with pytest.raises(CheckpointError, match=r"shape") as e:
        load_params(d)
    msg = str(e.value)
    assert "config" in msg and "disagree" in msg
    assert re.search(r"layer 0 (gate|up|down)", msg)  # names the tensor


def test_moe_shape_mismatch_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("mixtral"), tmp_path)
    hf = _read_config(d)
    hf["intermediate_size"] = 64  # the weights have 96
    _write_config(d, hf)
    with pytest.raises(CheckpointError, match=r"shape.*disagree"):
        load_params(d)


def test_fewer_layers_in_config_than_in_weights_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    hf = _read_config(d)
    hf["num_hidden_layers"] = 2  # the weights have 3: layer 2 would be silently dropped
    _write_config(d, hf)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        load_params(d)


def test_more_layers_in_config_than_in_weights_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    hf = _read_config(d)
    hf["num_hidden_layers"] = 4
    _write_config(d, hf)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\."):
        load_params(d)


def test_extra_tensor_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    tensors = _tensors(d)
    tensors["model.visual.proj.weight"] = np.zeros((4, 64), np.float32)
    _replace_weights(d, tensors)
    with pytest.raises(CheckpointError, match=r"model\.visual\.proj\.weight"):
        load_params(d)


def test_extra_per_layer_tensor_is_refused(tmp_path, tiny_model_dir):
    """Biases the config does not ask for (attention_bias false) would be silently dropped."""
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    tensors = _tensors(d)
    tensors["model.layers.1.self_attn.q_proj.bias"] = np.ones((64,), np.float32)
    _replace_weights(d, tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias"):
        load_params(d)


def test_rotary_inv_freq_buffers_are_ignored(tmp_path, tiny_model_dir):
    src = tiny_model_dir("llama2")
    d = _copy(src, tmp_path)
    tensors = _tensors(d)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
    _replace_weights(d, tensors)
    _assert_trees_equal(load_params(d)[1], load_params(src)[1])


# --------------------------------------------------------------------------- Mixtral layouts


def _mixtral_both_layouts(tensors: dict[str, np.ndarray], num_layers: int, num_experts: int):
    """(legacy per-expert dict, transformers-5 fused dict) from either layout."""
    legacy = {k: v for k, v in tensors.items() if ".mlp." not in k and ".block_sparse_moe." not in k}
    fused = dict(legacy)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        if p + "block_sparse_moe.gate.weight" in tensors:
            router = tensors[p + "block_sparse_moe.gate.weight"]
            w = {n: np.stack([tensors[f"{p}block_sparse_moe.experts.{e}.{n}.weight"] for e in range(num_experts)])
                 for n in ("w1", "w2", "w3")}
            gate_up = np.concatenate([w["w1"], w["w3"]], axis=1)  # [E, 2f, d], gate first
            down = w["w2"]  # [E, d, f]
        else:
            router = tensors[p + "mlp.gate.weight"]
            gate_up = tensors[p + "mlp.experts.gate_up_proj"]
            down = tensors[p + "mlp.experts.down_proj"]
        f = gate_up.shape[1] // 2
        fused |= {p + "mlp.gate.weight": router, p + "mlp.experts.gate_up_proj": gate_up,
                  p + "mlp.experts.down_proj": down}
        legacy[p + "block_sparse_moe.gate.weight"] = router
        for e in range(num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            legacy |= {q + "w1.weight": gate_up[e, :f], q + "w3.weight": gate_up[e, f:],
                       q + "w2.weight": down[e]}
    return legacy, fused


def test_mixtral_legacy_and_fused_layouts_load_identically(tmp_path, tiny_model_dir):
    src = tiny_model_dir("mixtral")
    cfg = load_config(src)
    legacy, fused = _mixtral_both_layouts(_tensors(src), cfg.num_layers, cfg.num_experts)
    assert legacy.keys() != fused.keys()
    d_legacy, d_fused = _copy(src, tmp_path, "legacy"), _copy(src, tmp_path, "fused")
    _replace_weights(d_legacy, legacy)
    _replace_weights(d_fused, fused)

    cfg_l, p_legacy = load_params(d_legacy)
    cfg_f, p_fused = load_params(d_fused)
    assert cfg_l == cfg_f
    _assert_trees_equal(p_legacy, p_fused)
    # the split of gate_up_proj really is gate first, then up: they differ, so a swap would show
    assert not np.array_equal(np.asarray(p_fused["layers"]["gate"]), np.asarray(p_fused["layers"]["up"]))
    _assert_trees_equal(p_legacy, load_params(src)[1])  # and both equal what transformers saved
    np.testing.assert_array_equal(_logits(p_legacy, cfg_l), _logits(p_fused, cfg_f))


def test_mixtral_legacy_layout_with_extra_experts_is_refused(tmp_path, tiny_model_dir):
    src = tiny_model_dir("mixtral")
    d = _copy(src, tmp_path)
    hf = _read_config(d)
    hf["num_local_experts"] = 2  # the weights have 4 experts per layer
    _write_config(d, hf)
    cfg = load_config(src)
    legacy, _ = _mixtral_both_layouts(_tensors(src), cfg.num_layers, cfg.num_experts)
    _replace_weights(d, legacy)
    with pytest.raises(CheckpointError):
        load_params(d)


# --------------------------------------------------------------------------- dtype


def test_bfloat16_override_gives_bf16_leaves(tiny_model_dir):
    d = tiny_model_dir("qwen2")
    cfg32, p32 = load_params(d)
    cfg16, p16 = load_params(d, dtype="bfloat16")
    assert cfg32.dtype == "float32" and cfg16.dtype == "bfloat16"
    leaves = jax.tree_util.tree_leaves(p16)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    for a, b in zip(jax.tree_util.tree_leaves(p32), leaves):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    # an explicit cfg with a dtype override behaves the same
    _, p16b = load_params(d, cfg32, dtype="bfloat16")
    _assert_trees_equal(p16, p16b)


def test_bf16_checkpoint_loads_as_float32_on_request(tmp_path, tiny_model_dir):
    import ml_dtypes

    src = tiny_model_dir("llama2")
    d = _copy(src, tmp_path)
    _replace_weights(d, {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(src).items()})
    hf = _read_config(d)
    hf["dtype"] = "bfloat16"
    _write_config(d, hf)
    cfg16, p16 = load_params(d)
    assert cfg16.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
    _, p32 = load_params(d, dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p32))


# --------------------------------------------------------------------------- config parsing


def _hf(**over) -> dict:
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64,
                intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}  # `...` drops a field


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_unsupported_architecture_is_refused(model_type):
    with pytest.raises(ConfigError, match=rf"model_type.*'{model_type}'|'{model_type}'.*model_type"):
        ModelConfig.from_hf(_hf(model_type=model_type))


def test_unsupported_architecture_in_config_json_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    hf = _read_config(d)
    hf["model_type"] = "phi3"
    _write_config(d, hf)
    with pytest.raises(ConfigError, match=r"model_type.*phi3"):
        load_params(d)


def test_unknown_config_field_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"'foo_bar'"):
        ModelConfig.from_hf(_hf(foo_bar=3))
    ModelConfig.from_hf(_hf(foo_bar=None))  # a null field changes nothing
    d = _copy(tiny_model_dir("llama2"), tmp_path)
    hf = _read_config(d)
    hf["foo_bar"] = 3
    _write_config(d, hf)
    with pytest.raises(ConfigError, match=r"'foo_bar'"):
        load_params(d)


def test_unsupported_rope_type_is_refused():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8, "original_max_position_embeddings": 128}
    with pytest.raises(ConfigError, match=r"rope_type.*'longrope'") as e:
        ModelConfig.from_hf(_hf(rope_parameters=rope))
    assert "rope_type" in str(e.value)
    # the 4.x spelling is refused the same way
    with pytest.raises(ConfigError, match=r"longrope"):
        ModelConfig.from_hf(_hf(rope_parameters=..., rope_theta=1e4, rope_scaling={"type": "longrope", "factor": 2.0}))


def test_unknown_rope_subfield_is_refused():
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0}
    with pytest.raises(ConfigError, match=r"low_freq_factor.*'linear'"):
        ModelConfig.from_hf(_hf(rope_parameters=rope))


def test_per_layer_type_rope_parameters_are_refused():
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ConfigError, match=r"rope_parameters"):
        ModelConfig.from_hf(_hf(rope_parameters=rope))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers4_and_5_layouts_parse_identically(dtype):
    v4 = _hf(rope_parameters=..., dtype=..., rope_theta=500000.0,
             rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype=dtype)
    v5 = _hf(rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}, dtype=dtype)
    c4, c5 = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert c4 == c5
    assert c5.rope.rope_type == "linear" and c5.rope.theta == 500000.0 and c5.rope.factor == 2.0
    assert c5.dtype == dtype


def test_transformers4_llama3_rope_scaling_parses_like_5():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = _hf(rope_parameters=..., rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
    v5 = _hf(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(v4).rope.original_max_position_embeddings == 8192


def test_transformers4_default_rope_without_scaling():
    c = ModelConfig.from_hf(_hf(rope_parameters=..., rope_theta=1e6, rope_scaling=None))
    assert c.rope.rope_type == "default" and c.rope.theta == 1e6


def test_null_head_dim_is_derived():
    c = ModelConfig.from_hf(_hf(head_dim=None))
    assert c.head_dim == 64 // 4
    assert ModelConfig.from_hf(_hf(head_dim=...)).head_dim == 16
    assert ModelConfig.from_hf(_hf(head_dim=32)).head_dim == 32


def test_qwen2_without_use_sliding_window_has_no_window():
    c = ModelConfig.from_hf(_hf(model_type="qwen2", use_sliding_window=False, sliding_window=4096,
                                max_window_layers=28))
    assert c.sliding_window is None
    assert c.qkv_bias


def test_qwen2_with_use_sliding_window_windows_layers_from_max_window_layers():
    c = ModelConfig.from_hf(_hf(model_type="qwen2", use_sliding_window=True, sliding_window=4096,
                                max_window_layers=1))
    assert c.sliding_window == (None, 4096, 4096)


def test_mistral_sliding_window_applies_to_every_layer():
    c = ModelConfig.from_hf(_hf(model_type="mistral", sliding_window=4096))
    assert c.sliding_window == (4096,) * 3
    assert ModelConfig.from_hf(_hf(model_type="mistral", sliding_window=None)).sliding_window is None


def test_tiny_model_configs_parse(tiny_model_dir):
    assert load_config(tiny_model_dir("mistral_window")).sliding_window == (5, 5, 5)
    assert load_config(tiny_model_dir("mistral")).sliding_window is None
    assert load_config(tiny_model_dir("qwen2")).sliding_window is None


# --------------------------------------------------------------------------- orbax round trip


def test_orbax_save_and_restore_roundtrip(tiny_model_dir, tmp_path):
    import jax
    import numpy as np

    from rhead_jax.checkpoints.orbax_io import restore_params, save_params

    cfg, params = load_params(tiny_model_dir("mixtral"))
    save_params(tmp_path / "ckpt", params, cfg)
    cfg2, restored = restore_params(tmp_path / "ckpt")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
