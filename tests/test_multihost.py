"""Two local processes x 4 simulated CPU devices, coordinated by jax.distributed over 127.0.0.1, run
the commands a pod runs (the sweep, the ablation, the mixed KV cache) on a model-parallel mesh; their
files equal a single-process run's. This is what `launch/run_sweep.sh --worker all` starts on every
host of a slice (there the flag is --distributed and the TPU environment names the coordinator)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sweep_exit import sweep_finished
from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
from rhead_jax.config import default_config
def get_config():
    c = default_config()
    c.model.path, c.model.name = {model!r}, "tiny"
    c.sweep.lengths, c.sweep.depths = [300], [0, 50, 100]
    c.sweep.batch_size, c.sweep.max_new_tokens = 8, 5
    c.sweep.prefill_chunk, c.sweep.q_chunk, c.sweep.k_chunk, c.sweep.pad_multiple = 128, 64, 64, 32
    c.mixedkv.sink, c.mixedkv.recent = 4, 32
    c.mesh.data, c.mesh.model = 2, 4
    return c
"""
# hand-made scores of the tiny model's 2 layers x 8 heads: 3 retrieval heads (mean > 0.1)
SCORES = {f"{layer}-{head}": [0.0, 0.0] for layer in range(2) for head in range(8)}
SCORES.update({"0-1": [0.9, 0.7], "1-3": [0.4, 0.2], "1-6": [0.3, 0.3], "0-5": [0.05, 0.1]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    model = make_tiny_smol(tmp / "model")
    cfg = tmp / "tiny_mp.py"
    cfg.write_text(CONFIG.format(model=str(model)))
    scores = tmp / "head_scores.json"
    scores.write_text(json.dumps(SCORES))
    return cfg, scores


def _two_processes_and_one(module: str, cfg: Path, args: list[str], tmp: Path) -> tuple[Path, Path, str]:
    """Run `python -m module` as 2 jax.distributed processes (2 x 4 devices, mesh data=2 x model=4) and
    as one process on one device; return both workdirs and process 0's output."""
    base = [sys.executable, "-m", module, f"--config={cfg}", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = _free_port()
    procs = [subprocess.Popen(base + [f"--workdir={tmp / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert sweep_finished(p.returncode, out) if module == "rhead_jax.sweep" else p.returncode == 0, out[-3000:]
    assert "mesh {'data': 2, 'model': 4, 'expert': 1} over 8 devices (2 processes)" in outs[0]
    single = subprocess.run(base + [f"--workdir={tmp / 'single'}", "--config.mesh.data=1", "--config.mesh.model=1"],
                            cwd=REPO, env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=600)
    assert (sweep_finished(single.returncode, single.stderr) if module == "rhead_jax.sweep"
            else single.returncode == 0), single.stderr[-3000:]
    return tmp / "multi", tmp / "single", outs[0]


def _results(path: Path, drop: tuple[str, ...]) -> dict:
    """results.json without the keys that name the run (workdir, timings), which differ by construction."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(json.loads(path.read_text()))


def test_two_process_sweep_equals_single_process(tiny, tmp_path):
    cfg, _ = tiny
    multi, single, _ = _two_processes_and_one("rhead_jax.sweep", cfg, [], tmp_path)
    for name in ("head_scores.json", "results.jsonl"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name


@pytest.mark.slow  # three more JAX processes: ~3.5 min on a loaded 2-core machine
def test_two_process_ablation_equals_single_process(tiny, tmp_path):
    cfg, scores = tiny
    multi, single, out = _two_processes_and_one(
        "rhead_jax.ablate", cfg, [f"--scores={scores}", "--mask=top:2", "--sweep_k=2", "--seeds=0", "--config.ablation.baseline=False"],
        tmp_path)
    a, b = (_results(d / "results.json", DROP) for d in (multi, single))
    heads = {label: run["heads"] for label, run in a["runs"].items()}
    assert len(heads) == 2 and [[0, 1], [1, 3]] in heads.values(), heads   # top:2 (the two best of SCORES), random:2
    assert a == b
    assert "top:2" in out


@pytest.mark.slow  # as above
def test_two_process_mixedkv_equals_single_process(tiny, tmp_path):
    cfg, scores = tiny
    multi, single, _ = _two_processes_and_one(
        "rhead_jax.mixedkv", cfg, [f"--heads=copy:{scores},none", "--full_fraction=0.5"], tmp_path)
    a, b = (_results(d / "results.json", DROP) for d in (multi, single))
    assert sorted(a["runs"]) == sorted(b["runs"]) and len(a["runs"]) == 2, sorted(a["runs"])
    assert a == b


DROP = ("workdir", "seconds", "elapsed_s", "time_s", "timing", "created", "provenance")
