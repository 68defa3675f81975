"""The library attention kernels (rhead_jax.models.kernels: splash attention in Pallas interpret mode,
jax.nn.dot_product_attention's XLA implementation for the cuDNN call) against the chunked path:
outputs and "span" masses from the log-sum-exp, fp32, on a cache whose rows already hold different
numbers of keys (a shared prefix), with padding queries, GQA, windows, uniform-mask score scales and
soft-capping; and the dispatch (AttentionOptions.for_platform, fallbacks)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rhead_jax.models import kernels
from rhead_jax.models.attention import (NO_WINDOW, AttentionOptions, chunked_attention, dense_attention,
                                        mass_targets, prefill_attention)

B, T, K, G, D, S = 2, 96, 2, 2, 16, 256
HELD = (150, 37)          # slots each row holds before the call (its shared prefix)
VALID = (96, 80)          # real queries per row; the rest is padding (position -1)
TOL = dict(rtol=2e-5, atol=2e-5)    # fp32: the kernels sum in other orders than the chunked loop


def _case(seed=0):
    """q [B, T, K, G, D], the call's keys/values [B, T, K, D], the cache holding them, positions."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    q, k_new, v_new = f(B, T, K, G, D) * 2, f(B, T, K, D), f(B, T, K, D)
    kc, vc = f(B, K, S, D), f(B, K, S, D)
    q_pos = np.full((B, T), -1, np.int32)
    k_pos = np.full((B, S), -1, np.int32)
    for b, (held, n) in enumerate(zip(HELD, VALID)):
        q_pos[b, :n] = held + np.arange(n)
        k_pos[b, :held + n] = np.arange(held + n)
        kc[b, :, held:held + T] = k_new[b].swapaxes(0, 1)
        vc[b, :, held:held + T] = v_new[b].swapaxes(0, 1)
    slot0 = np.asarray(HELD, np.int32)
    targets = mass_targets(B, 1, span=[[100, 140], [3, 30]], queries=[[160, 230], [50, 110]])
    return (q, k_new, v_new, kc, vc, q_pos, k_pos, slot0), targets


def _chunked(args, targets, window, score_scale, masses):
    """chunked_attention, padding queries' outputs set to 0 (the kernels' value; chunked leaves the
    mean of the values there, which nothing reads)."""
    q, _, _, kc, vc, q_pos, k_pos, slot0 = map(jnp.asarray, args)
    res = chunked_attention(q, kc, vc, q_pos, k_pos, slot0, window=window, scale=D ** -0.5,
                            score_scale=score_scale, opts=AttentionOptions(q_chunk=32, k_chunk=128),
                            masses=masses, targets=targets)
    real = (q_pos >= 0)[:, :, None, None, None]
    return (res[0] * real, res[1]) if masses else res * real


def _kernel(args, targets, window, score_scale, masses, kernel, windows=None, softcap=None):
    return kernels.prefill_attention(*map(jnp.asarray, args), window=jnp.int32(window),
                                     windows=windows or (window,), scale=D ** -0.5, kernel=kernel,
                                     score_scale=score_scale, softcap=softcap, interpret=True, masses=masses,
                                     targets=targets)


@pytest.mark.parametrize("kernel,window", [("splash", NO_WINDOW), ("splash", 100), ("cudnn", NO_WINDOW)])
def test_kernels_equal_the_chunked_path(kernel, window):
    """Outputs and span masses, plain and with uniform-mask score scales (0 = uniform attention over
    the visible keys, 0.5, 1) on some heads."""
    args, targets = _case()
    scales = jnp.asarray([[0.0, 1.0], [0.5, 1.0]], jnp.float32)
    for score_scale in (None, scales):
        ref, ref_mass = _chunked(args, targets, window, score_scale, ("span",))
        out, mass = jax.jit(lambda: _kernel(args, targets, window, score_scale, ("span",), kernel))()
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), **TOL)
        assert float(np.asarray(ref_mass).min()) > 0       # every head puts some mass on the span
    # without masses the call returns the output alone, the same
    out = jax.jit(lambda: _kernel(args, targets, window, None, (), kernel))()
    np.testing.assert_allclose(np.asarray(out), np.asarray(_chunked(args, targets, window, None, ())), **TOL)


def test_per_layer_windows_pick_their_branch():
    """A window traced per layer (lax.switch over the static windows): each equals its own run."""
    args, targets = _case(1)
    for window in (100, NO_WINDOW):
        out = jax.jit(lambda w: _kernel(args, targets, w, None, (), "splash", windows=(100, NO_WINDOW)))(window)
        np.testing.assert_allclose(np.asarray(out), np.asarray(_chunked(args, targets, window, None, ())), **TOL)


def test_soft_cap_equals_the_dense_reference():
    """splash's soft-cap (tanh(s / c) * c on the scores) against dense attention with it applied."""
    args, targets = _case(2)
    q, _, _, kc, vc, q_pos, k_pos, slot0 = map(jnp.asarray, args)
    cap = 3.0
    s = jnp.einsum("btkgd,bksd->bkgts", q, kc) * D ** -0.5
    s = jnp.tanh(s / cap) * cap
    vis = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    p = jax.nn.softmax(jnp.where(vis[:, None, None], s, -1e30), axis=-1)
    ref = jnp.einsum("bkgts,bksd->btkgd", p, vc) * (q_pos >= 0)[:, :, None, None, None]
    out = jax.jit(lambda: _kernel(args, targets, NO_WINDOW, None, (), "splash", softcap=cap))()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)


def test_for_platform_checks_the_kernel_against_the_hardware():
    assert AttentionOptions.for_platform("cpu").prefill == "chunked"
    cpu = AttentionOptions.for_platform("cpu")      # CPU: the defaults, caches in multiples of 64 slots
    assert cpu == AttentionOptions(cache_multiple=64)
    assert AttentionOptions.for_platform("cpu", "splash:interpret").cache_multiple == 0   # kernels: whole tiles
    assert AttentionOptions.for_platform("tpu").cache_multiple == AttentionOptions.for_platform("gpu").cache_multiple == 0
    tpu = AttentionOptions.for_platform("tpu")
    assert (tpu.prefill, tpu.cache_writes, tpu.interpret) == ("splash", "tpu", False)
    assert AttentionOptions.for_platform("gpu").prefill == "cudnn"
    assert AttentionOptions.for_platform("tpu", "chunked").prefill == "chunked"
    assert AttentionOptions.for_platform("cpu", "splash:interpret").interpret
    with pytest.raises(ValueError, match="runs on tpu"):
        AttentionOptions.for_platform("cpu", "splash")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        AttentionOptions.for_platform("tpu", "flash")


def test_calls_without_a_kernel_form_run_chunked(caplog):
    """Induction masses need every key: the dispatch runs chunked (bit-identical) and logs why."""
    args, _ = _case(3)
    q, k_new, v_new, kc, vc, q_pos, k_pos, slot0 = map(jnp.asarray, args)
    t = mass_targets(B, 1, period=[7, 7])
    opts = AttentionOptions(q_chunk=32, k_chunk=128, prefill="splash", interpret=True)
    kw = dict(window=NO_WINDOW, scale=D ** -0.5, masses=("induction",), targets=t)
    got = prefill_attention(q, k_new, v_new, kc, vc, q_pos, k_pos, slot0, windows=(NO_WINDOW,), opts=opts, **kw)
    ref = chunked_attention(q, kc, vc, q_pos, k_pos, slot0, opts=opts, **kw)
    assert len(got) == 2
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert kernels.kernel_form("splash", kv_heads=K, cache_size=S, windows=(NO_WINDOW,), masses=("induction",),
                               sink=0, dtype=jnp.float32) is not None
    assert kernels.kernel_form("cudnn", kv_heads=K, cache_size=S, windows=(NO_WINDOW,), masses=(),
                               sink=0, dtype=jnp.float32) is not None      # cuDNN takes bf16 / fp16


@pytest.mark.parametrize("masses", [(), ("span",)])
def test_chunked_on_a_cache_of_partial_tiles_is_bit_identical(masses):
    """A cache of AttentionOptions.cache_multiple slots (not whole key tiles): the chunked path pads
    the last tile with empty slots and computes exactly what it computes on a cache of whole tiles."""
    args, targets = _case()
    q, _, _, kc, vc, q_pos, k_pos, slot0 = map(jnp.asarray, args)
    empty = lambda x, fill=0: jnp.pad(x, [(0, 0)] * 2 + [(0, 128)] + [(0, 0)] * (x.ndim - 3),  # noqa: E731
                                      constant_values=fill)
    kc, vc = empty(kc), empty(vc)                               # 384 slots: 3 tiles of 128
    k_pos = jnp.pad(k_pos, ((0, 0), (0, 128)), constant_values=-1)
    cut = 320                                   # 2.5 tiles; every key the rows hold is below it
    assert int(k_pos.max()) < cut

    def run(k, v, kp):
        return chunked_attention(q, k, v, q_pos, kp, slot0, window=NO_WINDOW, scale=D ** -0.5,
                                 opts=AttentionOptions(q_chunk=32, k_chunk=128), masses=masses, targets=targets)

    whole = run(kc, vc, k_pos)
    part = run(kc[:, :, :cut], vc[:, :, :cut], k_pos[:, :cut])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dense_reference_is_what_chunked_computes():
    """The reference the kernel tests use agrees with dense attention on this case (guards _case)."""
    args, targets = _case()
    q, _, _, kc, vc, q_pos, k_pos, slot0 = map(jnp.asarray, args)
    out, _ = dense_attention(q, kc, vc, q_pos, k_pos, window=NO_WINDOW, scale=D ** -0.5, cache_left=False)
    out = out * (q_pos >= 0)[:, :, None, None, None]
    np.testing.assert_allclose(np.asarray(out), np.asarray(_chunked(args, targets, NO_WINDOW, None, ())), **TOL)


def test_sweep_through_splash_equals_the_chunked_sweep(tmp_path, monkeypatch):
    """A tiny model's sweep (shared prefix, padding rows, prefill pieces of several widths, the
    "query" score's prefill masses) with config.sweep.attention="splash:interpret": the generated
    tokens, copy scores and head_scores.json are identical to the chunked sweep's, the query masses
    equal to fp32 rounding."""
    import json

    from rhead_jax import detection
    from rhead_jax.checkpoints import load_model
    from rhead_jax.config import default_config, validate
    from tests.helpers.tiny_smol import make_tiny_smol

    d = make_tiny_smol(tmp_path / "tiny-smol", sharpen=False, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4)
    model = load_model(str(d))
    calls = []
    kernel = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a, **k: calls.append(k["kernel"]) or kernel(*a, **k))

    def run(attention):
        c = default_config()
        c.model.path, c.model.name = str(d), "tiny"
        for k, v in dict(lengths=(300,), depths=(50,), batch_size=2, max_new_tokens=4, prefill_chunk=128,
                         q_chunk=64, k_chunk=64, pad_multiple=32, extra_scores=("query",),
                         attention=attention).items():
            setattr(c.sweep, k, v)
        wd = tmp_path / attention.replace(":", "_")
        detection.run_sweep(validate(c), str(wd), model=model)
        return [json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()], wd

    ref, ref_wd = run("chunked")
    assert not calls
    ours, wd = run("splash:interpret")
    assert calls and set(calls) == {"splash"}       # traced once per program, every prefill through splash
    assert len(ours) == 3 and any(r["shared_prefix_tokens"] > 100 for r in ours)
    for a, b in zip(ours, ref):
        assert (a["generated"], a["copy_counts"], a["scores"]) == (b["generated"], b["copy_counts"], b["scores"])
        np.testing.assert_allclose(a["extra_scores"]["query"], b["extra_scores"]["query"], rtol=1e-4, atol=1e-6)
    assert (wd / "head_scores.json").read_bytes() == (ref_wd / "head_scores.json").read_bytes()


@pytest.mark.slow
def test_splash_in_shard_map_on_a_mesh_equals_one_device(tmp_path):
    """The runner traces under its mesh and splash runs in shard_map (rows on "data", KV heads on
    "model"): on a 2 x 2 mesh of simulated devices a tiny sweep's tokens and copy counts equal the
    one-device chunked sweep's, and so do the chunked sweep's on the mesh; query scores to 1e-4."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.tiny_smol import make_tiny_smol

    d = make_tiny_smol(tmp_path / "gqa")       # 8 query heads, 2 KV heads: one per model shard
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_kernels", "--model_dir", str(d), "--workroot",
                          str(tmp_path / "wd"), "--meshes", "1,1,1", "2,2,1"], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    ref = results["1,1,1"]["chunked"]
    assert len(ref) == 3
    for mesh, runs in results.items():
        assert runs["chunked kernel traces"] == 0 and runs["splash:interpret kernel traces"] > 0, mesh
        for attention in ("chunked", "splash:interpret"):
            rows = runs[attention]
            assert [r[:3] for r in rows] == [r[:3] for r in ref], (mesh, attention)
            np.testing.assert_allclose([r[3] for r in rows], [r[3] for r in ref], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{mesh} {attention}")


def test_config_refuses_unknown_attention_kernels():
    from rhead_jax.config import default_config, validate
    from rhead_jax.errors import UserError

    c = default_config()
    c.sweep.attention = "flash"
    with pytest.raises(UserError, match="config.sweep.attention must be auto, chunked, splash"):
        validate(c)
    c.sweep.attention = "splash:interpret"
    assert validate(c).sweep.attention == "splash:interpret"
