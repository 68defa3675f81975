"""Sharded sweeps on 8 simulated CPU devices equal the single-device run; mesh and spec rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]


def _run_meshes(model_dir, workroot, meshes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_check", "--model_dir", str(model_dir),
                          "--workroot", str(workroot), "--meshes", *meshes], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    for m in meshes:
        if m != "1,1,1":
            assert f"ORBAX_OK {m}" in out.stdout  # sharded params restored from orbax into the mesh
    return json.loads(line[len("RESULT "):]), out.stderr


def _assert_same(results, ref_key):
    ref = results[ref_key]
    for mesh, r in results.items():
        assert r["sweep"] == ref["sweep"], mesh               # tokens and per-head copy counts
        assert r["top_slot"] == ref["top_slot"], mesh         # every head's top-1 slot at every step
        np.testing.assert_allclose(np.array(r["top_weight"]), np.array(ref["top_weight"]), atol=1e-5)


def test_meshes_match_single_device(tmp_path):
    d = make_tiny_smol(tmp_path / "gqa")  # 8 query heads, 2 kv heads: kv replicated on model=4/8
    results, log = _run_meshes(d, tmp_path / "wd", ["1,1,1", "8,1,1", "2,4,1", "1,8,1"])
    _assert_same(results, "1,1,1")
    assert "kv_heads=2 is not divisible by mesh axis model" in log  # the log says what is replicated
    assert " branches prefilled once" in log                       # prefix branches ran on every mesh


def test_expert_sharded_mixtral_matches_single_device(tmp_path):
    d = make_tiny_smol(tmp_path / "moe", moe=True)
    results, _ = _run_meshes(d, tmp_path / "wd", ["1,1,1", "2,1,4", "1,2,4"])
    _assert_same(results, "1,1,1")


def test_mesh_rules():
    import jax

    from rhead_jax.sharding import make_mesh

    n = jax.device_count()
    assert make_mesh({"data": -1, "model": 1, "expert": 1}).shape["data"] == n
    with pytest.raises(ValueError, match="needs 3 devices"):
        make_mesh({"data": 3, "model": 1, "expert": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh({"data": -1, "model": -1, "expert": 1})


def test_extra_scores_and_detectors_on_meshes_match_single_device(tmp_path):
    """config.sweep.extra_scores and rhead_jax.detectors on data x model meshes of simulated devices."""
    d = make_tiny_smol(tmp_path / "gqa")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    meshes = ["1,1,1", "2,4,1"]
    out = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_masses", "--model_dir", str(d),
                          "--workroot", str(tmp_path / "wd"), "--meshes", *meshes], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    ref = results["1,1,1"]
    assert any(v for r in ref["sweep"] for v in np.ravel(r[3]["query"]))
    for mesh in meshes[1:]:
        r = results[mesh]
        assert [x[:3] for x in r["sweep"]] == [x[:3] for x in ref["sweep"]], mesh
        for a, b in zip(r["sweep"], ref["sweep"]):
            for name in ("mass", "query", "spatial"):
                np.testing.assert_allclose(a[3][name], b[3][name], rtol=1e-5, atol=1e-6, err_msg=mesh)
            for name in ("logit", "dla"):   # logit units: tolerance relative to the largest
                np.testing.assert_allclose(a[3][name], b[3][name], rtol=1e-4,
                                           atol=1e-5 * max(np.abs(b[3][name]).max(), 1e-6), err_msg=mesh)
        for name, hs in r["detectors"].items():
            np.testing.assert_allclose(np.array(list(hs.values())), np.array(list(ref["detectors"][name].values())),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{mesh} {name}")
