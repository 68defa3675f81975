"""The dry-run commands (rhead_jax.dryrun.cli) in subprocesses, as users run them: `python -m
rhead_jax.dryrun` and `python -m rhead_jax.sweep --dry_run` on simulated CPU devices, their user
errors (one `error:` line, exit status 2) and the re-exec that gives jax the slice's devices."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, *, devices=8, timeout=300, python_args=("-m",)):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("RHEAD_DRYRUN_REEXEC", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *python_args, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _plans(stdout: str) -> list[dict]:
    return [json.loads(line[len("JSON "):]) for line in stdout.splitlines() if line.startswith("JSON ")]


def test_dry_run_on_8_simulated_devices_reports_fit_and_compiler_temp():
    # the step's settings (batch 8, prefill chunk 4096, 50 new tokens) come from the config
    out = _run(["rhead_jax.dryrun", "--config", "mistral_7b_v02.py", "--topology", "v5litepod-8", "--context", "4096",
                "--backend", "cpu", "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fits: yes" in out.stdout and "temp (activations, scratch)" in out.stdout
    assert "CPU-compiled memory stands in for the TPU compiler's" in out.stdout
    assert "prefill chunk 4096" in out.stdout and "Mistral-7B-v0.2 on v5litepod-8" in out.stdout
    (p,) = _plans(out.stdout)
    assert p["chips"] == 8 and p["mesh"] == {"data": 1, "model": 8, "expert": 1} and p["fits"]
    assert p["mesh_source"] == "auto" and p["batch"] == 8 and p["prefill_chunk"] == 4096
    c, a = p["compiled_gib"], p["analytic_gib"]
    assert set(c) == {"setup", "prefill", "decode"} and p["temp_gib"] > 0 and p["prefill_width"] == 4096
    # each program's per-device arguments are exactly the analytic shard sizes; the cache is donated
    # through prefill and decode (aliased: held once)
    assert abs(c["decode"]["argument"] - (a["params"] + a["kv_cache"])) * 2**30 < 4096
    assert abs(c["decode"]["output"] - (a["kv_cache"] + a["outputs"])) * 2**30 < 4096
    for name in ("prefill", "decode"):
        assert abs(c[name]["alias"] - a["kv_cache"]) * 2**30 < 4096
        assert f"{c[name]['temp']:16.2f}" in out.stdout
    assert abs(p["total_gib"] - (a["params"] + a["kv_cache"] + a["shared_prefix_cache"] + p["temp_gib"])) < 0.05
    # the time projection of the config's grid: chunked attention on the CPU compiler, chip-hours = hours x chips
    proj = p["projection"]
    assert p["attention"] == proj["kernel"] == "chunked" and "projected wall time" in out.stdout
    assert proj["phases"]["prefill"]["calls"] > 0 and proj["compile_seconds"] > 0
    assert abs(proj["chip_hours"] - proj["wall_seconds"] / 3600 * 8) < 1e-9


def test_sweep_dry_run_sets_up_devices_itself():
    # no XLA_FLAGS: `sweep --dry_run` asks for the slice's 8 devices before jax starts
    out = _run(["rhead_jax.sweep", "--config", "smollm2_135m.py", "--dry_run", "--topology", "v5litepod-8",
                "--dry_run_backend", "cpu"], devices=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SmolLM2-135M-Instruct on v5litepod-8 (8 chips" in out.stdout
    assert "fits: yes" in out.stdout and "context 2000" in out.stdout
    assert "config.mesh does not fit v5litepod-8" in out.stdout      # the config's 1x1x1 mesh -> auto


def test_standalone_smallest_with_overrides_and_sweep_flag_names():
    # config overrides set the step; --dry_run_backend (sweep's name) is an alias of --backend
    out = _run(["rhead_jax.dryrun", "--config", "smollm2_135m.py", "--config.model.dtype=bfloat16",
                "--config.sweep.batch_size=8", "--smallest", "v5e", "--max_chips", "8", "--context", "1024",
                "--dry_run_backend=cpu", "--json"], devices=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("-- v5litepod-1: mesh {'data': 1, 'model': 1, 'expert': 1}")
    (p,) = _plans(out.stdout)
    assert p["topology"] == "v5litepod-1" and p["fits"] and p["batch_size"] == 8 and p["context_len"] == 1024
    assert "bf16" in out.stdout and "float32" not in out.stdout


def test_reexec_gives_jax_the_devices_once_it_has_started():
    """ensure_cpu_devices after jax started with 1 device: the process re-executes itself with
    XLA_FLAGS set (same command line) and then has them; a re-executed process never loops."""
    code = textwrap.dedent("""
        import os, sys, jax
        print("start", len(jax.devices("cpu")), os.environ.get("RHEAD_DRYRUN_REEXEC"), flush=True)
        from rhead_jax.dryrun import ensure_cpu_devices
        ensure_cpu_devices(4)
        print("devices", len(jax.devices("cpu")), sys.argv[1:], flush=True)
    """)
    out = _run(["-c", code, "arg1"], devices=0, python_args=())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["start 1 None", "start 4 1", "devices 4 ['arg1']"]
    env_loop = {**os.environ, "JAX_PLATFORMS": "cpu", "RHEAD_DRYRUN_REEXEC": "1"}
    env_loop.pop("XLA_FLAGS", None)
    loop = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_loop, capture_output=True, text=True,
                          timeout=120)
    assert loop.returncode != 0 and "still 1 CPU devices after re-executing" in loop.stderr


@pytest.mark.parametrize("args, message", [
    (["rhead_jax.sweep", "--config", "yi34b.py", "--dry_run", "--topology", "v9-8"], "unknown TPU topology 'v9-8'"),
    (["rhead_jax.sweep", "--config", "yi34b.py", "--dry_run"], "--dry_run needs --topology"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v9-8"], "unknown TPU topology 'v9-8'"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v5p-64", "--mesh", "data=3"],
     "needs 3 devices, 32 are available"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v5p-64", "--mesh", "model:8"], "bad mesh"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--preset", "Llama-9-1T", "--topology", "v5p-64"],
     "unknown --preset 'Llama-9-1T'"),
    (["rhead_jax.dryrun", "--config", "mistral_7b_v02.py", "--topology", "v5p-64", "--context", "40000"],
     "context 40000 is out of range"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v5p-64", "--batch_size", "4"],
     "--batch_size is a config key now: use --config.sweep.batch_size=N"),
    (["rhead_jax.dryrun", "--config", "yi34b.py"], "give exactly one of --topology"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v5p-64", "--mixed_full_fraction", "0.25,2"],
     "--mixed_full_fraction takes fractions in (0, 1], got 2.0"),
    (["rhead_jax.dryrun", "--config", "yi34b.py", "--topology", "v5p-64", "--mixed_full_fraction", "x"],
     "--mixed_full_fraction takes comma-separated fractions"),
    (["rhead_jax.dryrun", "--topology", "v5p-64"], "--config is required"),
])
def test_user_errors_are_one_line(args, message):
    out = _run(args, devices=0, timeout=120)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (TPU compiler, no TPU)")
def test_tpu_compiler_plan():
    out = _run(["rhead_jax.dryrun", "--config", "smollm2_135m.py", "--config.model.dtype=bfloat16", "--topology",
                "v5p-8", "--context", "2048", "--backend", "tpu", "--json"], devices=0, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (p,) = _plans(out.stdout)
    assert p["backend"] == "tpu" and p["fits"] and p["temp_gib"] > 0
    assert p["attention"] == "splash"          # the kernel path compiles with XLA:TPU
    c, a = p["compiled_gib"], p["analytic_gib"]
    for name in ("prefill", "decode"):   # the donated cache is aliased on TPU too: no returned copy
        assert abs(c[name]["alias"] - a["kv_cache"]) * 2**30 < 4096
