"""launch/gke/make_jobset.py, offline: the JobSet manifest parses as YAML, carries the fields the
JobSet v1alpha2 API requires with the right types, and its pod count, TPU requests and node-pool
topology agree with rhead_jax.dryrun.topology, for every TPU family (TPU7x and v6e included), one
slice or several."""
from __future__ import annotations

import importlib.util
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rhead_jax.dryrun.topology import FAMILIES, family_slices, parse_topology
from rhead_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "gke" / "make_jobset.py"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _module():
    spec = importlib.util.spec_from_file_location("make_jobset", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


gke = _module()


def _render(**kw) -> dict:
    """Through YAML and back, as kubectl would read it."""
    text = yaml.safe_dump(gke.jobset(**{"name": "rhead", "config": "yi34b.py", "workdir": "gs://b/run", **kw}))
    return yaml.safe_load(text)


def _check_jobset(m: dict) -> dict:
    """The fields the JobSet API (jobset.x-k8s.io/v1alpha2) and the Job/Pod specs inside it require, typed."""
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert isinstance(m["metadata"]["name"], str) and DNS_LABEL.match(m["metadata"]["name"])
    spec = m["spec"]
    assert isinstance(spec["failurePolicy"]["maxRestarts"], int) and spec["failurePolicy"]["maxRestarts"] >= 0
    [rj] = spec["replicatedJobs"]
    assert isinstance(rj["name"], str) and DNS_LABEL.match(rj["name"]) and isinstance(rj["replicas"], int)
    job = rj["template"]["spec"]
    for key in ("parallelism", "completions", "backoffLimit"):
        assert isinstance(job[key], int), key
    assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")   # a Job's pods may not restart Always
    [c] = pod["containers"]
    assert isinstance(c["name"], str) and isinstance(c["image"], str) and c["image"]
    assert all(isinstance(a, str) for a in c["command"])
    assert all(isinstance(p["containerPort"], int) for p in c["ports"])
    for e in c.get("env", []):
        assert isinstance(e["name"], str) and (isinstance(e.get("value"), str) or "valueFrom" in e)
    assert all(isinstance(v, str) for v in pod["nodeSelector"].values())   # label values are strings
    return {"replicas": rj["replicas"], "pods": job["parallelism"], "pod": pod, "container": c}


ALL_SLICES = [t.name for fam in FAMILIES for t in family_slices(fam)]


@pytest.mark.parametrize("name", ALL_SLICES)
def test_every_slice_agrees_with_the_topology_table(name):
    t = parse_topology(name)
    per = FAMILIES[t.family].get("devices_per_chip", 1)
    if t.grid is None:   # no standard chip grid (v5p-12288): refused, not guessed
        with pytest.raises(UserError, match="no standard GKE topology"):
            _render(topology=name)
        return
    m = _check_jobset(_render(topology=name))
    sel = m["pod"]["nodeSelector"]
    grid = [int(x) for x in sel["cloud.google.com/gke-tpu-topology"].split("x")]
    assert math.prod(grid) == t.physical_chips and len(grid) == FAMILIES[t.family]["dims"]
    assert m["replicas"] == 1 and m["pods"] == t.hosts                 # one pod per TPU host
    chips = m["container"]["resources"]["limits"]["google.com/tpu"]
    assert isinstance(chips, int) and m["pods"] * chips == t.physical_chips and m["pods"] * chips * per == t.chips
    g = gke.gke_topology(t)
    assert g["machine_type"].endswith(f"-{chips}t")


def test_tpu7x_and_v6e_labels():
    m = _check_jobset(_render(topology="tpu7x-16"))   # 8 chips, 2 hosts of 4, 16 JAX devices
    assert m["pod"]["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu7x",
                                        "cloud.google.com/gke-tpu-topology": "2x2x2"}
    assert m["pods"] == 2 and m["container"]["resources"]["limits"]["google.com/tpu"] == 4
    assert gke.gke_topology(parse_topology("tpu7x-16"))["machine_type"] == "tpu7x-standard-4t"
    m = _check_jobset(_render(topology="v6e-8"))       # one host of 8 chips
    assert m["pod"]["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v6e-slice"
    assert m["pods"] == 1 and gke.gke_topology(parse_topology("v6e-8"))["machine_type"] == "ct6e-standard-8t"
    assert gke.gke_topology(parse_topology("v5e-16"))["accelerator"] == "tpu-v5-lite-podslice"


def test_multislice_distributed_env_and_restarts():
    raw = _render(topology="v6e-16", num_slices=3, spot=True, max_restarts=5, service_account="rhead-ksa",
                  extra=["--config.model.path=/ckpt/yi"])
    m = _check_jobset(raw)
    assert m["replicas"] == 3 and m["pods"] == 4 and raw["spec"]["failurePolicy"]["maxRestarts"] == 5
    assert raw["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    env = {e["name"]: e for e in m["container"]["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "rhead-slice-0-0.rhead:8080"   # pod 0 of slice 0
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert env["MEGASCALE_NUM_SLICES"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-replicas']"
    assert m["pod"]["nodeSelector"]["cloud.google.com/gke-spot"] == "true" and m["pod"]["tolerations"]
    assert m["pod"]["serviceAccountName"] == "rhead-ksa"
    cmd = m["container"]["command"][-1]
    run = shlex.split(cmd.split("; ")[-1])
    assert run == ["python", "-m", "rhead_jax.sweep", "--config=yi34b.py", "--workdir=gs://b/run", "--distributed",
                   "--config.model.path=/ckpt/yi"]
    one = _check_jobset(_render(topology="v6e-16"))
    assert "env" not in one["container"]   # one slice: GKE's TPU_WORKER_* are all jax.distributed needs


def test_install_and_weights_steps_run_before_the_module():
    m = _check_jobset(_render(topology="tpu7x-8", repo="https://github.com/org/rhead_jax", ref="v1",
                              weights_cmd="gcloud storage cp -r gs://b/ckpt /ckpt", module="rhead_jax.ablate"))
    steps = m["container"]["command"][-1].split("; ")
    assert steps[0] == "set -e" and "git+https://github.com/org/rhead_jax@v1" in steps[1]
    assert steps[3] == "gcloud storage cp -r gs://b/ckpt /ckpt" and steps[4].startswith("python -m rhead_jax.ablate ")


def test_refusals():
    with pytest.raises(UserError, match="gs://"):
        gke.jobset(name="r", topology="v6e-8", config="c.py", workdir="workdir/x")
    with pytest.raises(UserError, match="single-host"):
        gke.jobset(name="r", topology="v6e-8", config="c.py", workdir="gs://b/x", num_slices=2)
    with pytest.raises(UserError, match="unknown TPU topology"):
        gke.jobset(name="r", topology="tpu7x-7", config="c.py", workdir="gs://b/x")


def test_xpk_command():
    cmd = gke.xpk_command(name="yi", cluster="c1", topology="tpu7x-16", config="yi34b.py", workdir="gs://b/yi",
                          num_slices=2, spot=True)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=yi", "--tpu-type=tpu7x-16", "--num-slices=2", "--max-restarts=3",
            "--restart-on-user-code-failure", "--spot"} <= set(cmd)
    [command] = [a for a in cmd if a.startswith("--command=")]
    assert "--distributed" in command and "--workdir=gs://b/yi" in command


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--name", "yi", "--topology", "v5p-32", "--config", "yi34b.py",
                          "--workdir", "gs://b/yi", "--", "--config.sweep.batch_size=8"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# 1 x v5p-32: node pool(s) of machine type ct5p-hightpu-4t, topology 2x2x4")
    m = _check_jobset(yaml.safe_load(out.stdout))
    assert "--config.sweep.batch_size=8" in m["container"]["command"][-1]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--name", "yi", "--topology", "v9-8", "--config", "c",
                          "--workdir", "gs://b/x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown TPU topology 'v9-8'")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, str(SCRIPT), "--name", "yi"], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
