"""rhead_jax.detection (and the rhead_jax.sweep command) end to end on a tiny random model with SmolLM2's tokenizer: outputs, shared-prefix
exactness, resume after a kill, config and input errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import detection
from rhead_jax.checkpoints import load_model
from rhead_jax.config import default_config, validate
from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random llama with SmolLM2's real tokenizer (vocab 49152)."""
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_sweep") / "tiny-smol", sharpen=False, hidden_size=32,
                          intermediate_size=64, num_attention_heads=4)


# the tiny grid: 2 lengths x 3 depths x the 3 bundled needles = 18 tests in 6 batches
TINY_SWEEP = dict(lengths=[300, 400], depths=[0, 50, 100], batch_size=4, max_new_tokens=6, prefill_chunk=128,
                  q_chunk=64, k_chunk=64, pad_multiple=32)


def _config(model_dir, **sweep):
    c = default_config()
    c.model.path = str(model_dir)
    c.model.name = "tiny"
    for k, v in {**TINY_SWEEP, **sweep}.items():
        setattr(c.sweep, k, v)
    return validate(c)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def reference_run(tiny_dir, model, tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref")
    summary = detection.run_sweep(_config(tiny_dir), str(wd), model=model)
    return wd, summary


def _read(wd, name):
    return (Path(wd) / name).read_bytes()


def test_outputs_in_the_original_format(reference_run, model):
    wd, summary = reference_run
    hs = json.loads(_read(wd, "head_scores.json"))
    L, H = model.cfg.num_layers, model.cfg.num_heads
    assert list(hs) == [f"{l}-{h}" for l in range(L) for h in range(H)]
    results = [json.loads(line) for line in _read(wd, "results.jsonl").splitlines()]
    assert [r["key"] for r in results] == [f"L{n}_D{d}_N{i}" for n in (300, 400) for d in (0, 50, 100) for i in range(3)]
    kept = [r for r in results if r["kept"]]
    assert all(len(v) == len(kept) for v in hs.values())
    for r in results:
        assert r["span"][1] > r["span"][0] and len(r["scores"]) == L and len(r["scores"][0]) == H
        assert 0 <= r["rouge1_recall"] <= 1
    assert summary["tests"] == 18 and summary["heads"] == L * H
    written = json.loads(_read(wd, "summary.json"))
    assert written["tests"] == 18
    # a dense model: every layer global, no per-kind counts (rhead_jax.report.kinds)
    assert written["layer_kinds"] == ["global"] * L and written["layer_windows"] == [None] * L
    assert "by_kind" not in written


def test_shared_prefix_gives_identical_results(tiny_dir, model, reference_run, tmp_path):
    wd, _ = reference_run
    detection.run_sweep(_config(tiny_dir, share_prefix=False), str(tmp_path), model=model)
    ours = [json.loads(x) for x in _read(tmp_path, "results.jsonl").splitlines()]
    ref = [json.loads(x) for x in _read(wd, "results.jsonl").splitlines()]
    assert any(r["shared_prefix_tokens"] > 100 for r in ref)  # sharing really happened
    for a, b in zip(ours, ref):
        assert a["shared_prefix_tokens"] == 0
        a.pop("shared_prefix_tokens"), b.pop("shared_prefix_tokens")
        assert a == b
    assert _read(tmp_path, "head_scores.json") == _read(wd, "head_scores.json")


def test_prefix_branches_give_identical_results(tiny_dir, model, reference_run, tmp_path):
    """Branches (the depth-0 prompts of each needle, shared across lengths) change where rows start,
    not what they compute: results as with the reference prefix alone, fewer tokens prefilled."""
    wd, _ = reference_run
    detection.run_sweep(_config(tiny_dir, prefix_branches=4), str(tmp_path), model=model)
    ours = [json.loads(x) for x in _read(tmp_path, "results.jsonl").splitlines()]
    ref = [json.loads(x) for x in _read(wd, "results.jsonl").splitlines()]
    gained = [a["key"] for a, b in zip(ours, ref) if a["shared_prefix_tokens"] > b["shared_prefix_tokens"]]
    assert {f"L300_D0_N{i}" for i in range(3)} <= set(gained)   # the shorter haystack at depth 0, each needle
    assert all(a["shared_prefix_tokens"] >= b["shared_prefix_tokens"] for a, b in zip(ours, ref))
    for a, b in zip(ours, ref):
        a.pop("shared_prefix_tokens"), b.pop("shared_prefix_tokens")
        assert a == b
    assert _read(tmp_path, "head_scores.json") == _read(wd, "head_scores.json")


def test_prefix_branches_with_extra_scores(tiny_dir, model, reference_run, tmp_path):
    """Branches stop before the questions too when the question's queries are scored ("query"):
    the copy score unchanged, a branch user's extra scores equal the dense reference."""
    ref_wd, _ = reference_run
    detection.run_sweep(_config(tiny_dir, extra_scores=("mass", "query"), prefix_branches=4), str(tmp_path),
                        model=model)
    assert _read(tmp_path, "head_scores.json") == _read(ref_wd, "head_scores.json")
    ours = [json.loads(x) for x in _read(tmp_path, "results.jsonl").splitlines()]
    plan = {i.key: i for i in detection.Engine(_config(tiny_dir), model).plan_needles()}
    user = next(r for r in ours if r["key"] == "L300_D0_N0")
    inst = plan[user["key"]]
    assert user["shared_prefix_tokens"] > 100 and user["shared_prefix_tokens"] <= inst.question_span[0]
    dense = _dense_extra_scores(model, dict(user, prompt_ids=inst.prompt_ids.tolist(), needle_span=inst.needle_span,
                                            question_span=inst.question_span))
    for name in ("mass", "query"):
        np.testing.assert_allclose(np.array(user["extra_scores"][name]), dense[name], rtol=1e-4, atol=1e-5)


def _config_file(tmp_path, model_dir) -> Path:
    f = tmp_path / "tiny_config.py"
    f.write_text(f"""
from rhead_jax.config import default_config
def get_config():
    c = default_config()
    c.model.path, c.model.name = {str(model_dir)!r}, "tiny"
    for k, v in {TINY_SWEEP!r}.items():
        setattr(c.sweep, k, v)
    return c
""")
    return f


def _sweep_cmd(config_file, workdir, *extra):
    return [sys.executable, "-m", "rhead_jax.sweep", f"--config={config_file}", f"--workdir={workdir}", *extra]


def test_killed_sweep_resumes_to_identical_output(tiny_dir, reference_run, tmp_path):
    ref_wd, _ = reference_run
    cfg_file = _config_file(tmp_path, tiny_dir)
    wd = tmp_path / "wd"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(_sweep_cmd(cfg_file, wd), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = wd / "batches" / "batch_00000.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the sweep wrote no batch before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (wd / "head_scores.json").exists()  # killed mid-sweep
    done = sorted(p.name for p in (wd / "batches").glob("batch_*.json"))
    assert len(done) < 6
    # resume with an explicit command-line override of a tuple field (same values, so same config)
    out = subprocess.run(_sweep_cmd(cfg_file, wd, "--config.sweep.lengths=(300,400)"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    # the random model keeps no test: the command says so (rhead_jax.diagnosis) after writing every file
    assert out.returncode == 2 and "error: none of the 18 tests run passed the ROUGE gate" in out.stderr, \
        out.stderr[-2000:]
    assert f"{6 - len(done)} to run ({len(done)} already done)" in out.stderr
    for name in ("head_scores.json", "results.jsonl", "summary.json"):
        assert _read(wd, name) == _read(ref_wd, name), name
    assert not list(wd.rglob(".*tmp*"))  # no half-written files left behind


def test_rerunning_a_finished_sweep_rewrites_identical_files(tiny_dir, model, reference_run):
    wd, _ = reference_run
    before = {n: _read(wd, n) for n in ("head_scores.json", "results.jsonl", "summary.json")}
    detection.run_sweep(_config(tiny_dir), str(wd), model=model)  # nothing to run; files replaced
    assert before == {n: _read(wd, n) for n in before}


def test_resume_with_a_different_config_is_refused(tiny_dir, model, reference_run):
    wd, _ = reference_run
    with pytest.raises(ValueError, match="different configuration"):
        detection.run_sweep(_config(tiny_dir, max_new_tokens=7), str(wd), model=model)


def test_unknown_config_key_lists_valid_ones():
    c = default_config()
    c.unlock()
    c.sweep.bogus = 1
    with pytest.raises(ValueError, match=r"unknown config key\(s\) sweep.bogus; valid keys: .*sweep.lengths"):
        validate(c)


def test_length_over_max_positions_fails_before_work(tiny_dir, model, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=1024"):
        detection.run_sweep(_config(tiny_dir, lengths=[300, 1020]), str(tmp_path), model=model)
    assert not (tmp_path / "batches").exists()


def _dense_extra_scores(model, result) -> dict[str, np.ndarray]:
    """The extra scores of one test from full attention probabilities (a plain forward over the prompt
    and the generated tokens but the last: row P - 1 + i is the query of decode step i)."""
    import jax.numpy as jnp

    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward

    prompt, gen = result["prompt_ids"], result["generated"]
    seq = jnp.asarray([prompt + gen[:-1]], jnp.int32)
    _, _, caps = forward(model.params, model.cfg, seq, jnp.arange(seq.shape[1])[None],
                         capture=CaptureSpec(full_probs=True), logits="none")
    p = np.asarray(caps.probs)[:, 0]                                        # [L, H, T, S]
    P, (s0, s1), (n0, n1), (q0, q1) = len(prompt), result["span"], result["needle_span"], result["question_span"]
    steps = p[:, :, P - 1:P - 1 + len(gen)]
    return {"mass": steps[..., s0:s1].sum(-1).mean(-1), "query": p[:, :, q0:q1, n0:n1].sum(-1).mean(-1)}


def test_extra_scores_match_full_probabilities_and_leave_the_copy_score(tiny_dir, model, reference_run, tmp_path):
    """config.sweep.extra_scores: head_scores.json byte-identical; head_scores_mass/query.json in the
    original format (kept tests); each test's scores equal the dense reference (shared prefix on: the
    reference row's question is prefilled in its own calls)."""
    from rhead_jax import rankings

    ref_wd, _ = reference_run
    wd = tmp_path / "extra"
    summary = detection.run_sweep(_config(tiny_dir, extra_scores=("mass", "query")), str(wd), model=model)
    assert _read(wd, "head_scores.json") == _read(ref_wd, "head_scores.json")
    ours = [json.loads(x) for x in _read(wd, "results.jsonl").splitlines()]
    ref = [json.loads(x) for x in _read(ref_wd, "results.jsonl").splitlines()]
    for a, b in zip(ours, ref):
        assert (a["generated"], a["copy_counts"], a["kept"]) == (b["generated"], b["copy_counts"], b["kept"])
        assert a["shared_prefix_tokens"] <= b["shared_prefix_tokens"]
    assert any(r["shared_prefix_tokens"] > 100 for r in ours)
    # the shared prefix's reference instance: its question is no longer in the shared prefix
    capped = [a for a, b in zip(ours, ref) if a["shared_prefix_tokens"] < b["shared_prefix_tokens"]]
    assert len(capped) == 1
    kept = [r for r in ours if r["kept"]]
    L, H = model.cfg.num_layers, model.cfg.num_heads
    for name in ("mass", "query"):
        hs = json.loads(_read(wd, f"head_scores_{name}.json"))
        assert hs == detection.head_scores_from(ours, L, H, score=name)
        assert list(hs) == [f"{l}-{h}" for l in range(L) for h in range(H)]
        assert hs["1-2"] == [r["extra_scores"][name][1][2] for r in kept]
        assert summary["extra_scores"][name]["top_heads"][0][0] in hs
        # the random model keeps no test: the round trip through a ranking, with every test kept
        every = detection.head_scores_from([dict(r, kept=True) for r in ours], L, H, score=name)
        assert every["1-2"] == [r["extra_scores"][name][1][2] for r in ours]
        (tmp_path / f"{name}.json").write_text(json.dumps(every))
        got = rankings.read_ranking(tmp_path / f"{name}.json").scores
        np.testing.assert_allclose(got, np.mean([r["extra_scores"][name] for r in ours], axis=0), rtol=1e-12)
    # the dense reference: the shared prefix's reference row, the first test and one more
    plan = {i.key: i for i in detection.Engine(_config(tiny_dir), model).plan_needles()}
    for res in (capped[0], ours[0], ours[10]):
        inst = plan[res["key"]]
        res = dict(res, prompt_ids=inst.prompt_ids.tolist(), needle_span=inst.needle_span,
                   question_span=inst.question_span)
        dense = _dense_extra_scores(model, res)
        for name in ("mass", "query"):
            np.testing.assert_allclose(np.array(res["extra_scores"][name]), dense[name], rtol=1e-4, atol=1e-5)
        assert 0 < dense["query"].max() <= 1 and 0 < dense["mass"].max() <= 1


def test_stop_when_stable_runs_the_same_tests_in_rounds(tiny_dir, model, reference_run, tmp_path):
    """The random model keeps no test, so its ranking never settles: the round order (rhead_jax.rounds)
    runs the whole grid, every test as in grid order, results.jsonl in grid order; summary.json says so."""
    wd, _ = reference_run
    summary = detection.run_sweep(_config(tiny_dir, stop_when_stable=True), str(tmp_path), model=model)
    ref = [json.loads(x) for x in _read(wd, "results.jsonl").splitlines()]
    ours = [json.loads(x) for x in _read(tmp_path, "results.jsonl").splitlines()]
    assert [r["key"] for r in ours] == [r["key"] for r in ref]
    for a, b in zip(ours, ref):
        assert (a["generated"], a["copy_counts"], a["kept"]) == (b["generated"], b["copy_counts"], b["kept"]), a["key"]
    stop = json.loads(_read(tmp_path, "summary.json"))["stop"]
    assert (stop["tests_run"], stop["tests_total"], stop["stopped_early"]) == (18, 18, False)
    assert stop == summary["stop"] and "before the top 10 settled" in stop["reason"]
    assert "stop_when_stable" in _read(tmp_path, "sweep_config.json").decode()
    assert "stop_when_stable" not in _read(wd, "sweep_config.json").decode()


def test_logit_scores_match_pytorch_and_leave_the_copy_score(tiny_dir, model, reference_run, tmp_path):
    """config.sweep.extra_scores logit / dla / spatial: head_scores.json byte-identical; each test's
    scores are the mean over its answer steps (generated tokens but the stops) of LOCOS's loop in
    PyTorch (tests/test_logit_scores.py) on the needle's tokens."""
    from tests.hf_tiny import load_torch
    from tests.test_logit_scores import torch_logit_terms

    ref_wd, _ = reference_run
    wd = tmp_path / "logit"
    names = ("logit", "dla", "spatial")
    detection.run_sweep(_config(tiny_dir, extra_scores=names), str(wd), model=model)
    assert _read(wd, "head_scores.json") == _read(ref_wd, "head_scores.json")
    ours = [json.loads(x) for x in _read(wd, "results.jsonl").splitlines()]
    L, H = model.cfg.num_layers, model.cfg.num_heads
    for name in names:
        assert json.loads(_read(wd, f"head_scores_{name}.json")) == detection.head_scores_from(ours, L, H, score=name)
    assert all(np.array(r["extra_scores"][n]).max() == 0 for r in ours for n in names
               if all(y in engine_stops(tiny_dir, model) for y in r["generated"]))
    # the random model stops at once: one batch generated to max_new_tokens, without stop tokens
    engine = detection.Engine(_config(tiny_dir), model)
    batch = engine.plan_needles()[:4]
    spec = engine.spec(capture=True, stops=(), extra_scores=names)
    torch_model = load_torch(tiny_dir)
    for inst, res in list(zip(batch, detection.score_batch(engine, batch, spec, extra_scores=names)))[::3]:
        assert len(res["generated"]) == TINY_SWEEP["max_new_tokens"]
        ref = torch_logit_terms(torch_model, inst.prompt_ids.tolist(), res["generated"], inst.needle_span).mean(0)
        for i, name in enumerate(names):
            np.testing.assert_allclose(np.array(res["extra_scores"][name]), ref[..., i], rtol=1e-4,
                                       atol=1e-5 * np.abs(ref[..., i]).max())


def engine_stops(tiny_dir, model):
    return detection.Engine(_config(tiny_dir), model).spec(capture=True).stop_tokens
