"""config.sweep.save_captures: the batch arrays files (rhead_jax.results_store), the captures of a
sweep (rhead_jax.captures) and their resume, on the tiny random model of tests/test_detection.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import captures, config as config_lib, detection, scoring
from rhead_jax.checkpoints import load_model
from rhead_jax.errors import UserError
from rhead_jax.results_store import BatchFileError, ResultStore, decode_arrays, encode_arrays
from tests.test_detection import _config, tiny_dir  # noqa: F401  (the module's tiny model fixture)


@pytest.fixture(scope="module")
def model(tiny_dir):  # noqa: F811
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def plain_run(tiny_dir, model, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("plain")
    detection.run_sweep(_config(tiny_dir), str(wd), model=model)
    return wd


@pytest.fixture(scope="module")
def capture_run(tiny_dir, model, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("captures")
    detection.run_sweep(_config(tiny_dir, save_captures=True, capture_top_k=3), str(wd), model=model)
    return wd


def _results(wd):
    return [json.loads(line) for line in (Path(wd) / "results.jsonl").read_text().splitlines()]


# -- the arrays files ------------------------------------------------------------------------------


def test_arrays_roundtrip_and_every_fault_is_named():
    arrays = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "t": np.array(["x", "yé"]),
              "w": np.linspace(0, 1, 4).astype(np.float16)}
    data = encode_arrays(3, arrays, "pin", "k1")
    back = decode_arrays(data, 3, "pin", "k1")
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype
                                            for k in arrays)
    assert decode_arrays(data, 3, "pin", None)["a"].shape == (2, 3)
    for bad, b, pin, kind, why in ((data, 4, "pin", "k1", "holds batch 3"), (data, 3, "other", "k1", "pin differs"),
                                   (data, 3, "pin", "k2", "'k1' arrays"), (data[:len(data) // 2], 3, "pin", "k1",
                                                                          "not a whole arrays file"),
                                   (b"", 3, "pin", "k1", "empty")):
        with pytest.raises(BatchFileError, match=why):
            decode_arrays(bad, b, pin, kind)
    # an array changed under a valid zip (re-saved with the old header): the checksum catches it
    import io
    z = dict(np.load(io.BytesIO(data), allow_pickle=False))
    z["a"] = z["a"] + 1
    buf = io.BytesIO()
    np.savez_compressed(buf, **z)
    with pytest.raises(BatchFileError, match="checksum"):
        decode_arrays(buf.getvalue(), 3, "pin", "k1")
    with pytest.raises(ValueError, match="object arrays"):
        encode_arrays(0, {"o": np.array([{}], object)}, "pin", "k1")


def test_a_batch_is_done_only_with_its_arrays(tmp_path):
    store = ResultStore(str(tmp_path), json.dumps({"x": 1}), arrays="k1")
    store.write(0, [{"key": "a"}])
    assert not store.done(0) and store.scan(1) == {}
    store.write_arrays(0, {"v": np.zeros(2)})
    assert store.done(0) and store.scan(1) == {0: [{"key": "a"}]}
    other = ResultStore(str(tmp_path), json.dumps({"x": 1}), arrays="k2")   # another kind: redone
    assert not other.done(0)
    reader = ResultStore.reader(str(tmp_path))
    assert reader.pin == store.pin and np.array_equal(reader.read_arrays(0)["v"], np.zeros(2))


# -- a sweep with captures -------------------------------------------------------------------------


def test_captures_leave_the_sweep_files_identical(plain_run, capture_run):
    for name in ("head_scores.json", "results.jsonl", "summary.json", "sweep_config.json"):
        assert (plain_run / name).read_bytes() == (capture_run / name).read_bytes(), name
    assert not list((plain_run / "batches").glob("*.npz"))
    assert len(list((capture_run / "batches").glob("*.npz"))) == len(list((capture_run / "batches").glob("*.json")))


def test_captures_hold_what_the_score_counted(capture_run):
    caps = captures.read_workdir(str(capture_run))
    results = _results(capture_run)
    assert set(caps) == {r["key"] for r in results}
    size = captures.size_per_test(str(capture_run))
    assert size["tests"] == len(results) and size["files"] == 6
    assert size["bytes"] == sum(p.stat().st_size for p in (capture_run / "batches").glob("*.npz"))
    for r in results:
        c = caps[r["key"]]
        n = len(r["generated"])
        assert c.tokens.tolist() == r["generated"] and len(c.token_text) == n
        assert c.topk_index.shape[:1] == (n,) and c.topk_index.shape[-1] == 3
        assert c.span == tuple(r["span"]) and c.prompt_len == r["prompt_tokens"]
        assert c.window[0] <= c.span[0] and c.span[1] <= c.window[1]
        w = c.topk_weight.astype(np.float32)
        assert (np.diff(w, axis=-1) <= 0).all() and (w >= 0).all() and (w.sum(-1) <= 1.01).all()
        # every attended prompt position is in the context, with its token
        seen = c.topk_index[(c.topk_index >= 0) & (c.topk_index < c.prompt_len)]
        assert set(seen.tolist()) <= set(c.context_pos.tolist())
        assert (c.topk_index < c.prompt_len + n).all()
        assert c.copy_events().sum(0).tolist() == r["copy_counts"]


def test_copy_events_count_as_copy_counts():
    rng = np.random.default_rng(0)
    B, N, L, H, P = 3, 7, 2, 4, 20
    top = rng.integers(0, P, (B, N, L, H, 2)).astype(np.int32)
    prompt = rng.integers(0, 5, (B, P)).astype(np.int32)
    gen = rng.integers(-1, 5, (B, N)).astype(np.int32)
    start, end = np.array([2, 5, 0]), np.array([9, 15, 20])
    ev = np.asarray(scoring.copy_events(top, gen, prompt, start, end))
    assert ev.shape == (B, N, L, H) and ev.any()
    assert np.array_equal(ev.sum(1), np.asarray(scoring.copy_counts(top, gen, prompt, start, end)))
    b, n, l, h = np.argwhere(ev)[0]
    s = top[b, n, l, h, 0]
    assert start[b] <= s < end[b] and prompt[b, s] == gen[b, n]


def test_turning_captures_on_resumes_and_redoes_only_what_lacks_them(tiny_dir, model, plain_run, capture_run,  # noqa: F811
                                                                      tmp_path, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO)
    wd = tmp_path / "wd"
    shutil.copytree(plain_run, wd)
    with pytest.raises(UserError, match="save_captures=True"):
        captures.read_workdir(str(wd))
    cfg = _config(tiny_dir, save_captures=True, capture_top_k=3)
    detection.run_sweep(cfg, str(wd), model=model)   # same pin: resumed, every batch redone for its captures
    npz = sorted((wd / "batches").glob("*.npz"))
    assert [p.name for p in npz] == [p.name for p in sorted((capture_run / "batches").glob("*.npz"))]
    for name in ("head_scores.json", "results.jsonl"):
        assert (wd / name).read_bytes() == (plain_run / name).read_bytes()
    # a torn captures file and a missing one: those two batches alone are redone
    npz[1].write_bytes(npz[1].read_bytes()[:100])
    npz[2].unlink()
    before = {p.name: p.stat().st_mtime_ns for p in npz if p.exists()}
    caplog.clear()
    detection.run_sweep(cfg, str(wd), model=model)
    assert "4 already done" in caplog.text and "recomputing batch 1" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in sorted((wd / "batches").glob("*.npz"))}
    assert [n for n in after if after[n] != before.get(n)] == [npz[1].name, npz[2].name]
    assert captures.read_workdir(str(wd)).keys() == captures.read_workdir(str(capture_run)).keys()
    # another k: a different kind, every batch redone
    caplog.clear()
    detection.run_sweep(_config(tiny_dir, save_captures=True, capture_top_k=2), str(wd), model=model)
    assert "0 already done" in caplog.text
    assert next(iter(captures.read_workdir(str(wd)).values())).topk_index.shape[-1] == 2


def test_capture_keys_are_not_pinned_but_validated(tiny_dir):  # noqa: F811
    assert config_lib.sweep_json(_config(tiny_dir)) == config_lib.sweep_json(
        _config(tiny_dir, save_captures=True, capture_top_k=9))
    for k in (0, -2):
        with pytest.raises(UserError, match="config.sweep.capture_top_k must be an integer >= 1"):
            _config(tiny_dir, capture_top_k=k)
