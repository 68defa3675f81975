"""The result store of every command that runs batches (sweep, ablation, mixed KV cache): one file
per batch, written atomically (rhead_jax.io), validated when read, pinned to its configuration and
to the content of its inputs, and a preemption notice (SIGTERM) that stops a run between writes.

    store = ResultStore(root, pinned_json, inputs=input_fingerprints({"model": model_dir, ...}))
    results = store.scan(n)          # {b: results} of the valid batch files; torn ones logged, redone
    store.write(b, results)          # root/batches/batch_00003.json, whole or absent
    with preemption_notice(store):   # SIGTERM: the write under way completes, then `Preempted`
        ...

Files (docs/reliability.md):
  root/sweep_config.json   {"config": <pinned_json>, "inputs": {name: {file: fingerprint}}}; a resume
                           with another config is refused, one with changed inputs too (naming it)
  root/batches/batch_NNNNN.json   line 1: a header {"format", "batch", "pin", "bytes", "sha256"};
                           then the results as JSON. A file whose header, length or checksum does
                           not match (torn copy, empty file, another sweep's file) is reported in
                           one log line naming it and recomputed, never merged.
  root/batches/batch_NNNNN.npz    (a store made with `arrays=KIND`: the sweep's captures,
                           config.sweep.save_captures) numpy arrays beside the batch's results, in
                           one compressed npz whose `__header__` entry holds a header like the results' (plus
                           the store's `arrays` kind, e.g. "captures top_k=4", and a sha256 over
                           every array's name, dtype, shape and bytes). Another kind is redone. Written before
                           the results file; a batch is done only when both are whole, so a kill
                           between the two, a torn npz or a missing one redoes the batch.

Input fingerprints: every file of the input (a directory's non-hidden top-level files) by size and
sha256; a file over FULL_HASH_BYTES is hashed over SAMPLES evenly spaced blocks of BLOCK bytes
(first and last included) and, for .safetensors, its whole header: a few MiB read per checkpoint
file, so it is cheap on a 70 GB checkpoint, and any other weights (another model, a fine-tune,
another dtype or shape) change it. An edit confined to unsampled bytes of a large file is not seen.
"""
from __future__ import annotations

import contextlib
import hashlib
import io as _bytes_io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from absl import logging

from rhead_jax import io
from rhead_jax.errors import Preempted, UserError

__all__ = ["ARRAYS_FORMAT", "BATCH_FORMAT", "BatchFileError", "ResultStore", "decode_arrays", "encode_arrays",
           "input_fingerprints", "preemption_notice"]

BATCH_FORMAT = "rhead_jax.batch/1"
ARRAYS_FORMAT = "rhead_jax.batch-arrays/1"
FULL_HASH_BYTES = 16 << 20   # files up to this size are hashed whole
SAMPLES, BLOCK = 64, 1 << 16  # larger ones: 64 blocks of 64 KiB (4 MiB read) + a safetensors header
IGNORED_INPUT_FILES = ("rhead_jax_gguf_import.json",)  # conversion provenance (absolute source path)


class BatchFileError(ValueError):
    """A batch file that is not a whole result file of this store (why: the message)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_batch(b: int, results: list[dict], pin: str) -> bytes:
    """Header line + the results' JSON: what a batch file holds."""
    payload = json.dumps(results).encode()
    header = {"format": BATCH_FORMAT, "batch": b, "pin": pin, "bytes": len(payload), "sha256": _sha256(payload)}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode_batch(data: bytes, b: int, pin: str) -> list[dict]:
    """The results of a batch file's bytes; BatchFileError says why they are not a whole batch `b`."""
    if not data:
        raise BatchFileError("empty file")
    head, sep, payload = data.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        header = None
    if not sep or not isinstance(header, dict) or header.get("format") != BATCH_FORMAT:
        raise BatchFileError("no batch header (a torn, foreign or pre-checksum file)")
    if header.get("batch") != b:
        raise BatchFileError(f"holds batch {header.get('batch')}, not {b}")
    if header.get("pin") != pin:
        raise BatchFileError("written by another configuration or other inputs (its pin differs)")
    if len(payload) != header.get("bytes"):
        raise BatchFileError(f"truncated or padded: {len(payload)} result bytes, the header says {header.get('bytes')}")
    if _sha256(payload) != header.get("sha256"):
        raise BatchFileError("checksum mismatch (corrupted results)")
    return json.loads(payload)


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_arrays(b: int, arrays: Mapping[str, np.ndarray], pin: str, kind: str) -> bytes:
    """A compressed npz of `arrays` (no object arrays) plus a `__header__` entry: what a batch's
    arrays file holds."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if "__header__" in arrays or any(a.dtype == object for a in arrays.values()):
        raise ValueError("batch arrays: no '__header__' name and no object arrays")
    header = {"format": ARRAYS_FORMAT, "batch": b, "pin": pin, "kind": kind, "sha256": _arrays_digest(arrays)}
    buf = _bytes_io.BytesIO()
    np.savez_compressed(buf, __header__=np.array(json.dumps(header, sort_keys=True)), **arrays)
    return buf.getvalue()


def decode_arrays(data: bytes, b: int, pin: str, kind: str | None) -> dict[str, np.ndarray]:
    """The arrays of a batch arrays file's bytes; BatchFileError says why they are not batch `b`'s
    (of `kind`; None: any)."""
    if not data:
        raise BatchFileError("empty file")
    try:
        with np.load(_bytes_io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(str(arrays.pop("__header__")))
    except Exception as e:   # a torn zip, a CRC error, no header: never merged
        raise BatchFileError(f"not a whole arrays file ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != ARRAYS_FORMAT:
        raise BatchFileError("no arrays header (a foreign file)")
    if header.get("batch") != b:
        raise BatchFileError(f"holds batch {header.get('batch')}, not {b}")
    if header.get("pin") != pin:
        raise BatchFileError("written by another configuration or other inputs (its pin differs)")
    if kind is not None and header.get("kind") != kind:
        raise BatchFileError(f"holds {header.get('kind')!r} arrays, this run writes {kind!r}")
    if _arrays_digest(arrays) != header.get("sha256"):
        raise BatchFileError("checksum mismatch (corrupted arrays)")
    return arrays


# -- input fingerprints ----------------------------------------------------------------------------


def file_fingerprint(path: Path) -> str:
    """"<size> bytes sha256:<hex>" of the whole file, or "... sampled" over SAMPLES blocks (+ a
    safetensors header) for a file over FULL_HASH_BYTES."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
            return f"{size} bytes sha256:{h.hexdigest()}"
        if path.suffix == ".safetensors":   # u64 header length + the JSON header (names, dtypes, shapes)
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, size - 8)))
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // (SAMPLES - 1))
            h.update(f.read(BLOCK))
    return f"{size} bytes sha256:{h.hexdigest()} sampled"


def input_fingerprints(inputs: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
    """{name: {file name: file_fingerprint}} of each input path (a file, or a directory's
    non-hidden top-level files but IGNORED_INPUT_FILES)."""
    out = {}
    for name, p in inputs.items():
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.name not in IGNORED_INPUT_FILES)
        else:
            files = [p]
        out[name] = {f.name: file_fingerprint(f) for f in files}
    return out


_MISSING = object()


def _schema_default(defaults, section: str, key: str):
    """`defaults` (config.default_config())'s value of `section.key` as the pinned JSON holds it, or _MISSING."""
    sec = defaults.get(section)
    if sec is None or not hasattr(sec, "get") or key not in sec:
        return _MISSING
    value = sec.get(key)
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def config_changes(have: dict, want: dict) -> list[str]:
    """The dotted keys whose pinned values differ between a workdir's pin (`have`) and this run's
    (`want`). A key the workdir's pin lacks is no change when this run holds the schema's default
    for it: a knob added to rhead_jax since, left at the behaviour the workdir was computed with."""
    from rhead_jax.config import default_config

    defaults = default_config()
    out = []
    for section in sorted(set(have) | set(want)):
        a, b = have.get(section, _MISSING), want.get(section, _MISSING)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            if a != b:
                out.append(section)
            continue
        for key in sorted(set(a) | set(b)):
            if key not in a and b[key] == _schema_default(defaults, section, key):
                continue
            if a.get(key, _MISSING) != b.get(key, _MISSING):
                out.append(f"{section}.{key}")
    return out


def _changed(old: dict, new: dict) -> str:
    """One phrase naming what differs between two {name: {file: fingerprint}}."""
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, {}), new.get(name, {})
        for f in sorted(set(a) | set(b)):
            if a.get(f) != b.get(f):
                return f"{name} changed: {f} was {a.get(f, 'absent')}, is now {b.get(f, 'absent')}"
    return "no change"


# -- the store -------------------------------------------------------------------------------------


class ResultStore:
    """Per-batch result files in `root/batches/`, written atomically and checksummed; what the results
    depend on (`pinned_json`, and `inputs`: input_fingerprints of the files they were computed from)
    is pinned in `root/sweep_config.json`, so a resume with other settings or other inputs is refused.
    `writer`: whether this process writes (process 0 of several hosts). `arrays`: the kind of arrays
    file every batch also has (`write_arrays`; e.g. "captures top_k=4"), a batch without a whole
    one of that kind is not done; "" = none."""

    def __init__(self, root: str, pinned_json: str, *, inputs: dict | None = None, writer: bool = True,
                 arrays: str = ""):
        self.root = io.as_path(root)
        self.writer = writer
        self.arrays = arrays
        self._writing = False
        self._pending: Preempted | None = None
        want = {"config": json.loads(pinned_json), "inputs": inputs or {}}
        text = json.dumps(want, sort_keys=True, indent=1)
        self.pin = _sha256(text.encode())[:16]
        meta = self.root / "sweep_config.json"
        if meta.exists():
            try:
                have = json.loads(meta.read_text())
            except ValueError:
                have = None
            if not isinstance(have, dict) or set(have) != {"config", "inputs"}:
                raise UserError(
                    f"workdir {root} was written by an earlier rhead_jax or another program ({meta} does not "
                    "pin a config and its inputs); use a new --workdir, or delete that one to start over")
            if have["config"] != want["config"]:
                changed = config_changes(have["config"], want["config"])
                if changed:
                    raise UserError(
                        f"workdir {root} holds results of a different configuration ({meta}; changed: "
                        f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); use a new "
                        "--workdir, or delete that one to start over")
                # only knobs added since, at their defaults: the workdir's pin stands (its batch files carry it)
                want = dict(want, config=have["config"])
                text = json.dumps(want, sort_keys=True, indent=1)
                self.pin = _sha256(text.encode())[:16]
            if have["inputs"] != want["inputs"]:
                raise UserError(
                    f"workdir {root} holds results computed from other inputs ({_changed(have['inputs'], want['inputs'])}); "
                    "restore the inputs it was started with, or use a new --workdir")
        elif writer:
            io.atomic_write_text(meta, text)
        if writer:
            self._remove_stale_temporaries()

    @classmethod
    def reader(cls, root: str) -> "ResultStore":
        """A read-only store of an existing workdir, pinned to what its sweep_config.json holds (no
        inputs needed): read(b) and read_arrays(b) validate each file against it; arrays of any kind."""
        store = cls.__new__(cls)
        store.root, store.writer, store.arrays = io.as_path(root), False, None
        store._writing, store._pending = False, None
        have = json.loads((store.root / "sweep_config.json").read_text())
        store.pin = _sha256(json.dumps(have, sort_keys=True, indent=1).encode())[:16]
        return store

    def _batch_path(self, b: int):
        return self.root / "batches" / f"batch_{b:05d}.json"

    def arrays_path(self, b: int):
        return self.root / "batches" / f"batch_{b:05d}.npz"

    def _remove_stale_temporaries(self) -> None:
        """Temporary siblings a killed writer left (io.atomic_write_bytes names them .NAME.tmp-*)."""
        d = self.root / "batches"
        if d.exists():
            for p in d.iterdir():
                if p.name.startswith(".batch_") and ".tmp-" in p.name:
                    p.unlink(missing_ok=True)

    def done(self, b: int) -> bool:
        """Whether batch `b` has a whole file, and a whole arrays file with `arrays` (a torn one
        reads as not done; `scan` reports it)."""
        if not self._batch_path(b).exists():
            return False
        try:
            self.read(b)
            if self.arrays:
                self.read_arrays(b)
        except BatchFileError:
            return False
        return True

    def read(self, b: int) -> list[dict]:
        """Batch `b`'s results; BatchFileError (naming the file) when its file is not a whole batch."""
        path = self._batch_path(b)
        try:
            return decode_batch(path.read_bytes(), b, self.pin)
        except BatchFileError as e:
            raise BatchFileError(f"{path}: {e}") from None

    def scan(self, n: int) -> dict[int, list[dict]]:
        """{b: results} of the batches among range(n) whose files are whole; each file that is not
        is logged in one line naming it, and left to be recomputed (overwritten)."""
        out = {}
        for b in range(n):
            if not self._batch_path(b).exists():
                continue
            try:
                results = self.read(b)
                if self.arrays:
                    self.read_arrays(b)
            except BatchFileError as e:
                logging.warning("%s; recomputing batch %d", e, b)
                continue
            out[b] = results
        return out

    def read_arrays(self, b: int) -> dict[str, np.ndarray]:
        """Batch `b`'s arrays; BatchFileError (naming the file) when its arrays file is absent or not whole."""
        path = self.arrays_path(b)
        if not path.exists():
            raise BatchFileError(f"{path}: absent (a batch run without its arrays, e.g. before "
                                 "config.sweep.save_captures was set)")
        try:
            return decode_arrays(path.read_bytes(), b, self.pin, self.arrays)
        except BatchFileError as e:
            raise BatchFileError(f"{path}: {e}") from None

    def write_arrays(self, b: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Batch `b`'s arrays file, whole or absent (call it before `write(b, ...)`)."""
        if not self.writer:
            return
        self._writing = True
        try:
            io.atomic_write_bytes(self.arrays_path(b), encode_arrays(b, arrays, self.pin, self.arrays))
        finally:
            self._writing = False
        if self._pending is not None:
            raise self._pending

    def write(self, b: int, results: list[dict]) -> None:
        """Batch `b`'s file, whole or absent; a preemption notice meanwhile takes effect after it."""
        if not self.writer:
            return
        self._writing = True
        try:
            io.atomic_write_bytes(self._batch_path(b), encode_batch(b, results, self.pin))
        finally:
            self._writing = False
        if self._pending is not None:
            raise self._pending


@contextlib.contextmanager
def preemption_notice(store: ResultStore, what: str) -> Iterator[None]:
    """SIGTERM (a TPU VM's preemption notice) inside this block raises `Preempted` naming `what`:
    at once, or after the store's write under way completes. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        e = Preempted(f"{what} received SIGTERM (preemption); the batches written so far are kept in "
                      f"{store.root}: run the same command again to resume")
        if store._writing:
            store._pending = e
        else:
            raise e

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        store._pending = None
