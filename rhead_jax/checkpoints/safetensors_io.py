"""Lazy, torch-free safetensors reading: headers parsed once, tensors memory-mapped.

A `TensorStore` maps tensor names to memory-mapped numpy views across all shards of a HF
checkpoint, so a caller can read one tensor (or one slice of one, for sharded loading) without
touching the rest. bf16 comes through `ml_dtypes`, which numpy lacks natively.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from rhead_jax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(UserError):
    """A missing or malformed checkpoint file (a user error: the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:  # e.g. a git-lfs pointer or an HTML page: do not try to read n bytes
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file size {size}; not a safetensors file "
                    "(a git-lfs pointer or a truncated download?); re-download or re-convert it")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-convert it") from e
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} extends past the end of the file (truncated download?)")
        out[name] = TensorInfo(path, np.dtype(_DTYPES[meta["dtype"]]), tuple(meta["shape"]), 8 + n + begin)
    return out


class TensorStore:
    """All tensors of a checkpoint directory, by name, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = self._shard_files()
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            self.infos.update(read_header(f))

    def _shard_files(self) -> list[Path]:
        d = self.directory
        if not d.is_dir():
            raise CheckpointError(f"checkpoint directory {d} does not exist")
        index = d / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e}); it needs a 'weight_map'") from e
            files = sorted({d / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shard(s) {missing} that are not in {d}; download the missing files")
            return files
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no *.safetensors files in {d}; convert .bin/.pt checkpoints to safetensors first")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (slice it to read only part).

        Each call maps just this tensor's bytes; the mapping goes away with the last view, so a
        loader that copies out its slices keeps only those in memory (sharded loading).
        """
        if name not in self.infos:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        info = self.infos[name]
        count = int(np.prod(info.shape, dtype=np.int64))
        return np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=(count,)).reshape(info.shape)
