"""rhead_jax.cli: the one command-line shape. Bare config names, overrides checked against the one
schema, and bad input as exit status 2 with one `error: ...` line and no traceback (each command
run as a subprocess, the way a user runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from rhead_jax import cli
from rhead_jax import config as config_lib
from rhead_jax.errors import UserError
from rhead_jax.needle.haystack import SAN_FRANCISCO_NEEDLES_PATH
from tests.helpers.config_files import write_config
from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- in process
def _parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_bare_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout, as after a pip install
    shipped = config_lib.shipped_configs()
    assert {"smollm2_135m", "yi34b"} <= set(shipped)
    for arg in ("smollm2_135m.py", "smollm2_135m", "configs/smollm2_135m.py"):
        assert cli.resolve_config_argv(["p", "--config", arg])[2] == str(shipped["smollm2_135m"])
        assert cli.resolve_config_argv(["p", f"--config={arg}"])[1] == f"--config={shipped['smollm2_135m']}"
    c = config_lib.validate(_parse(cli.resolve_config_argv(
        ["p", "--config=yi34b", "--config.mask.mode=uniform", "--config.ablation.seeds=(1,2)"])))
    assert c.mask.mode == "uniform" and list(c.ablation.seeds) == [1, 2] and len(c.sweep.lengths) == 20


def test_unknown_names_and_keys_are_refused_before_parsing(tmp_path):
    with pytest.raises(UserError, match=r"config file 'nope.py' not found; .*smollm2_135m"):
        cli.resolve_config_argv(["p", "--config", "nope.py"])
    with pytest.raises(UserError, match=r"unknown config key\(s\) sweep.lenghts; valid keys: .*sweep.lengths"):
        cli.resolve_config_argv(["p", "--config=smollm2_135m", "--config.sweep.lenghts=(1,)"])
    f = tmp_path / "mine.py"
    f.write_text("from rhead_jax.config import default_config\ndef get_config():\n    return default_config()\n")
    assert cli.resolve_config_argv(["p", "--config", str(f)])[2] == str(f)  # a path wins over names


def test_the_shipped_configs_are_package_data():
    """A wheel carries configs/ as rhead_jax/configs, so names resolve after `pip install`."""
    from tests.helpers.setup_meta import setup_kwargs

    kw = setup_kwargs()
    assert "rhead_jax.configs" in kw["packages"] and kw["package_dir"]["rhead_jax.configs"] == "configs"
    assert (REPO / "configs" / "__init__.py").exists()


# ----------------------------------------------------------------------------------- subprocesses
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A config file for a 2-layer random model with SmolLM2's tokenizer (loads in a second)."""
    tmp = tmp_path_factory.mktemp("cli")
    model = make_tiny_smol(tmp / "tiny", sharpen=False, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, max_position_embeddings=512)
    return write_config(tmp / "tiny_config.py", model, needles=SAN_FRANCISCO_NEEDLES_PATH, lengths=(300,),
                        depths=(50,), max_new_tokens=4)


def run_cli(module: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_user_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and exactly one `error:` line, the last, naming the fragments."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def test_sweep_bad_config_name_and_override():
    assert_user_error(run_cli("rhead_jax.sweep", "--config", "no_such.py"), "no_such.py", "smollm2_135m")
    err = assert_user_error(run_cli("rhead_jax.sweep", "--config", "smollm2_135m.py", "--config.no_such_key=1"),
                            "no_such_key", "valid keys:", "sweep.lengths")
    assert "mask.mode" in err  # the valid keys are listed
    assert_user_error(run_cli("rhead_jax.sweep", "--config", "smollm2_135m.py", "--config.model.dtype=float16"),
                      "config.model.dtype", "float32 or bfloat16")
    assert_user_error(run_cli("rhead_jax.sweep", "--config", "smollm2_135m.py", "--config.sweep.batch_size=x"),
                      "batch_size")
    assert_user_error(run_cli("rhead_jax.sweep"), "--config is required")


def test_debug_keeps_the_traceback():
    p = run_cli("rhead_jax.sweep", "--config", "smollm2_135m.py", "--config.model.dtype=float16", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr


def test_sweep_bad_inputs(tiny_config, tmp_path):
    wd = tmp_path / "wd"
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              "--config.model.path=/nonexistent/model"), "/nonexistent/model")
    bad_ckpt = tmp_path / "bad_ckpt"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "no_such_field": 1}))
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              f"--config.model.path={bad_ckpt}"), str(bad_ckpt))
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              "--config.needles=/nonexistent/needles.jsonl"), "/nonexistent/needles.jsonl")
    bad_needles = tmp_path / "needles.jsonl"
    bad_needles.write_text('{"needle": "The best thing is to eat.", "question": "What?"}\n')
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              f"--config.needles={bad_needles}"), str(bad_needles))
    no_span = tmp_path / "no_span.jsonl"
    no_span.write_text(json.dumps({"needle": "The best thing to do in San Francisco is to eat a sandwich.",
                                   "question": "What is the best thing?", "real_needle": "zebra crossing quietly"})
                       + "\n")
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              f"--config.needles={no_span}"))
    assert_user_error(run_cli("rhead_jax.sweep", "--config", tiny_config, "--workdir", wd,
                              "--config.sweep.lengths=(5000,)"), "max_position_embeddings", "config.sweep.lengths")
    assert not (wd / "head_scores.json").exists()


def test_ablate_bad_inputs(tiny_config, tmp_path):
    wd = tmp_path / "wd"
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", wd, "--mask", "top:3"),
                      "no head-score file given", "--scores")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", wd, "--mask", "heads:3"),
                      "unknown mask spec")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", wd,
                              "--scores", tmp_path / "none.json"), "none.json", "rhead_jax.sweep")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", wd, "--mask", "list:9-0"),
                      "9-0", "out of range")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", wd, "--seeds", "a,b"),
                      "--seeds")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--config.mask.bogus=1"), "mask.bogus")


def test_detectors_bad_inputs(tiny_config, tmp_path):
    assert_user_error(run_cli("rhead_jax.detectors", "--config", "smollm2_135m.py", "--config.detectors.repeats=1"),
                      "config.detectors.repeats", ">= 2")
    assert_user_error(run_cli("rhead_jax.detectors", "--config", tiny_config, "--workdir", tmp_path / "wd",
                              "--config.detectors.length=300"), "1200 tokens", "512 positions", "config.detectors")
    assert not (tmp_path / "wd").exists()


def test_ablate_bad_rankings(tiny_config, tmp_path):
    """--scores NAME:PATH,...: a malformed gate file (refused before the model loads), a gate file of
    another model's shape (2 layers x 3 KV heads; the tiny model has 2 KV heads)."""
    scores = tmp_path / "head_scores.json"
    scores.write_text(json.dumps({f"{l}-{h}": [0.1 * h] for l in range(2) for h in range(4)}))
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t0.5\n0.2\n")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", tmp_path / "wd",
                              "--scores", f"copy:{scores},duo:{bad}"), "bad.tsv", "all of one length")
    other = tmp_path / "other.tsv"
    other.write_text("1\t0.5\t0\n0.2\t0\t1\n")
    assert_user_error(run_cli("rhead_jax.ablate", "--config", tiny_config, "--workdir", tmp_path / "wd",
                              "--scores", f"copy:{scores},duo:{other}", "--sweep_k", "2"),
                      "ranking duo", "2 layers x 3 KV heads", "the model 2 x 2")
    assert not (tmp_path / "wd" / "runs").exists()
