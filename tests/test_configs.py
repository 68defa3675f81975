"""Every shipped config loads, validates and names a paper grid or the small default grid."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rhead_jax.needle.grid import paper_depths, paper_lengths
from rhead_jax.config import validate

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = validate(module.get_config())
    if path.stem == "smollm2_135m":
        assert list(c.sweep.lengths) == [500, 1000, 2000] and list(c.sweep.depths) == [0, 50, 100]
    elif path.stem == "gemma3_270m":  # 1K..32K doubling, to the model's 32,768 positions (max_new_tokens 50)
        assert list(c.sweep.lengths) == [1000 * 2**i for i in range(5)] + [32000] and list(c.sweep.depths) == [0, 50, 100]
        assert c.model.path == "gemma3-270m" and not c.model.chat
    elif path.stem.startswith("gemma2_"):  # 8K models: the paper lengths that fit
        assert list(c.sweep.lengths) == [n for n in paper_lengths() if n <= 8142] and list(c.sweep.depths) == paper_depths()
    elif path.stem.startswith(("mistral", "mixtral", "qwen", "gemma3_1b")):  # 32K models: the paper lengths that fit
        assert list(c.sweep.lengths) == [n for n in paper_lengths() if n <= 32718] and len(c.sweep.lengths) == 13
        assert list(c.sweep.depths) == paper_depths()
    else:
        assert list(c.sweep.lengths) == paper_lengths() and list(c.sweep.depths) == paper_depths()


def test_all_paper_models_have_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"llama2_7b_80k", "llama2_13b_64k", "mistral_7b_v02", "mistral_7b_instruct_v02", "mixtral_8x7b",
            "yi_6b_200k", "yi34b", "qwen15_14b", "qwen15_14b_chat", "smollm2_135m"} <= names


def test_gemma_configs_have_presets():
    """Each Gemma config names a preset, which loads (local and global layers) without weights."""
    from rhead_jax.presets import CONFIG_PRESETS, preset_config

    gemmas = [p.stem for p in CONFIGS if p.stem in ("gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma3_1b", "gemma3_4b",
                                                     "gemma3_12b", "gemma3_27b")]
    assert len(gemmas) == 7
    for stem in gemmas:
        cfg = preset_config(CONFIG_PRESETS[stem])
        local = sum(w is not None for w in cfg.windows)
        assert 0 < local < cfg.num_layers and cfg.sandwich_norms and cfg.norm_plus_one
        assert (cfg.local_rope is not None) == stem.startswith("gemma3")
