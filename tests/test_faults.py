"""Faults a pod sweep meets, injected into a tiny sweep (docs/reliability.md): torn or foreign
batch files, stale inputs, a preemption notice (SIGTERM), a full disk, an object store without
atomic rename. Each test checks that nothing is lost or silently wrong. The killed-host test of
two jax.distributed processes is tests/test_multihost_faults.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rhead_jax import detection, io, results_store
from rhead_jax.checkpoints import load_model
from rhead_jax.config import default_config, validate
from rhead_jax.errors import Preempted, UserError
from rhead_jax.needle.haystack import DEFAULT_HAYSTACK_PATH, DEFAULT_NEEDLES_PATH
from rhead_jax.results_store import ResultStore, decode_batch
from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
# 1 length x 3 depths x the 3 bundled needles = 9 tests in 5 batches of 2
GRID = dict(lengths=[300], depths=[0, 50, 100], batch_size=2, max_new_tokens=4, prefill_chunk=128,
            q_chunk=64, k_chunk=64, pad_multiple=32)
N_BATCHES = 5
OUTPUTS = ("head_scores.json", "results.jsonl", "summary.json")


def _make_model(directory, seed=0):
    return make_tiny_smol(directory, sharpen=False, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          seed=seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("faults_model") / "tiny-smol")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


def _config(model_dir, **top):
    c = default_config()
    c.model.path, c.model.name = str(model_dir), "tiny"
    for k, v in GRID.items():
        setattr(c.sweep, k, v)
    for k, v in top.items():
        setattr(c, k, v)
    return validate(c)


@pytest.fixture(scope="module")
def reference(tiny_dir, model, tmp_path_factory):
    """An uninterrupted sweep's workdir."""
    wd = tmp_path_factory.mktemp("faults_ref")
    detection.run_sweep(_config(tiny_dir), str(wd), model=model)
    return wd


def _batch(b: int) -> str:
    return f"batch_{b:05d}.json"


def _assert_same_outputs(wd, ref) -> None:
    for name in OUTPUTS:
        assert (Path(wd) / name).read_bytes() == (Path(ref) / name).read_bytes(), name


def _assert_clean_batches(wd, upto=N_BATCHES) -> list[str]:
    """Every batch file present is whole (decodes); no temporaries. Returns the names present."""
    d = Path(wd) / "batches"
    names = sorted(p.name for p in d.iterdir()) if d.exists() else []
    assert not [n for n in names if not n.startswith("batch_")], names   # no .tmp- leftovers
    for n in names:
        b = int(n[6:11])
        assert b < upto
        data = (d / n).read_bytes()
        assert json.loads(data.partition(b"\n")[0])["batch"] == b and decode_batch(
            data, b, json.loads(data.partition(b"\n")[0])["pin"]), n
    return names


# -- (3) torn, empty, corrupt or foreign batch files ----------------------------------------------


def test_torn_batch_files_are_reported_recomputed_and_never_merged(tiny_dir, model, reference, tmp_path, caplog):
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    for name in OUTPUTS:
        (wd / name).unlink()
    batches = wd / "batches"
    whole = {b: (batches / _batch(b)).read_bytes() for b in range(N_BATCHES)}
    (batches / _batch(1)).write_bytes(whole[1][:40])                       # a copy cut short
    (batches / _batch(2)).write_bytes(b"")                                 # an empty object
    i = len(whole[3]) - 30                                                 # one byte flipped in the results
    (batches / _batch(3)).write_bytes(whole[3][:i] + bytes([whole[3][i] ^ 1]) + whole[3][i + 1:])
    (batches / _batch(4)).write_bytes(whole[0])                            # another batch's file
    # a batch file of another sweep (other settings, same grid): whole, but not this workdir's
    other = tmp_path / "other"
    detection.run_sweep(_config(tiny_dir, compile_cache=False, needles=str(_copy(DEFAULT_NEEDLES_PATH, tmp_path))),
                        str(other), model=model)
    (batches / _batch(0)).write_bytes((other / "batches" / _batch(0)).read_bytes())
    with caplog.at_level(logging.WARNING):
        detection.run_sweep(_config(tiny_dir), str(wd), model=model)
    warned = [r.getMessage() for r in caplog.records if "recomputing batch" in r.getMessage()]
    assert len(warned) == 5, warned
    for b, why in ((0, "pin differs"), (1, "no batch header"), (2, "empty file"), (3, "checksum mismatch"),
                   (4, "holds batch 0, not 4")):
        line = next(m for m in warned if f"recomputing batch {b}" in m)
        assert str(batches / _batch(b)) in line and why in line and "\n" not in line, line
    # recomputed, not merged: the outputs and every batch file equal the uninterrupted run's
    _assert_same_outputs(wd, reference)
    assert {b: (batches / _batch(b)).read_bytes() for b in range(N_BATCHES)} == whole


def test_batch_checksum_catches_a_changed_result(tmp_path):
    store = ResultStore(str(tmp_path), '{"a": 1}')
    store.write(0, [{"score": 0.25}])
    path = tmp_path / "batches" / _batch(0)
    path.write_bytes(path.read_bytes().replace(b"0.25", b"0.75"))          # same length, other value
    assert not store.done(0)
    with pytest.raises(results_store.BatchFileError, match="checksum mismatch"):
        store.read(0)
    assert store.scan(1) == {}


# -- (4) stale inputs ---------------------------------------------------------------------------


def _copy(src, tmp_path) -> Path:
    dst = tmp_path / "inputs" / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def test_resume_after_inputs_changed_is_refused(model, tmp_path):
    own = _make_model(tmp_path / "model")                 # the checkpoint at config.model.path
    haystack, needles = _copy(DEFAULT_HAYSTACK_PATH, tmp_path), _copy(DEFAULT_NEEDLES_PATH, tmp_path)
    config = _config(own, haystack=str(haystack), needles=str(needles), compile_cache=False)
    loaded = load_model(str(own))
    wd = tmp_path / "wd"
    detection.run_sweep(config, str(wd), model=loaded)
    pinned = json.loads((wd / "sweep_config.json").read_text())["inputs"]
    assert set(pinned) == {"model", "haystack", "needles"} and "model.safetensors" in pinned["model"]
    detection.run_sweep(config, str(wd), model=loaded)    # unchanged inputs: resumes (nothing to run)

    def refused(what: str, file: str) -> None:
        with pytest.raises(UserError) as e:
            detection.run_sweep(config, str(wd), model=loaded)
        msg = str(e.value)
        assert f"{what} changed: {file} was " in msg and "\n" not in msg, msg

    saved = {p: p.read_bytes() for p in (needles, haystack, own / "model.safetensors")}
    _make_model(own, seed=1)                              # other weights, same shapes, same path
    refused("model", "model.safetensors")
    (own / "model.safetensors").write_bytes(saved[own / "model.safetensors"])
    needles.write_text(needles.read_text().replace("green bicycle", "red bicycle"))   # a needle edited in place
    refused("needles", needles.name)
    needles.write_bytes(saved[needles])
    with haystack.open("a") as f:
        f.write("\nOne more line.\n")
    refused("haystack", haystack.name)
    haystack.write_bytes(saved[haystack])
    detection.run_sweep(config, str(wd), model=loaded)    # the inputs restored: accepted again


def test_large_files_are_fingerprinted_by_samples(tmp_path):
    """Over FULL_HASH_BYTES a file is hashed over sampled blocks (+ a safetensors header): a copy
    has the same fingerprint; other bytes in a sampled block, or another length, change it."""
    import numpy as np

    size = results_store.FULL_HASH_BYTES + 12345
    data = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data)
    b.write_bytes(data)
    fa = results_store.file_fingerprint(a)
    assert fa.endswith(" sampled") and fa.startswith(f"{size} bytes") and results_store.file_fingerprint(b) == fa
    mid = (size - results_store.BLOCK) * 31 // (results_store.SAMPLES - 1) + 7   # inside the 32nd block
    b.write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1:])
    assert results_store.file_fingerprint(b) != fa
    b.write_bytes(data[:-1])
    assert results_store.file_fingerprint(b) != fa


# -- (2) preemption notice (SIGTERM) -------------------------------------------------------------


def test_sigterm_during_a_write_keeps_that_batch_then_stops(tmp_path, monkeypatch):
    """The notice lands while a batch file is being written: that file completes, then Preempted."""
    store = ResultStore(str(tmp_path), '{"a": 1}')
    real, before = io.atomic_write_bytes, signal.getsignal(signal.SIGTERM)

    def write_with_notice(path, data):
        os.kill(os.getpid(), signal.SIGTERM)   # delivered here, mid-write
        time.sleep(0.01)
        real(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", write_with_notice)
    with pytest.raises(Preempted, match="SIGTERM"):
        with results_store.preemption_notice(store, "sweep tiny"):
            store.write(0, [{"x": 1}])
            store.write(1, [{"x": 2}])             # never reached
    assert store.read(0) == [{"x": 1}] and not store.done(1)
    assert signal.getsignal(signal.SIGTERM) is before   # the handler is removed again


def _config_file(tmp_path, model_dir) -> Path:
    f = tmp_path / "tiny_faults.py"
    f.write_text(f"""
from rhead_jax.config import default_config
def get_config():
    c = default_config()
    c.model.path, c.model.name = {str(model_dir)!r}, "tiny"
    for k, v in {GRID!r}.items():
        setattr(c.sweep, k, v)
    return c
""")
    return f


def _sweep(cfg_file, wd, **kw):
    return subprocess.Popen([sys.executable, "-m", "rhead_jax.sweep", f"--config={cfg_file}", f"--workdir={wd}"],
                            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _resume(tiny_dir, model, wd, done: int, caplog) -> None:
    """The same configuration again, in this process (the command's own path is tested above)."""
    with caplog.at_level(logging.INFO, logger="absl"):
        detection.run_sweep(_config(tiny_dir), str(wd), model=model)
    seen = [r.getMessage() for r in caplog.records]
    assert any(f"{N_BATCHES - done} to run ({done} already done)" in m for m in seen), seen


def _wait_for(path: Path, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the sweep wrote no batch before the deadline"


def test_sigterm_stops_the_sweep_which_then_resumes(tiny_dir, model, reference, tmp_path, caplog):
    cfg = _config_file(tmp_path, tiny_dir)
    wd = tmp_path / "wd"
    proc = _sweep(cfg, wd)
    _wait_for(wd / "batches" / _batch(0), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("preempted: ")], err[-2000:]
    assert "Traceback" not in err and not (wd / "head_scores.json").exists()
    done = _assert_clean_batches(wd)
    assert 1 <= len(done) < N_BATCHES
    _resume(tiny_dir, model, wd, len(done), caplog)
    _assert_same_outputs(wd, reference)
    _assert_clean_batches(wd)


# -- (5) full disk -------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (root and mount(2) needed; skipped, saying why, where it cannot be mounted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root and mount(2)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_ends_with_one_error_line_and_resumes(tiny_dir, model, reference, tmp_path, tiny_fs, caplog):
    batch_bytes = max(p.stat().st_size for p in (reference / "batches").iterdir())
    filler = tiny_fs / "filler"
    # leave room for sweep_config.json and about two batch files (tmpfs counts whole 4 KiB pages)
    room = 4096 * (2 + 2 * -(-batch_bytes // 4096)) + 2048
    free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
    filler.write_bytes(b"\0" * (free - room))
    cfg = _config_file(tmp_path, tiny_dir)
    wd = tiny_fs / "wd"
    out = _sweep(cfg, wd)
    _, err = out.communicate(timeout=600)
    assert out.returncode == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no space left to write" in errors[0] and str(wd) in errors[0], err[-3000:]
    assert "Traceback" not in err
    done = _assert_clean_batches(wd)               # the batches written are whole; no partial file
    assert len(done) < N_BATCHES and not (wd / "head_scores.json").exists()
    filler.unlink()                                # space freed: the same configuration resumes
    _resume(tiny_dir, model, wd, len(done), caplog)
    _assert_same_outputs(wd, reference)
    _assert_clean_batches(wd)


# -- (6) an object store (fsspec's memory filesystem standing in for gs://) ---------------------


class _Faults:
    """What the fake bucket does wrong: crash an upload half-way (leaving the half visible, as a
    streamed fsspec upload can), store a short object silently, or crash a copy (a rename) half-way."""

    def __init__(self):
        self.crash_upload: str | None = None     # name of the object whose next upload crashes
        self.short_upload: str | None = None     # ... whose next upload is silently cut short
        self.renames = 0


@pytest.fixture
def bucket(monkeypatch):
    """gs:// through etils.epath's fsspec backend, with gcsfs replaced by an in-memory filesystem."""
    from etils.epath import backend as epath_backend, gpath
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    faults = _Faults()

    class HalfFile(MemoryFile):
        def __init__(self, *a, crash: bool, **kw):
            super().__init__(*a, **kw)
            self.crash = crash

        def write(self, data):
            n = super().write(data[:len(data) // 2])
            if self.crash:
                raise ConnectionResetError(f"upload of {self.path} interrupted")   # an OSError
            return n

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]

        @classmethod
        def _strip_protocol(cls, path):
            return "/" + str(path).removeprefix("gs://").strip("/")

        def _open(self, path, mode="rb", **kw):
            path = self._strip_protocol(path)
            name = path.rsplit("/", 1)[-1]
            if "w" in mode and name in (faults.crash_upload, faults.short_upload):
                crash = name == faults.crash_upload
                faults.crash_upload = faults.short_upload = None
                f = HalfFile(self, path, crash=crash)
                f.commit()                      # visible from the start, like the memory filesystem's own
                return f
            return super()._open(path, mode, **kw)

        def cp_file(self, path1, path2, **kw):  # a rename is a copy and a delete: here it crashes half-way
            faults.renames += 1
            data = self.cat_file(path1)
            self.pipe_file(path2, data[:len(data) // 2])
            raise ConnectionResetError(f"copy {path1} -> {path2} interrupted")

    fs = FakeGCS()
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", lambda self, path: fs)
    yield fs, faults
    FakeGCS.store.clear()


def test_object_store_writes_whole_objects_and_resumes(tiny_dir, model, reference, bucket, caplog):
    fs, faults = bucket
    wd = "gs://bucket/sweep"
    faults.crash_upload = _batch(2)                          # the third batch's upload dies half-way
    with pytest.raises(OSError, match="interrupted"):
        detection.run_sweep(_config(tiny_dir), wd, model=model)
    assert fs.cat_file(f"{wd}/batches/{_batch(2)}") != b""   # a torn object is left behind (fsspec)
    assert not fs.exists(f"{wd}/head_scores.json")
    with caplog.at_level(logging.WARNING):
        detection.run_sweep(_config(tiny_dir), wd, model=model)   # resume: the torn object is redone
    assert any(f"{wd}/batches/{_batch(2)}" in r.getMessage() and "recomputing batch 2" in r.getMessage()
               for r in caplog.records)
    faults.short_upload = "head_scores.json"                 # an upload cut short without an error
    with pytest.raises(OSError, match="differs from the"):   # write-then-verify: not silent
        detection.run_sweep(_config(tiny_dir), wd, model=model)
    assert not fs.exists(f"{wd}/head_scores.json")           # the short object was removed
    detection.run_sweep(_config(tiny_dir), wd, model=model)
    for name in OUTPUTS:
        assert fs.cat_file(f"{wd}/{name}") == (reference / name).read_bytes(), name
    for b in range(N_BATCHES):
        assert fs.cat_file(f"{wd}/batches/{_batch(b)}") == (reference / "batches" / _batch(b)).read_bytes()
    assert faults.renames == 0 and not [p for p in fs.find(wd) if ".tmp-" in p]   # no rename, no temporaries


def test_a_workdir_without_pinned_inputs_is_refused(tmp_path):
    """A workdir of the format before input fingerprints: its batch files cannot be validated."""
    (tmp_path / "sweep_config.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="earlier rhead_jax"):
        ResultStore(str(tmp_path), '{"a": 1}')


def test_a_knob_added_since_at_its_default_keeps_the_workdir(tmp_path):
    """A workdir pinned before a config key existed resumes when this run holds the key's schema
    default (the behaviour it was computed with); any other change is refused, naming the keys."""
    from rhead_jax.errors import UserError
    from rhead_jax.results_store import ResultStore, config_changes

    old = {"sweep": {"lengths": [500], "max_new_tokens": 50}, "run": "none"}
    store = ResultStore(str(tmp_path), json.dumps(old))
    store.write(0, [{"key": "t0", "score": 1.0}])
    newer = {"sweep": {**old["sweep"], "batch_kv_mib": 0, "save_captures": False}, "run": "none"}
    assert config_changes(old, newer) == []
    resumed = ResultStore(str(tmp_path), json.dumps(newer))
    assert resumed.scan(1) == {0: [{"key": "t0", "score": 1.0}]}          # its batch is read back, not redone
    changed = {"sweep": {**newer["sweep"], "batch_kv_mib": 300}, "run": "none"}
    assert config_changes(old, changed) == ["sweep.batch_kv_mib"]
    with pytest.raises(UserError, match=r"changed: sweep\.batch_kv_mib\)"):
        ResultStore(str(tmp_path), json.dumps(changed))
    with pytest.raises(UserError, match=r"changed: run, sweep\.max_new_tokens\)"):
        ResultStore(str(tmp_path), json.dumps({"sweep": {**old["sweep"], "max_new_tokens": 20}, "run": "top5"}))
    assert config_changes(old, {"sweep": {"lengths": [500]}, "run": "none"}) == ["sweep.max_new_tokens"]  # removed
