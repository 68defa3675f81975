"""launch/keep_running.sh against a fake Cloud TPU: a Spot slice preempted mid-run is recreated,
reinstalled, its weights fetched again and the run resumed on the same gs:// workdir, until
summary.json exists; with preemptions every round it gives up cleanly after --max_retries.

The fake `gcloud` (a Python script) keeps the queued resource's state in a JSON file and reports the
states the queued-resources API reports (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDING,
SUSPENDED: https://cloud.google.com/tpu/docs/queued-resources), as scripted per creation. Its
`tpu-vm ssh` runs the worker command here, in a fake worker HOME (one worker); `tpu-vm scp` copies
into it; `gcloud storage ls gs://...` looks in a local directory standing for the bucket. A
preemption kills the worker's processes and deletes its HOME, as Spot preemption deletes the VM and
its boot disk. The worker's `python` is a fake sweep: it needs the weights file, computes 6 batches
(skipping the ones in the workdir, as the real sweep resumes) and writes summary.json last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sweep_exit import sweep_finished

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "keep_running.sh"

FAKE_GCLOUD = r'''#!PYTHON
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
state_path = Path(os.environ["FAKE_STATE"])
st = json.loads(state_path.read_text())
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
home, gcs = Path(os.environ["FAKE_HOME"]), Path(os.environ["FAKE_GCS"])

def save():  # atomic: the worker's python reads it concurrently
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    os.replace(tmp, state_path)

def flag(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)

def local(path):
    return gcs / path[len("gs://"):] if path.startswith("gs://") else Path(path)

def boot():  # a fresh VM: an empty disk with the image's tools (here: uv, which install.sh would fetch)
    shutil.rmtree(home, ignore_errors=True)
    (home / ".local" / "bin").mkdir(parents=True)
    shutil.copy(os.environ["FAKE_UV"], home / ".local" / "bin" / "uv")

def preempt():  # the VM and its boot disk are deleted: processes killed, HOME gone
    for pidf in (home / "rhead_logs").glob("*.pid"):
        try:
            os.kill(int(pidf.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(home, ignore_errors=True)

cmd = args[:4]
if cmd[:3] == ["compute", "tpus", "queued-resources"]:
    verb = args[3]
    if verb == "create":
        st["created"] += 1
        st["pos"] = 0
        save()
        boot()
    elif verb == "delete":
        st["pos"] = -1
        save()
    elif verb == "describe":
        if st["pos"] < 0:
            print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        states = st["script"][min(st["created"], len(st["script"])) - 1]
        s = states[min(st["pos"], len(states) - 1)]
        if s == "SUSPENDING" and st.get("hold_after"):
            # preempt once the run has made progress, so that the resume has something to skip
            for _ in range(int(st.get("hold_wait_s", 30) / 0.05)):
                if len(list((gcs / "bucket" / "run").rglob("batch_*"))) >= st["hold_after"]:
                    break
                time.sleep(0.05)
        if s == "SUSPENDING":
            preempt()
        st["pos"] += 1
        save()
        print(s)
elif cmd[:3] == ["compute", "tpus", "tpu-vm"]:
    if not home.exists():
        print("ERROR: no such TPU", file=sys.stderr)
        sys.exit(1)
    if args[3] == "scp":
        src, dst = [a for a in args[4:] if not a.startswith("--")]
        shutil.copy(src, home / dst.split(":", 1)[1])
    elif args[3] == "ssh":
        env = {**os.environ, "HOME": str(home), "PATH": os.environ["FAKE_WORKER_PATH"]}
        sys.exit(subprocess.run(["bash", "-c", flag("--command")], env=env).returncode)
elif args[:2] == ["storage", "ls"]:
    sys.exit(0 if local(args[2]).exists() else 1)
else:
    print("fake gcloud: unexpected", args, file=sys.stderr)
    sys.exit(2)
'''

FAKE_PYTHON = r'''#!PYTHON
"""A worker's venv python: pip and the device check succeed; -m rhead_jax.sweep is a resumable fake sweep."""
import json, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["FAKE_PY_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
if argv[:2] != ["-m", "rhead_jax.sweep"]:
    sys.exit(0)
opts = dict(a[2:].split("=", 1) for a in argv[2:] if a.startswith("--") and "=" in a)
assert "--distributed" in argv
weights = Path(os.path.expanduser("~/ckpt/weights.bin"))
if weights.read_text() != "weights":   # fetched again after every (re)install
    sys.exit("no weights")
wd = Path(os.environ["FAKE_GCS"]) / opts["workdir"][len("gs://"):]
wd.mkdir(parents=True, exist_ok=True)
done = sorted(p.name for p in wd.glob("batch_*"))
print(f"resuming with {len(done)} batches done", flush=True)
with open(os.environ["FAKE_RUNS_LOG"], "a") as f:
    f.write(json.dumps({"resumed": len(done)}) + "\n")
state = json.loads(Path(os.environ["FAKE_STATE"]).read_text())
for i in range(6):
    b = wd / f"batch_{i}"
    if b.exists():
        continue
    if state.get("hold_after") and (state["created"] == 1 or state.get("hold_every")) and i == state["hold_after"]:
        time.sleep(600)     # the first slice's run is still going when the preemption comes
    tmp = wd / f".tmp_{i}"
    tmp.write_text(f"scores of batch {i} with {opts['config.model.path']}")
    tmp.rename(b)           # atomic, as the real ResultStore
summary = {p.name: p.read_text() for p in sorted(wd.glob("batch_*"))}
(wd / "summary.json").write_text(json.dumps(summary, sort_keys=True))
'''


class Cloud:
    def __init__(self, tmp: Path, script: list[list[str]]):
        self.tmp = tmp
        bin_ = tmp / "bin"
        bin_.mkdir(parents=True)
        wbin = tmp / "workerbin"
        wbin.mkdir()
        self.home, self.gcs = tmp / "worker_home", tmp / "gcs"
        self.gcs.mkdir()
        gcloud = bin_ / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
        gcloud.chmod(0o755)
        py = tmp / "fake_python"
        py.write_text(FAKE_PYTHON.replace("PYTHON", sys.executable))
        py.chmod(0o755)
        uv = tmp / "fake_uv"   # `uv venv ... DIR` makes DIR/bin/python (the fake)
        uv.write_text(f'#!/usr/bin/env bash\nset -e\nd="${{@: -1}}"\nmkdir -p "$d/bin"\ncp {py} "$d/bin/python"\n')
        uv.chmod(0o755)
        for name, body in (("python3", "exit 0"), ("curl", "echo 0")):   # pip install uv; the worker number
            (wbin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
            (wbin / name).chmod(0o755)
        self.state = tmp / "state.json"
        self.state.write_text(json.dumps({"created": 0, "pos": -1, "script": script, "hold_after": 2}))
        self.log, self.pylog, self.runs = tmp / "gcloud.jsonl", tmp / "python.jsonl", tmp / "runs.jsonl"
        self.env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_WORKER_PATH": f"{wbin}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_STATE": str(self.state), "FAKE_GCLOUD_LOG": str(self.log), "FAKE_HOME": str(self.home),
                    "FAKE_GCS": str(self.gcs), "FAKE_UV": str(uv), "FAKE_PY_LOG": str(self.pylog),
                    "FAKE_RUNS_LOG": str(self.runs), "TMPDIR": str(tmp)}
        for k in [k for k in self.env if k.startswith(("TPU_", "CLOUDSDK_"))] + ["GCLOUD", "DRY_RUN"]:
            self.env.pop(k, None)

    def keep_running(self, *args: str, workdir="gs://bucket/run") -> subprocess.CompletedProcess:
        cmd = ["bash", str(SCRIPT), "--name", "rhead", "--zone", "us-west4-a", "--accelerator", "v5e-8",
               "--config", "tiny.py", "--workdir", workdir, "--poll", "0.1",
               "--weights_cmd", "mkdir -p ~/ckpt && echo -n weights > ~/ckpt/weights.bin", *args,
               "--", "--config.model.path=~/ckpt"]
        return subprocess.run(cmd, env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=300)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def runs_(self) -> list[dict]:
        return [json.loads(line) for line in self.runs.read_text().splitlines()] if self.runs.exists() else []


def _verbs(calls):
    out = []
    for c in calls:
        if c[:3] == ["compute", "tpus", "queued-resources"]:
            out.append("qr-" + c[3])
        elif c[:3] == ["compute", "tpus", "tpu-vm"]:
            cmd = next((a for a in c if a.startswith("--command=")), "")
            out.append("scp" if c[3] == "scp" else "install" if "pip install" in cmd else
                       "start" if "nohup" in cmd else "weights" if "~/ckpt" in cmd else
                       "status" if "not running" in cmd else "stop" if "stopped pid" in cmd else "ssh")
    return out


def test_preempted_mid_run_recreates_and_resumes(tmp_path):
    # creation 1: queued, provisioned, active for two checks, then preempted; creation 2: active until done
    cloud = Cloud(tmp_path, [["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE", "SUSPENDING", "SUSPENDED"],
                             ["PROVISIONING", "ACTIVE"]])
    p = cloud.keep_running()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "retry 1 of 10" in p.stdout and "summary.json exists: done" in p.stdout
    verbs = [v for v in _verbs(cloud.calls()) if v not in ("qr-describe", "status")]
    # create, set up, run; preempted: delete, create again, reinstall, refetch the weights, resume
    assert verbs == ["qr-create", "scp", "install", "weights", "start",
                     "qr-delete", "qr-create", "scp", "install", "weights", "start"], verbs
    creates = [c for c in cloud.calls() if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
    assert all("--spot" in c and "--accelerator-type=v5litepod-8" in c for c in creates)
    runs = cloud.runs_()
    assert len(runs) == 2 and runs[0]["resumed"] == 0 and runs[1]["resumed"] == 2, runs   # it resumed
    # the same results as an uninterrupted run
    got = (cloud.gcs / "bucket" / "run" / "summary.json").read_text()
    ref = Cloud(tmp_path / "ref", [["ACTIVE"]])
    ref.state.write_text(json.dumps({**json.loads(ref.state.read_text()), "hold_after": None}))
    assert ref.keep_running().returncode == 0
    assert got == (ref.gcs / "bucket" / "run" / "summary.json").read_text()
    assert len(ref.runs_()) == 1 and "retry" not in ref.keep_running().stdout   # already done: no new round


def test_gives_up_cleanly_after_max_retries(tmp_path):
    cloud = Cloud(tmp_path, [["ACTIVE", "SUSPENDING", "SUSPENDED"]])   # every slice is preempted mid-run
    cloud.state.write_text(json.dumps({**json.loads(cloud.state.read_text()), "hold_after": 1, "hold_every": True}))
    p = cloud.keep_running("--max_retries", "2")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "giving up after 2 retries" in p.stderr and "delete_tpu.sh --name rhead --zone us-west4-a --queued" in p.stderr
    assert "Traceback" not in p.stderr
    verbs = _verbs(cloud.calls())
    assert verbs.count("qr-create") == 3 and verbs.count("qr-delete") == 2   # the first + 2 retries
    assert not (cloud.gcs / "bucket" / "run" / "summary.json").exists()
    assert [r["resumed"] for r in cloud.runs_()] == [0, 1, 1]   # each round resumed the batch made before


def test_refuses_a_local_workdir(tmp_path):
    cloud = Cloud(tmp_path, [["ACTIVE"]])
    p = cloud.keep_running(workdir="workdir/run")
    assert p.returncode == 2 and "give a gs:// workdir" in p.stderr and not cloud.log.exists()


# ------------------------------------------------------------------ the real sweep, preempted and resumed
REAL_PYTHON = r"""#!PYTHON
# The worker's venv python: pip and the device check succeed; `-m rhead_jax.sweep` is the real sweep
# (on CPU, one process: --distributed dropped; gs:// mapped to the fake bucket). On the first slice
# the run is cut off after its first finished batch, and waits for the preemption to kill it.
import json, os, subprocess, sys, time
from pathlib import Path

argv = sys.argv[1:]
if argv[:2] != ["-m", "rhead_jax.sweep"]:
    sys.exit(0)
gcs = os.environ["FAKE_GCS"]
args = [a.replace("gs://", gcs + "/") for a in argv if a != "--distributed"]
args = ["--config.model.path=" + os.path.expanduser(a.split("=", 1)[1]) if a.startswith("--config.model.path=") else a
        for a in args]
cmd = [os.environ["REAL_PYTHON"], *args]
env = {**os.environ, "JAX_PLATFORMS": "cpu"}
state = json.loads(Path(os.environ["FAKE_STATE"]).read_text())
if state["created"] != 1:
    os.execve(cmd[0], cmd, env)
child = subprocess.Popen(cmd, env=env)
wd = Path(gcs) / "bucket" / "run" / "batches"
while child.poll() is None and not list(wd.glob("batch_*.json")):
    time.sleep(0.02)
child.kill()
print("cut off after", sorted(p.name for p in wd.glob("batch_*.json")), flush=True)
time.sleep(600)
"""

TINY_CONFIG = """
from rhead_jax.config import default_config
def get_config():
    c = default_config()
    c.model.path, c.model.name = "unused", "tiny"
    c.sweep.lengths, c.sweep.depths = [300, 600], [0, 50, 100]
    c.sweep.batch_size, c.sweep.max_new_tokens = 3, 5
    c.sweep.prefill_chunk, c.sweep.q_chunk, c.sweep.k_chunk, c.sweep.pad_multiple = 128, 64, 64, 32
    return c
"""


@pytest.mark.slow  # three real sweeps of a tiny model (JAX start-up and compiles): minutes on a loaded machine
def test_real_sweep_preempted_resumes_to_the_same_results(tmp_path):
    from tests.helpers.tiny_smol import make_tiny_smol

    model = make_tiny_smol(tmp_path / "tiny-model")
    cfg = tmp_path / "tiny_sweep.py"
    cfg.write_text(TINY_CONFIG)
    cloud = Cloud(tmp_path / "cloud", [["ACTIVE", "ACTIVE", "SUSPENDING", "SUSPENDED"], ["PROVISIONING", "ACTIVE"]])
    cloud.state.write_text(json.dumps({**json.loads(cloud.state.read_text()), "hold_after": 1, "hold_wait_s": 600}))
    real = cloud.tmp / "fake_python"
    real.write_text(REAL_PYTHON.replace("#!PYTHON", "#!" + sys.executable, 1))
    cloud.env["REAL_PYTHON"] = sys.executable
    cmd = ["bash", str(SCRIPT), "--name", "rhead", "--zone", "z", "--config", str(cfg), "--workdir", "gs://bucket/run",
           "--poll", "0.5", "--weights_cmd", f"rm -rf ~/ckpt && cp -r {model} ~/ckpt", "--", "--config.model.path=~/ckpt"]
    p = subprocess.run(cmd, env=cloud.env, cwd=cloud.tmp, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "retry 1 of 10" in p.stdout and "summary.json exists: done" in p.stdout
    verbs = [v for v in _verbs(cloud.calls()) if v not in ("qr-describe", "status")]
    assert verbs.count("qr-create") == 2 and verbs.count("weights") == 2 and verbs.count("start") == 2
    run = cloud.gcs / "bucket" / "run"
    assert (run / "summary.json").exists()

    ref = tmp_path / "uninterrupted"
    r = subprocess.run([sys.executable, "-m", "rhead_jax.sweep", f"--config={cfg}", f"--workdir={ref}",
                        f"--config.model.path={model}"], cwd=ROOT, env={**cloud.env, "HOME": os.environ["HOME"],
                                                                       "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=1800)
    assert sweep_finished(r.returncode, r.stderr), r.stderr[-3000:]
    for name in ("head_scores.json", "results.jsonl"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
