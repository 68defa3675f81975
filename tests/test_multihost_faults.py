"""A killed host (docs/reliability.md): two local jax.distributed processes x 4 simulated CPU devices
(the stand-in for a pod) run a sharded sweep; at seeded random batches one process is SIGKILLed
(the other then dies or is killed, as a pod's job is restarted), and both are started again. The
resumed sweep's files equal an uninterrupted single-process run's, byte for byte."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rhead_jax import detection
from rhead_jax.checkpoints import load_model
from rhead_jax.config import default_config, validate
from rhead_jax.results_store import decode_batch
from tests.helpers.sweep_exit import sweep_finished
from tests.helpers.tiny_smol import make_tiny_smol

pytestmark = pytest.mark.slow   # three launches of two processes: minutes on 2 loaded cores

REPO = Path(__file__).resolve().parents[1]
SEED, KILLS = 23, 3
# 1 length x 5 depths x 3 needles = 15 tests in 8 batches of 2 (the data axis)
SWEEP = dict(lengths=[300], depths=[0, 25, 50, 75, 100], batch_size=2, max_new_tokens=5, prefill_chunk=128,
             q_chunk=64, k_chunk=64, pad_multiple=32)
N_BATCHES = 8
CONFIG = """
from rhead_jax.config import default_config
def get_config():
    c = default_config()
    c.model.path, c.model.name = {model!r}, "tiny"
    for k, v in {sweep!r}.items():
        setattr(c.sweep, k, v)
    c.mesh.data, c.mesh.model = 2, 4
    return c
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: Path, wd: Path, logs: Path, run: int) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = []
    for i in range(2):
        log = open(logs / f"run{run}_p{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "rhead_jax.sweep", f"--config={cfg}", f"--workdir={wd}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def _batches(wd: Path) -> int:
    d = wd / "batches"
    return len([p for p in d.iterdir() if p.name.startswith("batch_")]) if d.exists() else 0


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_host_restarted_resumes_to_identical_results(tmp_path):
    model_dir = make_tiny_smol(tmp_path / "model")
    cfg = tmp_path / "tiny_mp.py"
    cfg.write_text(CONFIG.format(model=str(model_dir), sweep=SWEEP))
    wd, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    rng = random.Random(SEED)
    first = rng.randrange(2)      # the writer (process 0) and the other host are killed in turn
    kills = []
    procs: list[subprocess.Popen] = []
    try:
        for run in range(KILLS):
            before = _batches(wd)
            assert before < N_BATCHES - 1, kills
            # kill once this many batch files exist, leaving room for the later kill points
            target = rng.randint(before + 1, max(before + 1, N_BATCHES - KILLS + run))
            victim = (first + run) % 2
            procs = _launch(cfg, wd, logs, run)
            deadline = time.time() + 300
            while _batches(wd) < target and all(p.poll() is None for p in procs) and time.time() < deadline:
                time.sleep(0.02)
            assert all(p.poll() is None for p in procs), (logs / f"run{run}_p0.log").read_text()[-3000:]
            assert _batches(wd) >= target, "no progress before the deadline"
            _kill(procs[victim])                                # the host dies
            survivor = procs[1 - victim]
            try:                                                # its peer fails or hangs in a collective
                survivor.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill(survivor)
            kills.append((target, victim, _batches(wd)))
        assert len(kills) == KILLS, kills
        assert _batches(wd) < N_BATCHES
        procs = _launch(cfg, wd, logs, KILLS)                  # both restarted: the sweep resumes
        for p in procs:
            p.wait(timeout=600)
        out = [(logs / f"run{KILLS}_p{i}.log").read_text() for i in range(2)]
        for p, o in zip(procs, out):
            assert sweep_finished(p.returncode, o), o[-3000:]
        done = kills[-1][2]
        assert f"{N_BATCHES - done} to run ({done} already done)" in out[0], (kills, out[0][-3000:])
    finally:
        for p in procs:
            _kill(p)
    # an uninterrupted single-process sweep of the same grid
    c = default_config()
    c.model.path, c.model.name, c.compile_cache = str(model_dir), "tiny", False
    for k, v in SWEEP.items():
        setattr(c.sweep, k, v)
    detection.run_sweep(validate(c), str(tmp_path / "single"), model=load_model(str(model_dir)))
    for name in ("head_scores.json", "results.jsonl"):
        assert (wd / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    names = sorted(p.name for p in (wd / "batches").iterdir())
    assert names == [f"batch_{b:05d}.json" for b in range(N_BATCHES)]   # whole files, no temporaries
    for b, n in enumerate(names):
        data = (wd / "batches" / n).read_bytes()
        assert decode_batch(data, b, json.loads(data.partition(b"\n")[0])["pin"])
