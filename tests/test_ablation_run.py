"""rhead_jax.ablation.run / tasks and the rhead_jax.ablate command on a tiny random model with
SmolLM2's tokenizer: runs against the unmasked sweep, outputs, resume, QA / CoT tasks, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import ablation, detection, qa
from rhead_jax.ablation import MaskSpec, parse_mask_spec
from rhead_jax.checkpoints import load_model
from rhead_jax.config import default_config
from rhead_jax.needle.haystack import SAN_FRANCISCO_NEEDLES_PATH
from tests.helpers.ablation_scores import H, L, RETRIEVAL, SCORES
from tests.helpers.browser import assert_page_ok, chromium_binary
from tests.helpers.config_files import write_config
from tests.helpers.tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random llama (4 query heads, 2 kv heads) with SmolLM2's real tokenizer."""
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_ablate") / "tiny-smol", sharpen=False, hidden_size=32,
                          intermediate_size=64, num_hidden_layers=L, num_attention_heads=H,
                          initializer_range=0.5)  # large: heads matter


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("scores") / "head_scores.json"
    p.write_text(json.dumps(SCORES))
    return p


SWEEP = dict(lengths=[300], depths=[0, 50, 100], batch_size=3, max_new_tokens=6, prefill_chunk=128,
             q_chunk=64, k_chunk=64, pad_multiple=32)


def _config(model_dir, scores="", *, mode="zero", phase="all", **ablate):
    c = default_config()
    c.model.path = str(model_dir)
    c.model.name = "tiny"
    c.needles = str(SAN_FRANCISCO_NEEDLES_PATH)
    for k, v in SWEEP.items():
        setattr(c.sweep, k, v)
    c.mask.mode, c.mask.phase = mode, phase
    c.ablation.scores = str(scores)
    for k, v in ablate.items():
        setattr(c.ablation, k, tuple(v) if isinstance(v, list) else v)
    return ablation.validate(c)


def test_config_schema_and_errors(tiny_dir, tmp_path):
    c = default_config()  # the one schema holds the mask and ablation sections
    assert c.mask.mode == "zero" and c.mask.phase == "all" and c.ablation.mask == "top:20"
    c.mask.mode = "random"
    with pytest.raises(ValueError, match="config.mask.mode must be one of"):
        ablation.validate(c)
    c = default_config()
    c.ablation.bogus = 1
    with pytest.raises(ValueError, match=r"unknown config key\(s\) ablation.bogus; valid keys: .*mask.phase"):
        ablation.validate(c)
    with pytest.raises(ValueError, match="unknown task"):
        ablation.parse_task("squad")
    with pytest.raises(ValueError, match="unknown mask spec"):
        _config(tiny_dir, mask="heads:3")


# ----------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def sweep_k_run(tiny_dir, model, scores_file, tmp_path_factory):
    wd = tmp_path_factory.mktemp("ablate_k")
    res = ablation.run_ablation(_config(tiny_dir, scores_file, mask="top:2", sweep_k=[0, 2], seeds=[0, 1]),
                                str(wd), model=model)
    return wd, res


def test_none_equals_the_unmasked_sweep(tiny_dir, model, sweep_k_run, tmp_path):
    wd, res = sweep_k_run
    detection.run_sweep(_config(tiny_dir), str(tmp_path), model=model)
    ref = {r["key"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    none = res["runs"]["none"]["instances"]
    assert len(none) == len(ref) == 3
    for r in none:
        assert r["response"] == ref[r["key"]]["response"]
        assert r["rouge1_recall"] == ref[r["key"]]["rouge1_recall"]
    assert res["baseline"]["accuracy"] == pytest.approx(np.mean([r["rouge1_recall"] for r in ref.values()]))


def test_results_schema_heatmaps_and_sweep_k(sweep_k_run):
    wd, res = sweep_k_run
    on_disk = json.loads((wd / "results.json").read_text())
    assert on_disk["accuracy"] == res["accuracy"] and 0 <= res["accuracy"] <= 1
    assert res["mask"] == {"spec": "top:2", "mode": "zero", "phase": "all"}
    assert res["masked_heads"] == [[0, 0], [0, 3]]
    assert {(c["length"], c["depth"]) for c in res["accuracy_by_cell"]} == {(300, 0), (300, 50), (300, 100)}
    assert sum(res["categories"].values()) == res["tests"] == 3
    assert set(res["groups"]) == {"none", "top:2", "random:2"}
    assert set(res["runs"]) == {"none", "top2", "random2-seed0", "random2-seed1"}
    rnd = res["groups"]["random:2"]
    assert len(rnd["masked_heads"]) == 2 and all(not {tuple(h) for h in hs} & RETRIEVAL for hs in rnd["masked_heads"])
    assert rnd["accuracy"] == pytest.approx(np.mean(list(rnd["accuracy_by_run"].values())))
    for inst in res["runs"]["top2"]["instances"]:
        assert inst["category"] in ablation.CATEGORIES and 0 <= inst["rouge1_recall"] <= 1
        assert {"key", "length", "depth", "response", "content_recall", "haystack_copy"} <= set(inst)
    t = res["sweep_k"]
    assert t["k"] == [0, 2] and t["top"][0] == t["random"][0] == res["baseline"]["accuracy"]
    assert t["top"][1] == res["groups"]["top:2"]["accuracy"]
    csv = (wd / "sweep_k.csv").read_text().splitlines()
    assert csv[0].startswith("k,top_accuracy,random_accuracy_mean,random_accuracy_std,random_seed0,random_seed1")
    assert len(csv) == 3 and "| 2 |" in (wd / "sweep_k.md").read_text()
    for name in ("heatmap_none.png", "heatmap_top2.png", "heatmap_random2.png", "sweep_k.png"):
        assert (wd / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (wd / "report.html").read_text()
    assert "Fig. 1 style" in html and "top-k vs random" in html and html.count("data:image/png") >= 4
    assert "0 head-score files" not in html and 'href="#s-overview"' not in html and "Provenance" in html
    assert res["provenance"]["prompt_tokens"] and res["provenance"]["masked_head_scores"]["0-0"] > 0.1
    if chromium_binary():  # the real run's page in a real browser (tests/test_report_browser.py for more)
        assert_page_ok(wd / "report.html", min_images=4)
    assert (wd / "runs" / "niah" / "zero-all" / "top2" / "batches" / "batch_00000.json").exists()
    assert not list(wd.rglob(".*tmp*"))


def test_masking_all_heads_changes_responses(tiny_dir, model, sweep_k_run, tmp_path):
    _, res = sweep_k_run
    every = "list:" + ",".join(f"{l}-{h}" for l in range(L) for h in range(H))
    out = ablation.run_ablation(_config(tiny_dir, mask=every, baseline=False), str(tmp_path), model=model)
    masked = {r["key"]: r["generated"] for r in out["runs"][next(iter(out["runs"]))]["instances"]}
    plain = {r["key"]: r["generated"] for r in res["runs"]["none"]["instances"]}
    assert masked != plain
    assert out["masked_heads"] == [[l, h] for l in range(L) for h in range(H)]


def test_uniform_decode_and_zero_all_both_run(tiny_dir, model, scores_file, sweep_k_run, tmp_path):
    _, zero = sweep_k_run
    uni = ablation.run_ablation(_config(tiny_dir, scores_file, mode="uniform", phase="decode", mask="top:2",
                                        baseline=False), str(tmp_path), model=model)
    assert uni["mask"] == {"spec": "top:2", "mode": "uniform", "phase": "decode"}
    assert 0 <= uni["accuracy"] <= 1 and (tmp_path / "runs" / "niah" / "uniform-decode" / "top2").is_dir()
    # the original's ablation changes answers differently from zero/all (same heads, same grid)
    assert ([r["generated"] for r in uni["runs"]["top2"]["instances"]]
            != [r["generated"] for r in zero["runs"]["top2"]["instances"]])


@pytest.mark.parametrize("mode", ["mean_query", "mean_output"])
def test_mean_modes_run_with_calibrated_means(tiny_dir, model, sweep_k_run, tmp_path, mode):
    """config.mask.mode mean_*: the means from config.mask.calibration of the grid's prompts
    (ablation.heads.calibration_means), pinned in the run's store; masking every head changes answers."""
    from rhead_jax.ablation.heads import calibration_means
    from rhead_jax.ablation.tasks import NiahTask
    from rhead_jax.engine import Engine

    _, res = sweep_k_run
    every = "list:" + ",".join(f"{l}-{h}" for l in range(L) for h in range(H))
    config = _config(tiny_dir, mode=mode, mask=every, baseline=False)
    config.mask.calibration = 2
    out = ablation.run_ablation(config, str(tmp_path), model=model)
    assert out["mask"] == {"spec": every, "mode": mode, "phase": "all"}
    run_dir = next((tmp_path / "runs" / "niah" / f"{mode}-all").iterdir())
    assert json.loads((run_dir / "sweep_config.json").read_text())["config"]["mask"]["calibration"] == 2
    masked = {r["key"]: r["generated"] for r in out["runs"][next(iter(out["runs"]))]["instances"]}
    plain = {r["key"]: r["generated"] for r in res["runs"]["none"]["instances"]}
    assert masked != plain
    engine = Engine(config, model)
    means = calibration_means(engine, NiahTask(engine).prompts(), mode, 2)
    assert means.shape == (L, H, model.cfg.head_dim) and np.abs(means).max() > 0
    # two prompts of the grid: the first and the last, so one alone gives other means
    assert not np.allclose(means, calibration_means(engine, NiahTask(engine).prompts()[:1], mode, 2))


def test_resume_after_completion_is_a_no_op(tiny_dir, model, scores_file, sweep_k_run, monkeypatch):
    wd, _ = sweep_k_run
    before = {p.name: p.read_bytes() for p in wd.glob("runs/niah/zero-all/*/batches/*.json")}
    results = (wd / "results.json").read_bytes()

    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(ablation.NiahTask, "run", boom)
    ablation.run_ablation(_config(tiny_dir, scores_file, mask="top:2", sweep_k=[0, 2], seeds=[0, 1]), str(wd),
                          model=model)
    assert (wd / "results.json").read_bytes() == results
    assert {p.name: p.read_bytes() for p in wd.glob("runs/niah/zero-all/*/batches/*.json")} == before
    # a subset (top:2 alone) is answered from the same runs
    res = ablation.run_ablation(_config(tiny_dir, scores_file, mask="top:2"), str(wd), model=model)
    assert set(res["runs"]) == {"none", "top2"}
    # a run whose settings changed is refused, not mixed
    with pytest.raises(ValueError, match="different configuration"):
        _changed_run(tiny_dir, scores_file, wd, model)


def _changed_run(tiny_dir, scores_file, wd, model):
    c = _config(tiny_dir, scores_file, mask="top:2")
    c.sweep.max_new_tokens = 7
    ablation.run_ablation(c, str(wd), model=model)


def test_several_rankings_in_one_run_share_runs_and_resume(tiny_dir, model, scores_file, sweep_k_run, tmp_path,
                                                           monkeypatch):
    """copy (query JSON), kv (a gate TSV, G = 2) and copy2 (the same JSON again) with top-2 masked next to
    2 random seeds and one baseline: the baseline and random runs of the single-file run are reused (the
    same heads), copy and copy2 mask the same heads and share one run, a rerun recomputes nothing."""
    import shutil

    from rhead_jax.rankings import write_gates_tsv
    old_wd, old = sweep_k_run
    shutil.copytree(old_wd / "runs", tmp_path / "runs")
    gates = tmp_path / "gates.tsv"
    write_gates_tsv(gates, [[0.1, 0.8], [0.9, 0.0]])
    scores = f"copy:{scores_file},kv:{gates},copy2:{scores_file}"
    calls = []
    real_run = ablation.NiahTask.run
    monkeypatch.setattr(ablation.NiahTask, "run", lambda self, *a: calls.append(a[-1]) or real_run(self, *a))
    res = ablation.run_ablation(_config(tiny_dir, scores, mask="top:2", sweep_k=[2], seeds=[0, 1]), str(tmp_path),
                                model=model)
    assert len(calls) == 2 and len(set(calls)) == 2  # top-2 of copy (= copy2) and of kv; one batch each
    assert set(res["groups"]) == {"none", "top:2@copy", "top:2@kv", "top:2@copy2", "random:2"}
    assert res["mask"]["spec"] == "top:2@copy" and res["masked_heads"] == old["masked_heads"] == [[0, 0], [0, 3]]
    assert res["groups"]["top:2@kv"]["masked_heads"] == [[1, 0], [1, 1]]  # KV head 1-0's two query heads
    runs = res["runs"]
    assert runs["top2-copy"]["store"] == runs["top2-copy2"]["store"] != runs["top2-kv"]["store"]
    assert [r["response"] for r in runs["top2-copy"]["instances"]] == \
        [r["response"] for r in old["runs"]["top2"]["instances"]]  # the single-file top:2, masked alike
    t = res["sweep_k"]
    assert t["rankings"] == ["copy", "kv", "copy2"] and t["k"] == [2] and t["baseline"] == old["baseline"]["accuracy"]
    assert t["by_ranking"]["copy"] == t["by_ranking"]["copy2"] == [old["groups"]["top:2"]["accuracy"]]
    assert t["random"] == [old["groups"]["random:2"]["accuracy"]]
    assert [r["name"] for r in res["rankings"]] == ["copy", "kv", "copy2"] and "copy" in res["random_pool"]
    md = (tmp_path / "sweep_k.md").read_text()
    assert "| k | copy | kv | copy2 | random |" in md
    html = (tmp_path / "report.html").read_text()
    assert "Which ranking is causal" in html and "top-k of kv" in html and "gates.tsv" in html
    # a rerun reads every run back
    results = (tmp_path / "results.json").read_bytes()
    monkeypatch.setattr(ablation.NiahTask, "run", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    ablation.run_ablation(_config(tiny_dir, scores, mask="top:2", sweep_k=[2], seeds=[0, 1]), str(tmp_path),
                          model=model)
    assert (tmp_path / "results.json").read_bytes() == results


def test_errors_before_any_work(tiny_dir, model, scores_file, tmp_path):
    with pytest.raises(ValueError, match="no head-score file given"):
        ablation.run_ablation(_config(tiny_dir, mask="top:2"), str(tmp_path), model=model)
    with pytest.raises(ValueError, match=r"random:6: only 5 heads"):
        ablation.run_ablation(_config(tiny_dir, scores_file, mask="random:6"), str(tmp_path), model=model)
    with pytest.raises(ValueError, match=r"top:9: the head-score file has only 8 heads"):
        ablation.run_ablation(_config(tiny_dir, scores_file, mask="top:2", sweep_k=[9]), str(tmp_path),
                              model=model)
    with pytest.raises(ValueError, match="out of range"):
        ablation.run_ablation(_config(tiny_dir, mask="list:3-0"), str(tmp_path), model=model)
    assert not (tmp_path / "runs").exists()


def test_qa_and_cot_tasks_with_masking(tiny_dir, model, tmp_path):
    res = ablation.run_ablation(_config(tiny_dir, mask="list:0-0,1-1", task=f"qa:{qa.QA_TASKS_PATH}",
                                        qa_max_new_tokens=4), str(tmp_path / "qa"), model=model)
    assert res["task"].startswith("qa:") and set(res["metrics"]) == {"em", "f1"}
    assert res["baseline"]["metrics"].keys() == {"em", "f1"} and res["accuracy"] == res["metrics"]["f1"]
    inst = res["runs"]["list2-" + MaskSpec.parse("list:0-0,1-1").slug.split("-")[1]]["instances"]
    assert len(inst) == 6 and {"em", "f1", "response"} <= set(inst[0])
    cot = ablation.run_ablation(_config(tiny_dir, mask="none", task=f"cot:{qa.COT_TASKS_PATH}",
                                        cot_max_new_tokens=3), str(tmp_path / "cot"), model=model)
    assert set(cot["metrics"]) == {"accuracy"} and len(cot["runs"]["none"]["instances"]) == 6
    assert (tmp_path / "qa" / "report.html").exists()


# ----------------------------------------------------------------------------------- CLI
def _config_file(tmp_path, tiny_dir):
    return write_config(tmp_path / "tiny_config.py", tiny_dir, needles=SAN_FRANCISCO_NEEDLES_PATH,
                        lengths=(300,), depths=(0, 50, 100), batch_size=3)


@pytest.mark.slow  # a subprocess: JAX start-up and compilation again (~15 s)
def test_cli_end_to_end(tiny_dir, scores_file, tmp_path):
    f = _config_file(tmp_path, tiny_dir)
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "rhead_jax.ablate", "--config", str(f), f"--workdir={wd}", f"--scores={scores_file}",
           "--mask", "random:2", "--seed", "3", "--config.mask.mode=uniform", "--config.mask.phase=decode",
           "--config.ablation.baseline=False"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["mask"] == {"spec": "random:2", "mode": "uniform", "phase": "decode"} and res["seeds"] == [3]
    assert res["masked_heads"] == [[list(h) for h in parse_mask_spec("random:2", SCORES, seed=3)]]
    assert list(res["runs"]) == ["random2-seed3"] and "random:2: accuracy" in out.stdout
