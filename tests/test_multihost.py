"""Two local processes x 4 simulated CPU devices, coordinated by jax.distributed over 127.0.0.1,
run a sharded sweep whose final files equal a single-process run's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
    c.mesh.data, c.mesh.model = 2, 4
    return c
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sweep_equals_single_process(tmp_path):
    model = make_tiny_smol(tmp_path / "model")
    cfg = tmp_path / "tiny_mp.py"
    cfg.write_text(CONFIG.format(model=str(model)))
    base = [sys.executable, "-m", "rhead_jax.sweep", f"--config={cfg}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = _free_port()
    procs = [subprocess.Popen(base + [f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "mesh {'data': 2, 'model': 4, 'expert': 1} over 8 devices (2 processes)" in outs[0]
    single = subprocess.run(base + [f"--workdir={tmp_path / 'single'}", "--config.mesh.data=1", "--config.mesh.model=1"],
                            cwd=REPO, env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for name in ("head_scores.json", "results.jsonl"):
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
